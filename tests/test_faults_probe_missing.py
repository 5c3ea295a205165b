"""A probe that does not resolve (a catalog entry naming a tracepoint and a function this kernel does
not have, added by the tests.extra_catalog launcher): the daemon degrades, says so in
hvo_probe_attached, /api/v1/status and the log, and keeps serving exact figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from observer.kernel import sysctl
from tests.daemon_proc import H1G, H2M, check_exact, daemon, empty_pools, one, set_pool, settled
from tests.extra_catalog import ENV

pytestmark = pytest.mark.live

MISSING_TP = "hvo_test:no_such_event"
MISSING_FN = "hvo_test_no_such_function"
NOT_IN_KALLSYMS = f"{MISSING_FN}: not in kallsyms (inlined, or not in this kernel generation)"
REAL = ("kmem:mm_page_alloc", "kmem:mm_page_free", "page_isolation:test_pages_isolated")


def test_a_missing_probe_degrades_the_daemon_which_keeps_serving(tmp_path: Path) -> None:
    catalog = tmp_path / "extra.json"
    catalog.write_text(json.dumps([
        {"event": "optimize", "kind": "tracepoint", "targets": [MISSING_TP]},
        {"event": "restore", "kind": "function", "targets": [MISSING_FN]},
    ]))
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        with daemon(tmp_path, launcher=("-m", "tests.extra_catalog"), env={ENV: str(catalog)}) as d:
            m = d.scrape()
            assert one(m, "hvo_probe_attached", probe=MISSING_TP, event="optimize", mode="tracepoint") == 0
            assert one(m, "hvo_probe_attached", probe=MISSING_FN, event="restore", mode="tracepoint") == 0
            attached = {labels: v for labels, v in m["hvo_probe_attached"].items()
                        if dict(labels)["probe"] in REAL}
            assert len(attached) == 3 and set(attached.values()) == {1}, attached
            assert one(m, "hvo_mode_degraded") == 1
            probes = {p["probe"]: p for p in d.status()["probes"]}  # type: ignore[attr-defined]
            assert probes[MISSING_TP]["attached"] is False
            assert probes[MISSING_TP]["reason"] == f"no such tracepoint: {MISSING_TP}"
            assert probes[MISSING_FN]["reason"] == NOT_IN_KALLSYMS
            log = d.output()
            assert f"probe {MISSING_TP} (optimize) not attached: no such tracepoint: {MISSING_TP}" in log
            assert f"probe {MISSING_FN} (restore) not attached: {NOT_IN_KALLSYMS}" in log
            assert "(degraded)" in log
            # It keeps serving, and what it can see is still exact.
            assert d.get("/healthz") == (200, "ok\n")
            set_pool(H2M, 8)
            check_exact(settled(d), {H2M: 8, H1G: 0}, {H2M: 8, H1G: 0}, "degraded daemon after a grow")
            set_pool(H2M, 0)
            check_exact(settled(d), {H2M: 0, H1G: 0}, {H2M: 0, H1G: 0}, "degraded daemon after a shrink")
            assert d.stop() == 0


@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_function_probes_report_an_unresolved_entry_as_a_failed_attachment(mode: str) -> None:
    """Function modes: a catalog entry whose symbol is missing (here demote, as where the compiler
    inlined it) must reach hvo_probe_attached as 0, which the daemon builds from the attachments."""
    from observer.probes.events import EventType
    from observer.probes.functions import FunctionProbeSet
    from tests import function_fixtures

    kallsyms = function_fixtures.FIXTURES / function_fixtures.RELEASES["6.12"] / "kallsyms"
    facts = function_fixtures.load("6.12", "\n".join(
        line for line in kallsyms.read_text().splitlines() if "demote" not in line))

    class LoadedBpf:  # what attach() asks of a loaded bcc.BPF: every program attached
        def __init__(self, programs: set[bytes]) -> None:
            self.kfunc_entry_fds = self.kfunc_exit_fds = dict.fromkeys(programs, 0)

        def attach_kprobe(self, **kw: object) -> None: ...

        def attach_kretprobe(self, **kw: object) -> None: ...

    probes = FunctionProbeSet(mode, facts)  # type: ignore[arg-type]
    unresolved = [r for r in probes.resolve(facts) if not r.ok]  # type: ignore[arg-type]
    assert [r.spec.event for r in unresolved] == [EventType.DEMOTE]
    names = {n.encode() for p in probes.plans for n in _program_names(mode, p.symbol)}
    attachments = probes.attach(LoadedBpf(names))
    failed = [(a.event, a.ok) for a in attachments if a.event is EventType.DEMOTE]
    assert failed == [(EventType.DEMOTE, False)], "the unresolved demote probe is not among the attachments"


def _program_names(mode: str, symbol: str) -> tuple[str, ...]:
    from observer.probes.functions import program_names

    return tuple(n for i in range(16) for n in program_names(mode, symbol, i))
