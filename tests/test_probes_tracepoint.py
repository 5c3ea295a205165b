"""The tracepoint ProbeSet's user-space logic (no BPF): gigantic candidates, resync differences, and the
size of the BPF set of known hugetlb pages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from observer.kernel.facts import KernelFacts
from observer.probes.events import Event, EventType, Result
from observer.probes.infer import VmemmapInference
from observer.probes.tracepoint import TracepointProbeSet, known_frames
from tests.test_probes_kpageflags import HUGE, write_kpageflags

HOST = Path(__file__).parent / "fixtures" / "host-6.18"
GIG = 1 << 18


def pool_event(kind: EventType, pfn: int, order: int) -> Event:
    return Event(ts_ns=1, pfn=pfn, cgroup_id=1, duration_ns=0, tgid=7, tid=7, err=0, node=0, event=kind,
                 result=Result.OK, order=order, inferred=False, comm="sh")


def probe_set(root: Path) -> TracepointProbeSet:
    facts = KernelFacts(root=root)
    infer = VmemmapInference({9: 7, 18: 4095}, lambda: None, lambda: False, dict)  # no counters: inert
    ps = TracepointProbeSet(facts, infer)
    ps._next_check = float("inf")  # no consistency checks against the fixture's pool sizes
    return ps


def test_gigantic_candidate_confirmed_in_kpageflags_is_dispatched_at_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(HOST, root)
    write_kpageflags(root, 2 * GIG, [(GIG, 18, HUGE)], optimized=(GIG,))
    ps = probe_set(root)
    assert ps.observe(pool_event(EventType.POOL_ALLOC, GIG, 18))
    assert ps._known_count[18] == 1


def test_gigantic_candidate_freed_before_it_could_be_checked_is_released_with_its_free() -> None:
    ps = probe_set(HOST)  # no /proc/kpageflags in the fixture: nothing can be confirmed there
    alloc, free = pool_event(EventType.POOL_ALLOC, GIG, 18), pool_event(EventType.POOL_FREE, GIG, 18)
    two_mib = pool_event(EventType.POOL_ALLOC, 512, 9)
    assert not ps.observe(alloc)  # retracted for now
    assert ps.observe(two_mib)  # buddy allocations need no confirmation
    assert not ps.observe(free)  # held back so that it follows its allocation
    assert ps.pending(0) == [alloc, free]
    assert ps._known_count[18] == 0 and ps._known_count[9] == 1


def test_unconfirmed_gigantic_candidate_is_dropped_after_the_deadline() -> None:
    ps = probe_set(HOST)
    forgotten: list[tuple[int, int]] = []
    ps._forget = lambda pfn, order: forgotten.append((pfn, order))  # type: ignore[method-assign]
    assert not ps.observe(pool_event(EventType.POOL_ALLOC, GIG, 18))
    ps._candidates[GIG] = (ps._candidates[GIG][0], 0.0)  # deadline passed
    assert ps.pending(0) == []
    assert forgotten == [(GIG, 18)] and ps.retracted == 1


def test_resync_differences_become_inferred_demote_free_and_alloc() -> None:
    ps = probe_set(HOST)
    before = {GIG: 18, 2 * GIG: 18, 512: 9}
    after = {GIG + i * 512: 9 for i in range(512)} | {512: 9, 1024: 9}
    changes = ps._unseen_changes(before, after)
    assert [(e.event, e.pfn, e.order) for e in changes] == [
        (EventType.DEMOTE, GIG, 18),  # replaced by 2 MiB pages
        (EventType.POOL_FREE, 2 * GIG, 18),  # gone (freed page by page, or missed)
        (EventType.POOL_ALLOC, 1024, 9),  # appeared without an allocation event
    ]
    assert all(e.inferred and e.tgid == 0 and e.node == 0 for e in changes)


def test_the_known_set_has_a_slot_per_2mib_frame_up_to_twice_the_end_of_the_last_memory_block() -> None:
    facts = KernelFacts(root=HOST)  # memory0..memory199 of 128 MiB: physical addresses up to 25 GiB
    assert known_frames(facts, 9) == 2 * (25 * 512 + 1)
    assert known_frames(facts, 18) == 1024  # the floor


def test_without_memory_block_sysfs_the_known_set_covers_ram_and_the_pci_hole_twice(tmp_path: Path) -> None:
    end_pfn = os.sysconf("SC_PHYS_PAGES") + (4 << 30) // os.sysconf("SC_PAGE_SIZE")
    assert known_frames(KernelFacts(root=tmp_path), 9) == max(2 * ((end_pfn >> 9) + 1), 1024)
