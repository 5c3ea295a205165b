"""The reconciliation model with synthetic event sequences and kernel snapshots.

Figures are x86-64's: 4 KiB pages, 64-byte struct page, 2 MiB pages free 7 vmemmap pages, 1 GiB
pages 4,095; 98,304 vmemmap pages with nothing optimized (12 GiB of memory, as measured on the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from observer.baseline import split_by_node, split_saved_pages
from observer.model import RESTORES_DUE_GRACE_NS, HstateSpec, Model
from observer.probes.events import Event, EventType, Result
from observer.probes.session import Aggregates
from observer.snapshot import KernelSnapshot, PoolPages

FULL = 98_304
PAGE = 4096
SPECS = {"2048kB": HstateSpec("2048kB", 9, 7), "1048576kB": HstateSpec("1048576kB", 18, 4095)}
FREEABLE = {"2048kB": 7, "1048576kB": 4095}
SEC = 1_000_000_000


@dataclass
class Clock:
    now: int = 10 * SEC

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SEC)


class Kernel:
    """A pretend kernel: pools per (hstate, node) and how many of their pages are optimized."""

    def __init__(self, clock: Clock, counters: bool = True, sysctl: bool | None = True) -> None:
        self.clock = clock
        self.pools: dict[tuple[str, int], int] = {("2048kB", 0): 0, ("1048576kB", 0): 0}
        self.opt: dict[tuple[str, int], int] = {k: 0 for k in self.pools}
        self.counters = counters
        self.sysctl = sysctl

    def saved(self) -> int:
        return sum(n * FREEABLE[h] for (h, _), n in self.opt.items())

    def snap(self) -> KernelSnapshot:
        memmap = FULL - self.saved()
        return KernelSnapshot(
            taken_ns=self.clock.now,
            pools={k: PoolPages(v) for k, v in self.pools.items()},
            memmap_pages=memmap if self.counters else None,
            memmap_counters=(memmap - 90_000, 90_000) if self.counters else None,
            full_memmap_pages=FULL if self.counters else None,
            hvo_enabled=self.sysctl,
        )


def ev(clock: Clock, kind: EventType, hstate: str = "2048kB", result: Result = Result.OK,
       node: int | None = 0) -> Event:
    clock.advance(1e-6)  # time moves between any two events
    order = SPECS[hstate].order
    return Event(ts_ns=clock.now, pfn=0x100000, cgroup_id=1, duration_ns=2000, tgid=1, tid=1, err=0,
                 node=node, event=kind, result=result, order=order, inferred=False, comm="test")


def grow(model: Model, kernel: Kernel, clock: Clock, hstate: str, n: int, optimize: bool,
         node: int = 0) -> None:
    for _ in range(n):
        clock.advance(0.001)
        kernel.pools[(hstate, node)] = kernel.pools.get((hstate, node), 0) + 1
        model.on_event(ev(clock, EventType.POOL_ALLOC, hstate, node=node))
        if optimize:
            kernel.opt[(hstate, node)] = kernel.opt.get((hstate, node), 0) + 1
            model.on_event(ev(clock, EventType.OPTIMIZE, hstate, node=node))


def shrink(model: Model, kernel: Kernel, clock: Clock, hstate: str, n: int, node: int = 0) -> None:
    """The kernel frees unoptimized pages last here; each optimized one is restored first."""
    for _ in range(n):
        clock.advance(0.001)
        if kernel.opt[(hstate, node)]:
            kernel.opt[(hstate, node)] -= 1
            model.on_event(ev(clock, EventType.RESTORE, hstate, node=node))
        kernel.pools[(hstate, node)] -= 1
        model.on_event(ev(clock, EventType.POOL_FREE, hstate, node=node))


def settle(model: Model, kernel: Kernel, clock: Clock, agg: Aggregates | None = None) -> None:
    model.observe(kernel.snap(), agg)  # sees the last change
    clock.advance(1.2)
    model.observe(kernel.snap(), agg)


def start(kernel: Kernel, clock: Clock) -> Model:
    """A model whose start-up baseline is complete (taken, then a quiet moment passed)."""
    model = Model(SPECS, PAGE, settle_seconds=1.0, clock=clock)
    model.take_baseline(kernel.snap())
    settle(model, kernel, clock)
    return model


@pytest.fixture
def world() -> tuple[Model, Kernel, Clock]:
    clock = Clock()
    kernel = Kernel(clock)
    return start(kernel, clock), kernel, clock


def test_baseline_of_a_full_pool_is_exact_at_once() -> None:
    clock = Clock()
    kernel = Kernel(clock)
    kernel.pools = {("2048kB", 0): 16, ("1048576kB", 0): 1}
    kernel.opt = dict(kernel.pools)
    model = Model(SPECS, PAGE, clock=clock)
    info = model.take_baseline(kernel.snap())
    v = model.view()
    assert info.exact
    assert (v.optimized("2048kB"), v.optimized("1048576kB")) == (16, 1)
    assert v.expected_saved_pages == v.kernel_saved_pages == 16 * 7 + 4095
    assert v.drift_bytes == 0 and v.pending_drift_bytes == 0


def test_baseline_counts_a_partly_optimized_pool(world: tuple[Model, Kernel, Clock]) -> None:
    _, kernel, clock = world
    kernel.pools[("2048kB", 0)] = 64
    kernel.opt[("2048kB", 0)] = 8  # 56 pages allocated while the sysctl was off
    model = Model(SPECS, PAGE, clock=clock)
    assert model.take_baseline(kernel.snap()).exact
    assert model.view().optimized("2048kB") == 8


def test_grow_and_shrink_reconcile_to_zero_drift(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    grow(model, kernel, clock, "2048kB", 64, optimize=True)
    grow(model, kernel, clock, "1048576kB", 1, optimize=True)
    settle(model, kernel, clock)
    v = model.view()
    assert v.settled
    assert (v.optimized("2048kB"), v.optimized("1048576kB")) == (64, 1)
    assert v.expected_saved_pages == v.kernel_saved_pages == 64 * 7 + 4095
    assert v.drift_bytes == 0
    shrink(model, kernel, clock, "2048kB", 64)
    shrink(model, kernel, clock, "1048576kB", 1)
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.optimized("1048576kB"), v.drift_bytes) == (0, 0, 0)
    assert v.resyncs == 0


def test_in_flight_operations_raise_no_false_alarm(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    # The kernel has optimized 10 pages, the events are not consumed yet.
    kernel.pools[("2048kB", 0)] = 10
    kernel.opt[("2048kB", 0)] = 10
    model.observe(kernel.snap())
    clock.advance(0.5)
    model.observe(kernel.snap())
    v = model.view()
    assert not v.settled
    assert v.pending_drift_bytes == -70 * PAGE  # the raw difference is visible ...
    assert v.drift_bytes == 0  # ... but the published drift is the last quiet moment's
    for _ in range(10):
        model.on_event(ev(clock, EventType.OPTIMIZE))
    settle(model, kernel, clock)
    v = model.view()
    assert v.settled and v.drift_bytes == 0 and v.resyncs == 0


def test_drift_reveals_an_operation_no_event_reported(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    grow(model, kernel, clock, "2048kB", 4, optimize=True)
    clock.advance(0.01)
    kernel.pools[("2048kB", 0)] += 1
    kernel.opt[("2048kB", 0)] += 1  # optimized by a path no probe saw
    settle(model, kernel, clock)
    v = model.view()
    assert v.settled
    assert v.drift_bytes == -7 * PAGE  # the kernel freed more than the events explain
    assert v.resyncs == 0  # a possible state: reported, not papered over


def test_pages_allocated_with_the_sysctl_off_stay_unoptimized(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    kernel.sysctl = False
    grow(model, kernel, clock, "2048kB", 8, optimize=False)
    settle(model, kernel, clock)
    kernel.sysctl = True
    grow(model, kernel, clock, "2048kB", 8, optimize=True)
    settle(model, kernel, clock)
    v = model.view()
    assert (v.pool_pages("2048kB"), v.optimized("2048kB"), v.drift_bytes) == (16, 8, 0)
    shrink(model, kernel, clock, "2048kB", 16)
    settle(model, kernel, clock)
    v = model.view()
    assert (v.pool_pages("2048kB"), v.optimized("2048kB"), v.drift_bytes) == (0, 0, 0)


def test_failed_restore_keeps_the_page_optimized(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    grow(model, kernel, clock, "2048kB", 2, optimize=True)
    settle(model, kernel, clock)
    # Shrinking one page: the restore fails with -ENOMEM, the page stays as a surplus page.
    model.on_event(ev(clock, EventType.RESTORE, result=Result.ERROR))
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.drift_bytes, v.resyncs) == (2, 0, 0)
    assert v.counts == {}  # aggregates come from the probe session, not from events


def test_lost_events_trigger_one_counted_resync_when_quiet(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    grow(model, kernel, clock, "2048kB", 10, optimize=True)
    # 5 more pages whose records were lost: the kernel has them, the model does not.
    clock.advance(0.01)
    kernel.pools[("2048kB", 0)] += 5
    kernel.opt[("2048kB", 0)] += 5
    lost = Aggregates(counts={(EventType.OPTIMIZE, 9, Result.OK): 15}, lost=5)
    model.observe(kernel.snap(), lost)
    assert model.view().resyncs == 0  # not while busy
    settle(model, kernel, clock, lost)
    v = model.view()
    assert (v.resyncs, v.optimized("2048kB"), v.drift_bytes, v.events_lost) == (1, 15, 0, 5)
    assert v.last_resync is not None and "lost" in v.last_resync[0]
    settle(model, kernel, clock, lost)  # the same loss does not resync again
    assert model.view().resyncs == 1


def test_events_older_than_the_baseline_are_not_counted_twice() -> None:
    clock = Clock()
    kernel = Kernel(clock)
    kernel.pools[("2048kB", 0)] = 3
    kernel.opt[("2048kB", 0)] = 3
    early = [ev(clock, EventType.OPTIMIZE) for _ in range(3)]  # attached before the baseline reading
    clock.advance(0.01)
    model = Model(SPECS, PAGE, clock=clock)
    model.take_baseline(kernel.snap())
    for e in early:  # still in the ring buffer when the main loop starts
        model.on_event(e)
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.drift_bytes, v.resyncs) == (3, 0, 0)


def test_provisional_baseline_is_retaken_when_start_up_raced_an_operation() -> None:
    clock = Clock()
    kernel = Kernel(clock)
    kernel.pools[("2048kB", 0)] = 4
    kernel.opt[("2048kB", 0)] = 4
    model = Model(SPECS, PAGE, clock=clock)
    model.take_baseline(kernel.snap())
    # The baseline reading cut an operation in half: the optimize of page 5 had already changed the
    # counters, but its event carries a later time stamp.
    clock.advance(0.001)
    kernel.pools[("2048kB", 0)] = 5
    kernel.opt[("2048kB", 0)] = 5
    model.on_event(ev(clock, EventType.OPTIMIZE))
    model.on_event(ev(clock, EventType.OPTIMIZE))  # counted twice: the model says 6
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.drift_bytes) == (5, 0)
    assert v.resyncs == 0  # completing the start-up baseline is not a resync
    assert v.baseline is not None and not v.baseline.provisional


def test_impossible_counts_resync_and_are_counted(world: tuple[Model, Kernel, Clock]) -> None:
    _, kernel, clock = world
    kernel.pools[("2048kB", 0)] = 3
    kernel.opt[("2048kB", 0)] = 3
    model = start(kernel, clock)
    assert model.view().optimized("2048kB") == 3
    for _ in range(4):  # four restores of three optimized pages
        model.on_event(ev(clock, EventType.RESTORE))
    kernel.opt[("2048kB", 0)] = 0
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.resyncs, v.drift_bytes) == (0, 1, 0)
    assert v.last_resync is not None and "inconsistent" in v.last_resync[0]


def test_ambiguous_mixed_pools_are_reported_as_not_exact() -> None:
    clock = Clock()
    kernel = Kernel(clock)
    kernel.pools = {("2048kB", 0): 600, ("1048576kB", 0): 1}
    kernel.opt = {("2048kB", 0): 0, ("1048576kB", 0): 1}  # saves 4095 = 585 x 7
    model = Model(SPECS, PAGE, clock=clock)
    info = model.take_baseline(kernel.snap())
    assert not info.exact and info.candidates == 2
    v = model.view()
    assert (v.optimized("2048kB"), v.optimized("1048576kB")) == (0, 1)  # all-or-nothing pools win
    assert v.drift_bytes == 0  # either split explains the bytes


def test_without_vmemmap_counters_pages_are_reconciled_by_count() -> None:
    clock = Clock()
    kernel = Kernel(clock, counters=False, sysctl=True)
    kernel.pools[("2048kB", 0)] = 4
    model = start(kernel, clock)
    info = model.view().baseline
    assert info is not None and not info.exact and "6.11" in info.note
    v = model.view()
    assert not v.byte_truth and v.drift_bytes is None and v.kernel_saved_pages is None
    assert v.optimized("2048kB") == 4  # HVO is on: assumed optimized
    shrink(model, kernel, clock, "2048kB", 4)
    for _ in range(2):  # two restores of four pages: the assumption was wrong, or two more are coming
        model.on_event(ev(clock, EventType.RESTORE))
    settle(model, kernel, clock)
    assert model.view().optimized("2048kB") == 2 and not model.view().inconsistent  # waiting for them
    clock.advance(RESTORES_DUE_GRACE_NS / SEC)
    model.observe(kernel.snap())
    v = model.view()
    assert v.optimized("2048kB") == 0 and v.inconsistent and v.resyncs == 0


@pytest.mark.parametrize("counters", [True, False])
def test_restores_that_come_late_after_the_pool_shrank_leave_the_books_exact(counters: bool) -> None:
    """The kernel takes pages out of the pool before it restores their vmemmap: a quiet moment can
    fall in between (the writer descheduled for longer than the settle window). The books must
    wait for the restores, not clamp or resync to the pool and then miscount them."""
    clock = Clock()
    kernel = Kernel(clock, counters=counters, sysctl=True)
    kernel.pools[("2048kB", 0)] = kernel.opt[("2048kB", 0)] = 520
    model = start(kernel, clock)
    assert model.view().optimized("2048kB") == 520
    kernel.pools[("2048kB", 0)] = 8  # 512 pages out of the pool, their vmemmap not restored yet
    settle(model, kernel, clock)
    clock.advance(5)  # five quiet seconds: five settle windows
    model.observe(kernel.snap())
    for _ in range(512):
        clock.advance(0.001)
        kernel.opt[("2048kB", 0)] -= 1
        model.on_event(ev(clock, EventType.RESTORE))
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.inconsistent, v.resyncs) == (8, "", 0)
    assert v.drift_bytes == (0 if counters else None)


def test_restores_the_counters_already_show_are_not_waited_for() -> None:
    """Pages out of the pool, and the counters say the kernel restored them, but no restore event
    came (a mode that infers them, records that never arrive): resync at the first quiet moment."""
    clock = Clock()
    kernel = Kernel(clock)
    kernel.pools[("2048kB", 0)] = kernel.opt[("2048kB", 0)] = 16
    model = start(kernel, clock)
    kernel.pools[("2048kB", 0)] = kernel.opt[("2048kB", 0)] = 0
    settle(model, kernel, clock)
    v = model.view()
    assert (v.optimized("2048kB"), v.resyncs, v.drift_bytes) == (0, 1, 0)


def test_node_is_taken_from_the_pool_when_the_event_has_none(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    kernel.pools = {("2048kB", 0): 0, ("2048kB", 1): 2, ("1048576kB", 0): 0}
    kernel.opt = {k: 0 for k in kernel.pools}
    model.observe(kernel.snap())
    kernel.opt[("2048kB", 1)] = 2
    model.on_event(ev(clock, EventType.OPTIMIZE, node=None))
    model.on_event(ev(clock, EventType.OPTIMIZE, node=None))
    settle(model, kernel, clock)
    v = model.view()
    assert {(p.hstate, p.node): p.optimized for p in v.pools}[("2048kB", 1)] == 2
    assert v.drift_bytes == 0


def test_aggregates_survive_a_probe_restart(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    key = (EventType.OPTIMIZE, 9, Result.OK)
    hist = {(EventType.OPTIMIZE, 9): [1] * 64}
    model.observe(kernel.snap(), Aggregates(counts={key: 5}, hist=hist, lost=2))
    assert model.view().resyncs == 1  # the kernel is quiet: the loss is repaired at once
    model.session_restarted()
    model.observe(kernel.snap(), Aggregates(counts={key: 3}, hist=hist, lost=0))
    v = model.view()
    assert v.counts[key] == 8 and v.hist[(EventType.OPTIMIZE, 9)][0] == 2 and v.events_lost == 2
    assert v.resyncs == 2  # the restarted probes missed the gap: recomputed once more
    settle(model, kernel, clock)
    assert model.view().resyncs == 2


def test_split_rules() -> None:
    assert split_saved_pages(0, {"2048kB": 10}, FREEABLE).counts == {"2048kB": 0}
    s = split_saved_pages(70, {"2048kB": 10, "1048576kB": 0}, FREEABLE)
    assert s.exact and s.counts == {"2048kB": 10, "1048576kB": 0}
    s = split_saved_pages(4095 + 585 * 7, {"2048kB": 585, "1048576kB": 2}, FREEABLE)
    assert not s.exact and s.candidates == 2 and s.counts == {"2048kB": 0, "1048576kB": 2}
    s = split_saved_pages(71, {"2048kB": 10}, FREEABLE)
    assert not s.exact and s.residual_pages == 1 and s.counts == {"2048kB": 10}
    assert split_by_node(3, {0: 4}) == ({0: 3}, True)
    assert split_by_node(6, {0: 4, 1: 2}) == ({0: 4, 1: 2}, True)
    assert split_by_node(3, {0: 4, 1: 2}) == ({0: 2, 1: 1}, False)


def test_generation_moves_only_when_the_view_changes(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    first = model.view()
    for _ in range(5):  # an idle kernel read again and again: nothing to recompute
        clock.advance(0.2)
        model.observe(kernel.snap(), Aggregates())
    again = model.view()
    assert again.generation == first.generation
    assert again.now_ns > first.now_ns and again.quiet_seconds > first.quiet_seconds  # the clock still runs
    assert again.counts is first.counts  # the same generation's figures are not rebuilt

    grow(model, kernel, clock, "2048kB", 1, optimize=True)  # events
    assert model.view().generation > again.generation
    settle(model, kernel, clock)
    settled = model.view()
    assert settled.settled and settled.optimized("2048kB") == 1

    kernel.sysctl = False  # a reading that differs, with no event
    model.observe(kernel.snap())
    assert model.view().generation > settled.generation and model.view().hvo_enabled is False

    before = model.view().generation
    model.observe(kernel.snap(), Aggregates(counts={(EventType.OPTIMIZE, 9, Result.OK): 1}))
    assert model.view().generation > before  # new aggregates
    assert model.view().counts == {(EventType.OPTIMIZE, 9, Result.OK): 1}


def test_views_of_one_generation_equal_a_fresh_build(world: tuple[Model, Kernel, Clock]) -> None:
    model, kernel, clock = world
    grow(model, kernel, clock, "1048576kB", 1, optimize=True)
    settle(model, kernel, clock)
    model.view()
    clock.advance(0.2)
    model.observe(kernel.snap())  # changes nothing: the next view comes from the cache
    cached = model.view()
    model._view = None  # what view() would compute without the cache
    fresh = model.view()
    assert cached.generation == fresh.generation
    assert cached == fresh


def test_a_quiet_moment_is_judged_at_the_instant_its_aggregates_were_chosen(
        world: tuple[Model, Kernel, Clock]) -> None:
    """The daemon asks settle_due() whether to read fresh aggregates, reads the snapshot, then calls
    observe(): with one instant for both, a quiet moment never settles on aggregates read before the
    last event (a slow snapshot read in between used to let it)."""
    model, kernel, clock = world
    grow(model, kernel, clock, "2048kB", 4, optimize=True)
    model.observe(kernel.snap())
    clock.advance(0.99)  # just short of the 1 s settle window
    judged_at = clock.now
    due, quiet_since = model.settle_due(judged_at)
    assert not due and quiet_since < judged_at
    clock.advance(0.05)  # the snapshot read took long: the window has passed by now
    model.observe(kernel.snap(), None, judged_at)
    assert not model.view().settled  # judged when the aggregates were not due: not settled
    assert model.settle_due(clock.now)[0]
    model.observe(kernel.snap(), Aggregates(counts={(EventType.OPTIMIZE, 9, Result.OK): 4}), clock.now)
    v = model.view()
    assert v.settled and v.counts[(EventType.OPTIMIZE, 9, Result.OK)] == 4
