"""Acceptance of the function probes on stock Debian kernels (6.1, 6.12, sid 7.x) under QEMU TCG,
in fentry and in kprobe mode.

One fresh guest per kernel and mode (8 GiB); in it, tests/vm_guest_scripts/function_probes.py loads
the probes and drives: sysctl on, grow/shrink the 2 MiB pool by N; the same with the sysctl off;
surplus pages faulted in and unmapped; a runtime 1 GiB page allocated and demoted.
"""

from __future__ import annotations

import collections
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.matrix]

PAGES = 16
KERNELS = ("6.1", "6.12", "sid")
# Room for a runtime 1 GiB page in each mode: the first mode's demote on Debian 6.12 leaves bad pages
# in its GiB (a kernel bug, below), so the second mode needs another clean aligned GiB.
MEM_MB = 8192
# Kernel bugs of the guest kernels, reproduced with no probe loaded (only echo to nr_hugepages /
# demote): Debian 6.12.117 logs "Bad page state" for vmemmap pages the first time optimized pages
# are restored (the runner's warm-up absorbs most of it); 6.12.117 and 7.2.13 also when a
# vmemmap-optimized 1 GiB page is demoted (stale HPG_vmemmap_optimized in the 2 MiB pieces, plus a
# static_key_dec_not_one warning on 6.12). They are printed, not failed on; 6.1 must stay clean.
KNOWN_KERNEL_BUGS = ("Bad page state", "static_key_dec_not_one", "Call Trace")
RUNNER = "tests/vm_guest_scripts/function_probes.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


Run = tuple[dict[str, Any], str]  # the runner's JSON, how the guest booted


def _in_guest(kernel: Any, mode: str, workdir: Any) -> Run:
    from tests.vm import Guest

    python = os.path.join(REPO, ".venv/bin/python")
    with Guest(kernel, mem_mb=MEM_MB, workdir=workdir) as g:
        boot = f"{g.kernel.release} booted in {g.boot_s:.1f} s ({g.attempts} attempt(s))"
        r = g.run(f"{python} {REPO}/{RUNNER} {mode} $HVO_OUT/out.json --pages {PAGES}", timeout=900)
    return r.output_json("out.json"), boot


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[tuple[str, str], Future[Run]]]:
    """A fresh guest per selected kernel and mode (one mode's demote must not leave the other's
    without a free aligned GiB on 6.12), run two at a time (tests/vm/fixtures.py: guest_pool)."""
    if os.geteuid() != 0:
        pytest.skip("QEMU guests with a 9p share of / need root")
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from tests.vm.fixtures import guest_pool
    from tests.vm.kernels import prepare_kernel

    wanted = [(i.callspec.params["kernel"], i.callspec.params["mode"]) for i in request.session.items
              if i.path == Path(__file__) and hasattr(i, "callspec")]
    kernels = {k: prepare_kernel(k) for k, _ in wanted}
    with guest_pool() as pool:
        yield {(k, m): pool.submit(_in_guest, kernels[k], m, tmp_path_factory.mktemp(f"probes-{k}-{m}"))
               for k, m in dict.fromkeys(wanted)}


def _count(events: list[dict[str, Any]]) -> collections.Counter[tuple[str, int, str]]:
    return collections.Counter((e["event"], e["order"], e["result"]) for e in events)


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_function_probes_see_every_hvo_operation(runs: dict[tuple[str, str], Future[Run]], kernel: str,
                                                 mode: str) -> None:
    res, boot = runs[(kernel, mode)].result()
    print(f"\n{kernel}: {boot}")
    scen = {s["name"]: s["events"] for s in res["scenarios"]}
    attached = {a["event"] for a in res["attachments"] if a["ok"]}
    targets = sorted({f"{a['event']}={a['target']}" for a in res["attachments"]})
    scenarios = ", ".join(f"{s['name']} {s['seconds']} s" for s in res["scenarios"])
    print(f"{res['release']} {mode}: load {res['startup_s']} s; {scenarios}; {' '.join(targets)}")
    failed = [a for a in res["attachments"] if not a["ok"]]
    assert not failed, failed
    assert {"optimize", "restore"} <= attached
    assert res["aggregates"]["lost"] == 0

    errors = {s["name"]: s["kernel_errors"] for s in res["scenarios"]}
    unknown = [ln for lines in errors.values() for ln in lines if not any(b in ln for b in KNOWN_KERNEL_BUGS)]
    assert not unknown, unknown
    for name, lines in errors.items():
        if lines:
            print(f"kernel errors in {name} (a kernel bug, see KNOWN_KERNEL_BUGS): {lines[:2]}")
    if res["release"].startswith("6.1."):  # no such bug in 6.1
        assert not any(errors.values()), errors

    # sysctl on: every page optimized once on the way in and restored once on the way out
    on = scen["on"]
    assert _count(_of(on, "optimize")) == {("optimize", 9, "ok"): PAGES}
    assert _count(_of(on, "restore")) == {("restore", 9, "ok"): PAGES}
    assert all(e["duration_ns"] > 0 for e in on if e["event"] in ("optimize", "restore"))
    pfns = {e["pfn"] for e in _of(on, "optimize")}
    assert len(pfns) == PAGES and pfns == {e["pfn"] for e in _of(on, "restore")}
    assert all(p % 512 == 0 for p in pfns), "pfn of a 2 MiB page is 512-aligned"
    if "pool_alloc" in attached:  # pool events from the function probes (else the tracepoint set)
        assert _count(_of(on, "pool_alloc")) == {("pool_alloc", 9, "ok"): PAGES}
        assert _count(_of(on, "pool_free")) == {("pool_free", 9, "ok"): PAGES}
        assert {e["pfn"] for e in _of(on, "pool_alloc")} == pfns == {e["pfn"] for e in _of(on, "pool_free")}
    for remap in ("remap_free", "remap_alloc"):
        if remap in attached:
            assert _count(_of(on, remap)) == {(remap, 9, "ok"): PAGES}
            assert {e["pfn"] for e in _of(on, remap)} == pfns

    # sysctl off: optimize returns at once (skipped) or is not called at all; nothing to restore
    off = scen["off"]
    opt_off, res_off = _count(_of(off, "optimize")), _count(_of(off, "restore"))
    assert set(opt_off) <= {("optimize", 9, "skipped")} and sum(opt_off.values()) in (0, PAGES), opt_off
    assert set(res_off) <= {("restore", 9, "skipped")} and sum(res_off.values()) in (0, PAGES), res_off
    assert not _of(off, "remap_free") and not _of(off, "remap_alloc")
    if "pool_alloc" in attached:
        assert _count(_of(off, "pool_alloc")) == {("pool_alloc", 9, "ok"): PAGES}

    # surplus pages (overcommit, faulted in, unmapped): the fault-path allocator is a wrapper of the
    # pool-grow one on 7.x (kprobe: alloc_surplus_hugetlb_folio around only_alloc_fresh_hugetlb_folio.isra):
    # each page must still be counted once
    surplus = scen["surplus"]
    n = res["surplus"]
    assert _count(_of(surplus, "optimize")) == {("optimize", 9, "ok"): n}
    assert _count(_of(surplus, "restore")) == {("restore", 9, "ok"): n}
    if "pool_alloc" in attached:
        assert _count(_of(surplus, "pool_alloc")) == {("pool_alloc", 9, "ok"): n}
        assert _count(_of(surplus, "pool_free")) == {("pool_free", 9, "ok"): n}

    # demote of a runtime (optimized) 1 GiB page: restored, then split into 512 pages of 2 MiB
    assert "demote" in scen, res.get("demote_skipped")
    demote = scen["demote"]
    (big,) = [e for e in _of(demote, "optimize") if e["order"] == 18]
    assert big["result"] == "ok" and big["pfn"] % (1 << 18) == 0
    assert _count(_of(demote, "demote")) == {("demote", 18, "ok"): 1}
    assert [(e["order"], e["result"], e["pfn"]) for e in _of(demote, "restore") if e["order"] == 18] == [
        (18, "ok", big["pfn"])
    ]
    assert _of(demote, "demote")[0]["pfn"] == big["pfn"]
    if "pool_alloc" in attached:  # the 1 GiB page came in; its 512 pieces left when the pool shrank
        assert _count(_of(demote, "pool_alloc")) == {("pool_alloc", 18, "ok"): 1}
        assert _count(_of(demote, "pool_free")) == {("pool_free", 9, "ok"): 512}
        assert {e["pfn"] for e in _of(demote, "pool_free")} == {big["pfn"] + 512 * i for i in range(512)}
