"""A real Prometheus server (Debian's /usr/bin/prometheus, installed by scripts/setup) scraping live
daemons on loopback, with the project's rule files loaded.

- The series Prometheus stores are exactly the daemon's samples plus the target's ``job`` and
  ``instance``, with the right label values, and the recording rules compute from them.
- Forced drift: a second daemon is made blind to optimize events (``BLIND``, below: the model drops
  them, which is what an unprobed kernel path looks like to it), the pool grows with HVO on, and
  ``HvoVmemmapDriftPersistent`` fires for that daemon only; it resolves once a shrink makes the
  model resync. The rules are the project's files with one change: that alert's ``for: 10m`` is
  ``for: DRIFT_FOR`` (5 s), so the test does not wait ten minutes; everything else is as shipped.
- Every metric name used by the Grafana dashboard's queries and by the rules is one a live daemon
  serves, and every panel query and recording rule returns data in the real Prometheus.

Prometheus scrapes and evaluates every second. The daemons run as the systemd unit runs them
(tests/daemon_proc.py: root with only CAP_BPF and CAP_PERFMON), the pools are emptied and restored
afterwards, and every process started here is killed in ``finally``. Waiting loops only turn a hang
into a failure message; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from observer import __version__
from observer.kernel import hugepages, sysctl, vmstat
from tests.daemon_proc import (
    FREE,
    H1G,
    H2M,
    PAGE,
    WAIT_S,
    Daemon,
    daemon,
    empty_pools,
    free_port,
    one,
    set_pool,
    settled,
)
from tests.promql_names import (
    PROMETHEUS_SAMPLE_NAMES,
    dashboard,
    dashboard_queries,
    metric_names_in_expr,
    metric_names_in_grafana_query,
    recorded_names,
    rule_files,
    rules,
    sample_names_in_exposition,
)
from tests.test_grafana_dashboard import PANEL_QUERIES

pytestmark = [pytest.mark.live, pytest.mark.prometheus]

PROMETHEUS = Path("/usr/bin/prometheus")
JOB = "hvo-observer"
HOST_RULES = "hvo-observer.rules.yml"
DRIFT_ALERT = "HvoVmemmapDriftPersistent"
DRIFT_FOR = "5s"
SHIPPED_DRIFT = "hvo_reconcile_drift_bytes != 0\n        for: 10m\n"
PAGES = 8
# The blind daemon: `python -c BLIND run ...` is `python -m observer run ...` whose model never
# hears of an optimization (pool events and restores still arrive), as if HVO ran on a path no
# probe sees. Test-side only: the daemon's own code is untouched.
BLIND = """\
import sys
from observer.cli import main
from observer.model import Model
from observer.probes.events import EventType
heard = Model.on_event
Model.on_event = lambda self, ev: None if ev.event is EventType.OPTIMIZE else heard(self, ev)
raise SystemExit(main(sys.argv[1:]))
"""

T = TypeVar("T")
Stack = tuple["Prometheus", dict[str, Daemon]]


# --- Prometheus as a subprocess ---------------------------------------------------------------------


class Prometheus:
    """``prometheus`` on a free loopback port, scraping ``targets`` (instance label -> daemon port)
    every second as job ``hvo-observer`` and evaluating ``rule_paths`` every second."""

    def __init__(self, tmp: Path, targets: Mapping[str, int], rule_paths: Sequence[Path]) -> None:
        self.port = free_port()
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_paths],
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"instance": name}}
                                   for name, port in targets.items()],
            }],
        }))  # fmt: skip
        self.log_path = tmp / "prometheus.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={self.config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        finally:
            self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()[-3000:]

    def get(self, path: str, **params: str | list[str]) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that selects at most one series (None when it selects none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        found = self.get("/api/v1/alerts")["alerts"]
        return [a for a in found if name is None or a["labels"]["alertname"] == name]

    def wait(self, what: str, check: Callable[[], T | None], explain: Callable[[], object] = lambda: "") -> T:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            try:
                got = check()
            except (OSError, urllib.error.URLError):
                got = None  # not listening yet
            if got is not None and got is not False:
                return got
            time.sleep(0.2)
        pytest.fail(f"{what}: not seen after {WAIT_S:.0f} s: {explain()}\n"
                    f"--- prometheus log ---\n{self.output()}")

    def wait_targets_up(self, names: Sequence[str]) -> None:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=10) as r:
                return r.status == 200

        self.wait("prometheus ready", ready)
        self.wait(f"targets {list(names)} up",
                  lambda: all(self.value(f'up{{job="{JOB}", instance="{n}"}}') == 1 for n in names),
                  lambda: self.get("/api/v1/targets")["activeTargets"])


def loaded_rules(tmp: Path) -> list[Path]:
    """The project's rule files, the drift alert's `for` shortened to DRIFT_FOR (nothing else)."""
    out = []
    for path in rule_files():
        text = path.read_text()
        if path.name == HOST_RULES:
            assert text.count(SHIPPED_DRIFT) == 1, f"the drift alert's `for` changed in {path}: update me"
            text = text.replace(SHIPPED_DRIFT, SHIPPED_DRIFT.replace("10m", DRIFT_FOR))
        copy = tmp / path.name
        copy.write_text(text)
        out.append(copy)
    return out


@contextmanager
def scraped(tmp: Path, launchers: Mapping[str, Sequence[str]]) -> Iterator[Stack]:
    """Daemons (instance name -> launcher) ready and settled, and a Prometheus scraping them."""
    with ExitStack() as stack:
        daemons = {name: stack.enter_context(daemon(tmp, launcher=launcher))
                   for name, launcher in launchers.items()}
        for d in daemons.values():
            settled(d)  # the start-up baseline is final before the test moves the pools
        prom = Prometheus(tmp, {name: d.port for name, d in daemons.items()}, loaded_rules(tmp))
        stack.callback(prom.stop)
        prom.wait_targets_up(list(daemons))
        yield prom, daemons


@pytest.fixture
def host() -> Iterator[None]:
    for path in (PROMETHEUS, Path("/usr/bin/setpriv")):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/setup (packages prometheus, util-linux)")
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        yield


def vector(prom: Prometheus, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in prom.query(expr)}


def caught_up(prom: Prometheus, instance: str) -> Callable[[], bool]:
    """Prometheus' newest samples of ``instance``: a quiet moment with the kernel's pools and counters."""

    def check() -> bool:
        pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
        counters = vmstat.read_memmap_counters()
        assert counters is not None
        sel = f'instance="{instance}"'
        return (prom.value(f"hvo_reconcile_settled{{{sel}}}") == 1
                and all(prom.value(f'hvo_hugepages{{{sel}, hstate="{h}", node="0"}}') == pools[h]
                        for h in (H2M, H1G))
                and prom.value(f'hvo_memmap_pages{{{sel}, counter="nr_memmap_pages"}}')
                == counters.memmap_pages)

    return check


# --- the tests --------------------------------------------------------------------------------------


def test_prometheus_stores_the_daemon_series_with_the_right_labels(host: None, tmp_path: Path) -> None:
    started = time.time()
    with scraped(tmp_path, {"host-a": ("-m", "observer")}) as (prom, daemons):
        d = daemons["host-a"]
        set_pool(H2M, PAGES)
        settled(d)
        prom.wait("Prometheus has the grown pool", caught_up(prom, "host-a"), lambda: d.output())
        saved = PAGES * FREE[H2M] * PAGE
        target = {"job": JOB, "instance": "host-a"}

        # Every series of the target is one of the daemon's samples plus job and instance, and back.
        _, body = d.get("/metrics")
        served = {tuple(sorted({**s.labels, "__name__": s.name, **target}.items()))
                  for fam in text_string_to_metric_families(body) for s in fam.samples}
        series = prom.get("/api/v1/series", **{"match[]": '{instance="host-a"}'}, start=str(started))
        stored = {tuple(sorted(s.items())) for s in series
                  if ":" not in s["__name__"] and s["__name__"] not in PROMETHEUS_SAMPLE_NAMES
                  and not s["__name__"].startswith(("scrape_", "ALERTS"))}
        assert stored == served, f"only in Prometheus: {stored - served}; only served: {served - stored}"

        def at(expr: str) -> dict[tuple[tuple[str, str], ...], float]:
            return vector(prom, expr)

        def key(**labels: str) -> tuple[tuple[str, str], ...]:
            return tuple(sorted({**target, **labels}.items()))

        kernel = os.uname().release
        assert at('hvo_build_info{instance="host-a"}') == {
            key(__name__="hvo_build_info", version=__version__, kernel=kernel, mode="tracepoint"): 1}
        attached = at('hvo_probe_attached{instance="host-a"}')
        assert attached[key(__name__="hvo_probe_attached", probe="kmem:mm_page_alloc", event="pool_alloc",
                            mode="tracepoint")] == 1
        assert set(attached.values()) == {1}
        assert at('hvo_hugepages{instance="host-a"}') == {
            key(__name__="hvo_hugepages", hstate=H2M, node="0"): PAGES,
            key(__name__="hvo_hugepages", hstate=H1G, node="0"): 0}
        assert at('hvo_optimized_hugepages{instance="host-a", hstate="2048kB"}') == {
            key(__name__="hvo_optimized_hugepages", hstate=H2M, node="0"): PAGES}
        assert at('hvo_vmemmap_saved_bytes{instance="host-a", hstate=""}') == {
            key(__name__="hvo_vmemmap_saved_bytes", source="expected"): saved,
            key(__name__="hvo_vmemmap_saved_bytes", source="kernel"): saved}
        assert at('hvo_vmemmap_freeable_pages{instance="host-a"}') == {
            key(__name__="hvo_vmemmap_freeable_pages", hstate=h): FREE[h] for h in (H2M, H1G)}
        events = at('hvo_events_total{instance="host-a", hstate="2048kB", result="ok"}')
        for event in ("pool_alloc", "optimize"):
            assert events[key(__name__="hvo_events_total", event=event, hstate=H2M, result="ok")] == PAGES
        assert prom.value('hvo_reconcile_drift_bytes{instance="host-a"}') == 0

        # The recording rules compute from them, keeping job and instance.
        # Host and fleet rules are separate groups, each evaluated on its own tick: wait for both.
        prom.wait("recording rules evaluated after the grow",
                  lambda: prom.value('instance:hvo_vmemmap_saved_bytes:sum{source="kernel"}') == saved
                  and prom.value('job:hvo_vmemmap_saved_bytes:sum{source="kernel"}') == saved)
        name = "instance:hvo_vmemmap_saved_bytes:sum"
        assert at(name) == {key(__name__=name, source=s): saved for s in ("expected", "kernel")}
        assert prom.value('instance_hstate:hvo_optimized_hugepages_per_hugepages:ratio{hstate="2048kB"}') == 1
        assert prom.value('job:hvo_vmemmap_saved_bytes:sum{source="kernel"}') == saved
        assert prom.alerts() == [], "an alert fired on a correct daemon"
        assert d.stop() == 0


def test_forced_drift_fires_the_drift_alert_for_that_daemon_only(host: None, tmp_path: Path) -> None:
    with scraped(tmp_path, {"honest": ("-m", "observer"), "blind": ("-c", BLIND)}) as (prom, daemons):
        groups = prom.get("/api/v1/rules")["groups"]
        (rule,) = [r for g in groups for r in g["rules"] if r["name"] == DRIFT_ALERT]
        assert rule["duration"] == 5 and rule["query"] == "hvo_reconcile_drift_bytes != 0"
        set_pool(H2M, PAGES)
        drift = -PAGES * FREE[H2M] * PAGE  # the blind model expects nothing saved; the kernel saved this
        assert one(settled(daemons["blind"]), "hvo_reconcile_drift_bytes") == drift, daemons["blind"].output()
        assert one(settled(daemons["honest"]), "hvo_reconcile_drift_bytes") == 0

        def firing() -> dict[str, Any] | None:
            return next((a for a in prom.alerts(DRIFT_ALERT) if a["state"] == "firing"), None)

        alert = prom.wait(f"{DRIFT_ALERT} firing", firing, prom.alerts)
        assert {k: alert["labels"][k] for k in ("instance", "job", "severity")} == {
            "instance": "blind", "job": JOB, "severity": "warning"}
        assert float(alert["value"]) == drift
        summary = alert["annotations"]["summary"]
        assert summary.startswith("HVO savings on blind disagree with the kernel by -224kiB"), summary
        assert "hvo-observer explain" in alert["annotations"]["runbook"]
        assert [a for a in prom.alerts() if a["labels"]["instance"] == "honest"] == []
        # Not once, while the pool grew or since, did the honest daemon report a drift.
        assert prom.value('max_over_time(hvo_reconcile_drift_bytes{instance="honest"}[10m])') == 0
        assert prom.value('min_over_time(hvo_reconcile_drift_bytes{instance="honest"}[10m])') == 0

        # Shrinking frees pages the blind model never saw optimized: it resyncs and the alert resolves.
        set_pool(H2M, 0)
        settled(daemons["blind"])
        prom.wait(f"{DRIFT_ALERT} resolved", lambda: prom.alerts(DRIFT_ALERT) == [], prom.alerts)
        assert prom.value('hvo_resyncs_total{instance="blind"}') == 1
        assert prom.value('hvo_resyncs_total{instance="honest"}') == 0
        assert prom.alerts() == []
        for d in daemons.values():
            assert d.stop() == 0


def test_dashboard_and_rules_use_only_what_a_live_daemon_serves(host: None, tmp_path: Path) -> None:
    with scraped(tmp_path, {"host-a": ("-m", "observer")}) as (prom, daemons):
        d = daemons["host-a"]
        set_pool(H2M, PAGES)
        settled(d)
        _, body = d.get("/metrics")
        served = sample_names_in_exposition(body)

        # Names: every dashboard query (panels and template variables) and every rule expression.
        board = dashboard()
        missing = {where: sorted(metric_names_in_grafana_query(query) - served)
                   for where, query in dashboard_queries(board)}
        recorded = recorded_names()
        for path in rule_files():
            for r in rules(path):
                used = metric_names_in_expr(r["expr"]) - recorded - PROMETHEUS_SAMPLE_NAMES
                missing[f"{path.name}: {r.get('record') or r['alert']}"] = sorted(used - served)
        missing = {where: names for where, names in missing.items() if names}
        assert missing == {}, f"used but not served by a live daemon ({sorted(served)}):\n" + "\n".join(
            f"  {where}: {names}" for where, names in missing.items())

        # Data: each panel query (variables as Grafana fills them for "All") returns series in the
        # real Prometheus, and so does every recording rule.
        prom.wait("Prometheus has the grown pool", caught_up(prom, "host-a"), lambda: d.output())
        samples = 'count_over_time(hvo_reconcile_settled{instance="host-a"}[1m])'
        prom.wait("a few samples of the settled state for rate()", lambda: (prom.value(samples) or 0) >= 5)
        empty = [q for q in PANEL_QUERIES if not prom.query(q)]
        assert empty == [], "panel queries without data:\n" + "\n".join(empty)
        assert "host-a" in prom.get("/api/v1/label/instance/values", **{"match[]": "hvo_build_info"})
        assert set(prom.get("/api/v1/label/hstate/values", **{"match[]": "hvo_hugepages"})) == {H2M, H1G}
        prom.wait("every recording rule evaluated once", lambda: all(
            not r["lastEvaluation"].startswith("0001-") for g in prom.get("/api/v1/rules")["groups"]
            for r in g["rules"] if r["type"] == "recording"))
        # A ratio guarded by `(denominator > 0)` has no sample while nothing happened, by design.
        guarded = {r["record"] for path in rule_files() for r in rules(path)
                   if "record" in r and "> 0)" in r["expr"]}
        empty = sorted(name for name in recorded - guarded if not prom.query(name))
        assert empty == [], f"recording rules without data: {empty}"
        assert d.stop() == 0
