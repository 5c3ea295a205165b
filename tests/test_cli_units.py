"""The on-call commands' small pure parts: address parsing, filters, event lines, latency quantiles,
and the explain findings that this host cannot produce (odd struct page, memmap_on_memory, failures)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from observer import render
from observer.client import address_from, parse_address
from observer.commands import events, explain, top
from observer.errors import ObserverError
from observer.kernel.cmdline import BootParams
from observer.kernel.release import KernelVersion


# --- addresses -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "host", "port"), [
    ("127.0.0.1:9817", "127.0.0.1", 9817), ("localhost:1", "localhost", 1), ("[::1]:9817", "::1", 9817),
    ("http://127.0.0.1:9817/", "127.0.0.1", 9817)])
def test_parse_address_accepts(value: str, host: str, port: int) -> None:
    a = parse_address(value)
    assert (a.host, a.port) == (host, port)


@pytest.mark.parametrize(("value", "why"), [
    ("foo", "expected HOST:PORT"), ("127.0.0.1:0", "port 0"), ("127.0.0.1:99999", "port '99999'"),
    ("::1:9817", "brackets"), (":9817", "expected HOST:PORT"), ("a b:80", "not a host name")])
def test_parse_address_rejects_naming_flag_and_value(value: str, why: str) -> None:
    with pytest.raises(ObserverError) as e:
        parse_address(value)
    msg = str(e.value)
    assert msg.startswith(f"bad --daemon address {value!r}") and why in msg and "\n" not in msg


def test_address_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HVO_OBSERVER_ADDR", raising=False)
    assert str(address_from(argparse.Namespace(daemon=None))) == "/run/hvo-observer/api.sock"
    assert address_from(argparse.Namespace(daemon="/tmp/x.sock")).path == "/tmp/x.sock"
    assert address_from(argparse.Namespace(daemon="unix:/tmp/x.sock")).path == "/tmp/x.sock"
    monkeypatch.setenv("HVO_OBSERVER_ADDR", "127.0.0.1:1234")
    assert str(address_from(argparse.Namespace(daemon=None))) == "127.0.0.1:1234"
    assert str(address_from(argparse.Namespace(daemon="10.0.0.1:80"))) == "10.0.0.1:80"  # the flag wins
    monkeypatch.setenv("HVO_OBSERVER_ADDR", "nonsense")
    with pytest.raises(ObserverError, match=r"bad \$HVO_OBSERVER_ADDR address 'nonsense'"):
        address_from(argparse.Namespace(daemon=None))


# --- filters and lines ---------------------------------------------------------------------------
def _args(**kw: Any) -> argparse.Namespace:
    base = dict(event=None, hstate=None, node=None, pid=None, comm=None, result=None, lines=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(("text", "name"), [
    ("2048kB", "2048kB"), ("2M", "2048kB"), ("2MiB", "2048kB"), ("2mb", "2048kB"), ("1G", "1048576kB"),
    ("1048576kB", "1048576kB"), ("huge", None), ("", None), ("100", None)])
def test_hstate_names(text: str, name: str | None) -> None:
    assert events.hstate_name(text) == name


def test_filter_matches() -> None:
    flt = events.make_filter(_args(event="optimize,restore", hstate="2M", node="0",
                                   comm="a-very-long-command-name", result="ok"),
                             ["2048kB", "1048576kB"], [0, 1])
    rec = {"event": "optimize", "hstate": "2048kB", "node": 0, "tgid": 5, "tid": 6,
           "comm": "a-very-long-com", "result": "ok"}  # the kernel keeps 15 characters of comm
    assert flt.matches(rec)
    for change in ({"event": "pool_alloc"}, {"hstate": "1048576kB"}, {"node": 1}, {"comm": "bash"},
                   {"result": "error"}):
        assert not flt.matches({**rec, **change}), change
    by_pid = events.make_filter(_args(pid="6"), ["2048kB"], [0])
    assert by_pid.matches(rec) and not by_pid.matches({**rec, "tid": 7})


@pytest.mark.parametrize(("kw", "msg"), [
    ({"event": "optimise"}, "bad --event 'optimise': unknown event 'optimise'"),
    ({"result": "failed"}, "bad --result 'failed': unknown result 'failed'"),
    ({"hstate": "4M"}, "bad --hstate '4M': this kernel's hstates are 2048kB, 1048576kB"),
    ({"node": "2"}, "bad --node '2': this host's NUMA nodes are 0, 1"),
    ({"pid": "0"}, "bad --pid '0'"), ({"comm": ""}, "bad --comm ''"), ({"lines": -1}, "bad --lines -1")])
def test_bad_filters(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ObserverError) as e:
        events.make_filter(_args(**kw), ["2048kB", "1048576kB"], [0, 1])
    assert str(e.value).startswith(msg)


def test_human_line() -> None:
    rec = {"unix_time": 1_700_000_000.25, "event": "restore", "hstate": "2048kB", "node": 0, "pfn": 0x1d3c00,
           "comm": "bash", "tgid": 42, "tid": 42, "duration_ns": 12_300, "result": "error", "errno": 12,
           "inferred": True}
    line = render.event_line(rec)
    assert line.split()[1:] == ["restore", "2048kB", "0", "0x1d3c00", "bash[42]", "12.3us", "error",
                                "(errno", "12)", "inferred"]
    assert line.split()[0].endswith(".250")
    unknown = render.event_line({**rec, "node": None, "pfn": 0, "tgid": 0, "duration_ns": 0, "result": "ok",
                                 "inferred": False})
    assert unknown.split()[1:] == ["restore", "2048kB", "-", "-", "-", "-", "ok"]


def test_render() -> None:
    assert render.mib(7 * 4096) == "0.03" and render.signed_mib(-(1 << 20)) == "-1.00"
    assert [render.duration(x) for x in (0, 999, 1500, 2_500_000, 3e9)] == [
        "-", "999ns", "1.5us", "2.5ms", "3s"]


# --- top's latency quantiles ---------------------------------------------------------------------
def test_quantiles_from_cumulative_buckets() -> None:
    # 10 observations in (1 us, 2 us], 10 in (2 us, 4 us]: the median is the 1st bucket's upper edge.
    buckets = [(1e-6, 0.0), (2e-6, 10.0), (4e-6, 20.0), (math.inf, 20.0)]
    assert top.quantile(0.5, buckets) == pytest.approx(2e-6)
    assert top.quantile(0.75, buckets) == pytest.approx(3e-6)
    assert top.quantile(0.99, [(1e-6, 0.0), (math.inf, 5.0)]) == pytest.approx(1e-6)
    assert top.quantile(0.5, [(1e-6, 0.0), (math.inf, 0.0)]) is None


def test_latency_buckets_parse_the_exposition() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from exporters.prometheus.collector import HvoCollector
    from observer.model import HstateSpec, Model
    from observer.probes.events import EventType

    model = Model({"2048kB": HstateSpec("2048kB", 9, 7)})

    @dataclass
    class Agg:
        counts: dict[Any, int] = field(default_factory=dict)
        hist: dict[Any, list[int]] = field(default_factory=dict)
        lost: int = 0

    hist = [0] * 64
    hist[11] = 4  # 4 restores of 2**11..2**12 ns
    from observer.snapshot import KernelSnapshot

    model.observe(KernelSnapshot(taken_ns=0), Agg(hist={(EventType.RESTORE, 9): hist}))
    reg = CollectorRegistry()
    reg.register(HvoCollector(model.view))
    buckets = top.latency_buckets(generate_latest(reg).decode())
    b = buckets[("restore", "2048kB")]
    assert b[-1] == (math.inf, 4.0)
    assert 2048e-9 <= top.quantile(0.5, b) <= 4096e-9


# --- explain's findings for situations this host cannot produce ----------------------------------
@dataclass
class FakeFacts:
    """The kernel facts explain reads, for a kernel other than this one."""

    struct_page_size: int | None = 64
    memmap_on_memory: bool = False
    sysctl: bool | None = True
    boot_params: BootParams = field(default_factory=BootParams)
    release: str = "6.18.0"
    version: KernelVersion = field(default_factory=lambda: KernelVersion(6, 18, 0))
    machine: str = "x86_64"
    kconfig: dict[str, str] | None = field(
        default_factory=lambda: {"CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP": "y"})

    def hvo_sysctl(self) -> bool | None:
        return self.sysctl

    def memory_layout(self) -> Any:
        raise ObserverError("no memory blocks in this fake")


def _doc(pages: int = 4, optimized: int = 4, events_: list[dict[str, Any]] | None = None,
         **rec: Any) -> dict[str, Any]:
    saved = optimized * 7 * 4096
    return {
        "source": "daemon", "daemon": "127.0.0.1:9817", "kernel": "6.18.0", "page_size": 4096,
        "mode": "tracepoint", "degraded": False, "probes": [],
        "hstates": [{"name": "2048kB", "order": 9, "freeable_vmemmap_pages": 7, "eligible": True,
                     "pages": pages, "free": pages, "surplus": 0, "optimized": optimized,
                     "expected_saved_bytes": saved,
                     "nodes": [{"node": 0, "pages": pages, "free": pages, "surplus": 0,
                                "optimized": optimized, "expected_saved_bytes": saved}]}],
        "saved_bytes": {"expected": saved, "kernel": saved},
        "reconcile": {"settled": True, "settle_seconds": 1.0, "quiet_seconds": 5.0, "drift_bytes": 0,
                      "pending_drift_bytes": 0, "inconsistent": None, "resyncs": 0, "last_resync": None,
                      "events_lost": 0, "events_seen": 10,
                      "baseline": {"exact": True, "candidates": 1, "provisional": False, "note": ""}, **rec},
        "events": events_ or [],
    }


def _ids(doc: dict[str, Any], facts: FakeFacts) -> list[str]:
    return [f["id"] for f in explain.Explainer(doc, facts).report()["findings"]]


def test_explain_all_well() -> None:
    r = explain.Explainer(_doc(), FakeFacts()).report()
    assert [f["id"] for f in r["findings"]] == ["ok"]
    assert r["promised_saved_bytes"] == r["kernel_saved_bytes"] == 4 * 7 * 4096 and r["difference_bytes"] == 0


def test_explain_struct_page_not_power_of_two() -> None:
    facts = FakeFacts(struct_page_size=72)
    findings = explain.Explainer(_doc(optimized=0), facts).report()["findings"]
    f = next(f for f in findings if f["id"] == "struct-page-size")
    assert "72" in f["evidence"] and f["severity"] == "error"


def test_explain_memmap_on_memory() -> None:
    assert "memmap-on-memory" in _ids(_doc(), FakeFacts(memmap_on_memory=True))


def test_explain_restore_failures_lost_events_and_drift() -> None:
    doc = _doc(events_=[{"event": "restore", "hstate": "2048kB", "result": "error", "count": 2}],
               events_lost=3, resyncs=1, last_resync={"reason": "3 event(s) lost", "unix_time": 0},
               drift_bytes=-4095 * 4096, pending_drift_bytes=-4095 * 4096)
    doc["hstates"].append({"name": "1048576kB", "order": 18, "freeable_vmemmap_pages": 4095, "eligible": True,
                           "pages": 0, "free": 0, "surplus": 0, "optimized": 0, "expected_saved_bytes": 0,
                           "nodes": []})
    findings = {f["id"]: f for f in explain.Explainer(doc, FakeFacts()).report()["findings"]}
    assert "restore errors (ENOMEM) 2048kB: 2" in findings["restore-failures"]["evidence"]
    assert findings["lost-events"]["evidence"].startswith("3 lost of 10 seen; 1 resync(s)")
    assert "1 1048576kB page(s)" in findings["drift"]["evidence"]  # 4095 pages = one gigantic page
    assert "ok" not in findings


def test_explain_hvo_off_names_the_boot_parameter_without_sysctl() -> None:
    facts = FakeFacts(sysctl=None, version=KernelVersion(5, 15, 0), release="5.15.0",
                      kconfig={"CONFIG_HUGETLB_PAGE_FREE_VMEMMAP": "y"},
                      boot_params=BootParams(hugepages=[(None, 4)], hugetlb_free_vmemmap="off"))
    f = next(f for f in explain.Explainer(_doc(optimized=0), facts).report()["findings"]
             if f["id"] == "hvo-off-at-allocation")
    assert "hugetlb_free_vmemmap=off" in f["evidence"] and "boot allocates 4 page(s)" in f["evidence"]
    assert "hugetlb_free_vmemmap=on" in f["action"]


# --- status screen paths the host rarely shows (two nodes, failures) ----------------------------
def test_status_screen_with_two_nodes_and_failures() -> None:
    from observer.commands import status

    doc = _doc(pages=6, optimized=6, events_=[
        {"event": "restore", "hstate": "2048kB", "result": "error", "count": 1},
        {"event": "restore", "hstate": "2048kB", "result": "ok", "count": 5}])
    h = doc["hstates"][0]
    h["nodes"] = [{"node": 0, "pages": 4, "free": 4, "surplus": 0, "optimized": 4, "expected_saved_bytes": 0},
                  {"node": 1, "pages": 2, "free": 2, "surplus": 1, "optimized": 2, "expected_saved_bytes": 0}]
    doc.update(source="daemon", daemon="127.0.0.1:9817", events_available=True, version="0.1.0",
               uptime_seconds=3600, hvo_enabled=True, memmap={}, recent_failures=[
                   {"unix_time": 1_700_000_000.0, "event": "restore", "hstate": "2048kB", "node": None,
                    "pfn": 0, "tgid": 0, "comm": "", "errno": 12, "inferred": True, "result": "error"}])
    lines = status.human(doc).splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["2048kB"], ["0"], ["1"])]
    assert rows == [["2048kB", "all", "6", "6", "0", "6", "7", "0.16", "MiB", "(42", "pages)"],
                    ["0", "4", "4", "0", "4", "0.11", "MiB", "(28", "pages)"],
                    ["1", "2", "2", "1", "2", "0.05", "MiB", "(14", "pages)"]]
    assert "failures   restore 2048kB: 1" in lines
    failure = next(line for line in lines if "errno 12" in line).split()
    assert failure[1:] == ["restore", "2048kB", "-", "-", "-", "-", "error", "(errno", "12)", "inferred"]
    assert "daemon     127.0.0.1:9817, hvo-observer 0.1.0, up 1h" in lines
