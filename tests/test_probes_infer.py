"""Inferred optimize/restore (tracepoint mode) against simulated vmemmap counters.

The simulated kernel behaves like 6.18 as measured on the host: a grow allocates every page of the
request before optimizing them as a batch (-7 per 2 MiB page, -4,095 per 1 GiB page); a shrink
restores the batch before the first page is freed.
"""

from __future__ import annotations

import errno

from observer.kernel.vmstat import MemmapCounters
from observer.probes.events import Event, EventType, Result
from observer.probes.infer import MS, PoolState, VmemmapInference

F = {9: 7, 18: 4095}
BASELINE = 98304


class FakeKernel:
    def __init__(self) -> None:
        self.total = BASELINE
        self.sysctl: bool | None = False
        self.pools = {9: PoolState(0, 0, 0, 0), 18: PoolState(0, 0, 0, 0)}
        self.now = 1_000 * MS

    def counters(self) -> MemmapCounters:
        return MemmapCounters(memmap_pages=0, memmap_boot_pages=self.total)

    def clock(self) -> int:
        return self.now

    def inference(self) -> VmemmapInference:
        return VmemmapInference(F, self.counters, lambda: self.sysctl, lambda: dict(self.pools), BASELINE,
                                clock=self.clock)


def ev(kind: EventType, pfn: int, order: int = 9, pid: int = 42) -> Event:
    return Event(ts_ns=pfn, pfn=pfn, cgroup_id=1, duration_ns=0, tgid=pid, tid=pid, err=0, node=0, event=kind,
                 result=Result.OK, order=order, inferred=False, comm="writer")


def run_until_settled(k: FakeKernel, inf: VmemmapInference, step_ms: int = 10,
                      limit_ms: int = 5000) -> list[Event]:
    out: list[Event] = []
    for _ in range(limit_ms // step_ms):
        k.now += step_ms * MS
        out += inf.poll()
        if not inf.busy:
            break
    return out


def summary(events: list[Event]) -> list[tuple[str, int, int, str]]:
    return [(e.event.label, e.pfn, e.order, e.result.label) for e in events]


def test_batched_grow_then_shrink_with_hvo_on() -> None:
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    pfns = [512 * i for i in range(1, 33)]
    for p in pfns:
        inf.note(ev(EventType.POOL_ALLOC, p))
        k.now += 1 * MS
        assert inf.poll() == []  # nothing before the window is quiet
    k.now += 30 * MS
    k.total -= 7 * len(pfns)  # the kernel optimizes the batch after the last allocation
    out = run_until_settled(k, inf)
    assert summary(out) == [("optimize", p, 9, "ok") for p in pfns]
    assert all(e.inferred and e.tgid == 42 and e.comm == "writer" for e in out)

    k.total += 7 * len(pfns)  # restored before the first free event
    k.now += 5 * MS
    for p in pfns:
        inf.note(ev(EventType.POOL_FREE, p))
    out = run_until_settled(k, inf)
    assert summary(out) == [("restore", p, 9, "ok") for p in pfns]
    assert inf.unexplained_pages == 0


def test_sysctl_off_gives_skipped_optimizations_and_no_restores() -> None:
    k = FakeKernel()
    inf = k.inference()
    inf.seed({})
    inf.note(ev(EventType.POOL_ALLOC, 512))
    inf.note(ev(EventType.POOL_ALLOC, 1 << 18, 18))
    out = run_until_settled(k, inf)
    assert summary(out) == [("optimize", 512, 9, "skipped"), ("optimize", 1 << 18, 18, "skipped")]
    inf.note(ev(EventType.POOL_FREE, 512))
    inf.note(ev(EventType.POOL_FREE, 1 << 18, 18))
    assert run_until_settled(k, inf) == []


def test_2m_and_1g_in_one_window_are_told_apart() -> None:
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    for p in (512, 1024, 1536):
        inf.note(ev(EventType.POOL_ALLOC, p))
    inf.note(ev(EventType.POOL_ALLOC, 1 << 18, 18))
    k.total -= 3 * 7 + 4095
    out = run_until_settled(k, inf)
    assert [(e.order, e.result) for e in out] == [(9, Result.OK)] * 3 + [(18, Result.OK)]


def test_counter_change_arriving_late_is_waited_for() -> None:
    """The quiet period passes, but the counter is still moving: settle only once it is stable."""
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    for p in (512, 1024):
        inf.note(ev(EventType.POOL_ALLOC, p))
    k.now += 150 * MS
    k.total -= 7  # the batch is half done at the first sample
    assert inf.poll() == []
    k.now += 5 * MS
    k.total -= 7
    assert inf.poll() == []  # changed since the last sample: not stable yet
    out = run_until_settled(k, inf)
    assert [e.result for e in out] == [Result.OK, Result.OK]


def test_partial_optimization_marks_the_rest_skipped() -> None:
    """E.g. memmap_on_memory pages or ENOMEM while splitting the vmemmap PMD: fewer pages freed."""
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    for p in (512, 1024, 1536):
        inf.note(ev(EventType.POOL_ALLOC, p))
    k.total -= 14
    out = run_until_settled(k, inf)
    assert [e.result for e in out] == [Result.OK, Result.OK, Result.SKIPPED]
    # only the two optimized ones restore when freed
    k.total += 14
    for p in (512, 1024, 1536):
        inf.note(ev(EventType.POOL_FREE, p))
    assert summary(run_until_settled(k, inf)) == [("restore", 512, 9, "ok"), ("restore", 1024, 9, "ok")]


def test_pages_present_at_start_take_their_state_from_the_counters() -> None:
    k = FakeKernel()
    k.total = BASELINE - 2 * 7 - 4095  # two 2 MiB and one 1 GiB page optimized before we started
    inf = k.inference()
    inf.seed({512: 9, 1024: 9, 1 << 18: 18})
    assert set(inf.state.values()) == {True}
    k.total += 7
    inf.note(ev(EventType.POOL_FREE, 512))
    assert summary(run_until_settled(k, inf)) == [("restore", 512, 9, "ok")]


def test_unknown_start_state_is_resolved_from_the_delta() -> None:
    k = FakeKernel()
    k.total = BASELINE - 7  # one of the two pages present at start is optimized: which one is unknown
    inf = k.inference()
    inf.seed({512: 9, 1024: 9})
    assert set(inf.state.values()) == {None}
    inf.note(ev(EventType.POOL_FREE, 512))
    assert run_until_settled(k, inf) == []  # counter unchanged: that one was not optimized
    k.total += 7
    inf.note(ev(EventType.POOL_FREE, 1024))
    assert summary(run_until_settled(k, inf)) == [("restore", 1024, 9, "ok")]


def test_page_allocated_and_freed_in_one_window_follows_the_sysctl() -> None:
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    inf.note(ev(EventType.POOL_ALLOC, 512))
    inf.note(ev(EventType.POOL_FREE, 512))  # optimize and restore cancel out in the counter
    out = run_until_settled(k, inf)
    assert summary(out) == [("optimize", 512, 9, "ok"), ("restore", 512, 9, "ok")]


def test_drift_without_pool_events_is_not_attributed_to_a_later_window() -> None:
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    k.total -= 511  # a demote: 1 GiB restored, 512 x 2 MiB optimized, no pool event
    for _ in range(60):
        k.now += 100 * MS
        assert inf.poll() == []
    assert inf.drifts == 1 and inf.unexplained_pages == 511
    inf.note(ev(EventType.POOL_ALLOC, 512))
    k.total -= 7
    assert summary(run_until_settled(k, inf)) == [("optimize", 512, 9, "ok")]


def test_restore_before_the_free_event_counts_for_that_free() -> None:
    """An idle sample between the restore and the free event must not move the baseline."""
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    inf.note(ev(EventType.POOL_ALLOC, 512))
    k.total -= 7
    run_until_settled(k, inf)
    k.total += 7  # restore of a long bulk free...
    for _ in range(5):
        k.now += 100 * MS
        assert inf.poll() == []  # ...idle samples see it...
    inf.note(ev(EventType.POOL_FREE, 512))  # ...before the free event arrives
    assert summary(run_until_settled(k, inf)) == [("restore", 512, 9, "ok")]


def test_restore_failure_shows_as_a_free_surplus_page() -> None:
    k = FakeKernel()
    k.sysctl = True
    k.pools[9] = PoolState(nr=4, free=4, surplus=0, resv=0)
    inf = k.inference()
    inf.seed({512: 9, 1024: 9, 1536: 9, 2048: 9})
    # shrink to 2: one page freed, one restore fails and the page stays as a free surplus page
    k.pools[9] = PoolState(nr=3, free=3, surplus=1, resv=0)
    inf.note(ev(EventType.POOL_FREE, 512))
    out = run_until_settled(k, inf)
    for _ in range(10):  # the failure is reported once a second reading confirms the pool state
        k.now += 100 * MS
        out += inf.poll()
    errors = [e for e in out if e.result is Result.ERROR]
    assert len(errors) == 1 and errors[0].event is EventType.RESTORE and errors[0].err == errno.ENOMEM
    assert errors[0].tgid == 42  # attributed to the task of the shrink


def test_a_surplus_reservation_caught_half_way_is_no_restore_failure() -> None:
    """gather_surplus_pages() allocates surplus pages (surplus and nr rise) before it enqueues and
    reserves them; a reading in between shows a free surplus page that is reserved a moment later."""
    k = FakeKernel()
    k.pools[9] = PoolState(nr=2, free=2, surplus=0, resv=0)  # two free pages nobody reserved
    inf = k.inference()
    inf.seed({512: 9, 1024: 9})
    out: list[Event] = []
    # a mapping reserves 3 pages: one surplus page allocated, not yet reserved (one reading sees this)
    k.pools[9] = PoolState(nr=3, free=2, surplus=1, resv=0)
    k.now += 500 * MS
    out += inf.poll()
    k.pools[9] = PoolState(nr=3, free=3, surplus=1, resv=3)  # enqueued and reserved
    for _ in range(20):
        k.now += 100 * MS
        out += inf.poll()
    assert [e for e in out if e.result is Result.ERROR] == []


def test_reserved_surplus_pages_are_not_restore_failures() -> None:
    k = FakeKernel()
    inf = k.inference()
    inf.seed({})
    k.pools[9] = PoolState(nr=2, free=2, surplus=2, resv=2)  # overcommit pages reserved by a mapping
    for _ in range(10):
        k.now += 100 * MS
        assert inf.poll() == []


def test_no_counters_before_6_11_means_no_inference() -> None:
    inf = VmemmapInference(F, lambda: None, lambda: True, dict, BASELINE)
    inf.note(ev(EventType.POOL_ALLOC, 512))
    assert not inf.enabled and inf.poll(10**12) == [] and not inf.busy


def test_a_descheduled_batch_is_waited_for_not_called_skipped() -> None:
    """Half the batch optimized, then the writer is descheduled for a second: still all optimized."""
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    for p in (512, 1024):
        inf.note(ev(EventType.POOL_ALLOC, p))
    k.total -= 7
    out: list[Event] = []
    for _ in range(100):  # one second of stable, unexpected counters
        k.now += 10 * MS
        out += inf.poll()
    assert out == [] and inf.busy
    k.total -= 7
    assert [e.result for e in run_until_settled(k, inf)] == [Result.OK, Result.OK]


def test_after_patience_a_short_count_is_settled_as_skipped() -> None:
    k = FakeKernel()
    k.sysctl = True
    inf = k.inference()
    inf.seed({})
    for p in (512, 1024):
        inf.note(ev(EventType.POOL_ALLOC, p))
    k.total -= 7
    out = run_until_settled(k, inf, limit_ms=10_000)
    assert [e.result for e in out] == [Result.OK, Result.SKIPPED]
