"""Optimize/restore inferred from the vmemmap counters, for tracepoint mode (no hook in HVO code).

HVO changes ``nr_memmap_pages + nr_memmap_boot_pages`` (/proc/vmstat, 6.11+, global atomics, so
exact and immediate): optimizing one huge page lowers the sum by the hstate's freeable count
(7 for 2 MiB, 4,095 for 1 GiB on x86-64), restoring raises it by as much. Pool events tell which
pages could have changed it; the counter delta tells how many did.

Settling (why not attribute per event): the kernel does not change the counter at the pool event.
6.7+ grows the pool by allocating every page of one request first and optimizing them as a batch
afterwards (prep_and_add_allocated_folios); a shrink restores the whole batch before freeing any
page (update_and_free_pages_bulk), i.e. before the first mm_page_free; and user space sees events
some time after they happened. So pool events are collected in a *window*; it closes once no pool
event has arrived for ``quiet``, two counter samples ``stable`` apart agree, and either the counter
moved as the sysctl predicts (every allocation optimized or none, known pages restored) or it has
not moved for ``patience`` (a loaded machine can deschedule the writer between its allocations and
the batch optimization: settling on the first stable sample would call those pages skipped). The
delta since the previous settle point is then split over the window's pages (``_attribute``). The
baseline is NOT moved by idle samples while a change is young: a restore that happened just before
its free event was seen belongs to the next window. A change that persists for ``drift`` without any pool
event (demote, memory hotplug, a free we missed) is accepted as unexplained and the baseline moves.

Splitting a delta: pages whose optimized state we know (allocated while we watched) restore
exactly their freeable count when freed. Pages that existed before the observer have an unknown
state unless the start-up total says all or none were optimized. Optimized allocations and
restored unknown frees are chosen greedily, largest hstate first. Ambiguities we cannot resolve:
a page allocated and freed within one window leaves no net trace (we assume it followed the sysctl);
unknown-state frees mixed with allocations in one window use the sysctl as the prior for the
allocations; which pages of one order were skipped when only some were optimized is unknowable
(the first ones in the window are marked optimized).

Restore failures (-ENOMEM): the kernel keeps the page as a *free surplus* page instead of freeing it
(no mm_page_free, no kernel message). Free surplus pages do not otherwise persist (a surplus page
that becomes free is freed at once), except reserved ones, so a rise of
``max(0, min(surplus, free - resv))`` of an hstate is reported as that many restore errors (ENOMEM),
without pfn (unknowable here), once two readings ``confirm_ns`` apart agree (``_restore_failures``).
Not seen: a failure whose page is then successfully freed by a retry before we sample (6.7+ bulk
frees retry one by one), and failures of demote/dissolve paths.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from observer.errors import ObserverError
from observer.kernel.vmstat import MemmapCounters
from observer.probes.events import Event, EventType, Result

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

MS = 1_000_000


@dataclass(frozen=True)
class PoolState:
    nr: int
    free: int
    surplus: int
    resv: int

    @property
    def free_surplus(self) -> int:
        return max(0, min(self.surplus, self.free - self.resv))


def inferred(event: Event, kind: EventType, result: Result, err: int = 0) -> Event:
    """An inferred optimize/restore attributed to the page and task of a pool event."""
    return replace(event, event=kind, result=result, err=err, duration_ns=0, inferred=True,
                   kernel_counted=False)


def _restore_error(order: int, ts_ns: int, like: Event | None) -> Event:
    if like is not None:
        return replace(like, event=EventType.RESTORE, result=Result.ERROR, err=errno.ENOMEM, pfn=0,
                       node=None, duration_ns=0, inferred=True, ts_ns=ts_ns, kernel_counted=False)
    return Event(ts_ns=ts_ns, pfn=0, cgroup_id=0, duration_ns=0, tgid=0, tid=0, err=errno.ENOMEM, node=None,
                 event=EventType.RESTORE, result=Result.ERROR, order=order, inferred=True, comm="")


class VmemmapInference:
    def __init__(
        self,
        freeable: dict[int, int],
        read_counters: Callable[[], MemmapCounters | None],
        read_sysctl: Callable[[], bool | None],
        read_pools: Callable[[], dict[int, PoolState]],
        baseline_total: int | None = None,
        *,
        quiet_ns: int = 100 * MS,
        stable_ns: int = 20 * MS,
        patience_ns: int = 2000 * MS,
        drift_ns: int = 2000 * MS,
        idle_ns: int = 500 * MS,
        max_window_ns: int = 10_000 * MS,
        confirm_ns: int = 200 * MS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.freeable = freeable  # order -> vmemmap pages HVO frees per huge page
        self._read_counters = read_counters
        self._read_sysctl = read_sysctl
        self._read_pools = read_pools
        self.baseline_total = baseline_total  # vmemmap pages with nothing optimized
        self.quiet_ns, self.stable_ns, self.drift_ns = quiet_ns, stable_ns, drift_ns
        self.patience_ns = patience_ns
        self.idle_ns, self.max_window_ns = idle_ns, max_window_ns
        self.confirm_ns = confirm_ns
        self._clock = clock
        counters = read_counters()
        self.enabled = counters is not None
        self.base_total = counters.total if counters else 0
        self.state: dict[int, bool | None] = {}  # pfn -> optimized? (None: unknown)
        self.window: list[Event] = []
        self._window_open_ns = 0
        self._last_note_ns = 0
        self._sysctl_open: bool | None = None
        self._settle_sample: tuple[int, int] | None = None
        self._drift_since: int | None = None
        self._next_idle = 0
        self._pools = self._safe_pools()  # the last pool reading confirmed by a second one
        self._pools_seen: tuple[int, dict[int, PoolState]] | None = None  # a new reading, since when
        self._failure_like: dict[int, Event] = {}  # the last frees per order, for attributing failures
        self.unexplained_pages = 0  # counter changes attributed to no pool event
        self.drifts = 0

    @classmethod
    def for_facts(cls, facts: KernelFacts) -> VmemmapInference:
        from observer.geometry import baseline_memmap_pages, geometry_for

        freeable = {g.order: g.freeable_vmemmap_pages for g in geometry_for(facts).values()}
        baseline = None
        with contextlib.suppress(ObserverError):
            baseline = baseline_memmap_pages(facts.memory_layout(), facts.struct_page_size or 64,
                                             facts.page_size)

        def pools() -> dict[int, PoolState]:
            return {h.order: PoolState(h.nr_hugepages, h.free_hugepages, h.surplus_hugepages,
                                       h.resv_hugepages) for h in facts.hstates()}

        from observer.vmemmap_truth import hotplug_neutral_counters

        counters = hotplug_neutral_counters(facts.memmap_counters, facts.root, facts.struct_page_size or 64,
                                            facts.page_size)
        return cls(freeable, counters, facts.hvo_sysctl, pools, baseline)

    @property
    def busy(self) -> bool:
        return bool(self.window)

    # --- page states ---------------------------------------------------------------------------
    def seed(self, heads: dict[int, int]) -> None:
        """Pages present at start: optimized if the counters say all are, not if none are, else unknown."""
        self.state = dict.fromkeys(heads, self._initial_state(heads))

    def reseed(self, heads: dict[int, int]) -> None:
        self.state = {pfn: self.state.get(pfn) for pfn in heads}

    def _initial_state(self, heads: dict[int, int]) -> bool | None:
        if not self.enabled or self.baseline_total is None:
            return None
        saved = self.baseline_total - self.base_total
        if saved == 0:
            return False
        if saved == sum(self.freeable.get(o, 0) for o in heads.values()):
            return True
        return None

    # --- events ---------------------------------------------------------------------------------
    def note(self, event: Event) -> None:
        if not self.enabled or event.result is not Result.OK:
            return
        if event.event not in (EventType.POOL_ALLOC, EventType.POOL_FREE):
            return
        now = self._clock()
        if not self.window:
            self._window_open_ns = now
            self._sysctl_open = self._read_sysctl()
        self.window.append(event)
        self._last_note_ns = now
        self._settle_sample = None

    def poll(self, now_ns: int | None = None) -> list[Event]:
        if not self.enabled:
            return []
        now = self._clock() if now_ns is None else now_ns
        if self.window:
            return self._try_settle(now)
        if now >= self._next_idle:
            self._next_idle = now + self.idle_ns
            return self._idle(now)
        return []

    def _try_settle(self, now: int) -> list[Event]:
        overdue = now - self._window_open_ns >= self.max_window_ns
        if now - self._last_note_ns < self.quiet_ns and not overdue:
            return []
        counters = self._read_counters()
        total = counters.total if counters else self.base_total
        sample = self._settle_sample
        if sample is None or sample[1] != total:
            self._settle_sample = (now, total)
            if not overdue:
                return []
        elif now - sample[0] < self.stable_ns:
            return []
        elif (not overdue and now - sample[0] < self.patience_ns
              and self.base_total - total != self._expected_saved()):
            return []  # not what the sysctl predicts: the kernel may still be busy, give it time
        if overdue:
            log.warning("vmemmap inference: pool events for %.1f s without a pause; attributing now",
                        (now - self._window_open_ns) / 1e9)
        return self._settle(total, now)

    def _idle(self, now: int) -> list[Event]:
        counters = self._read_counters()
        if counters is not None:
            if counters.total == self.base_total:
                self._drift_since = None
            elif self._drift_since is None:
                self._drift_since = now
            elif now - self._drift_since >= self.drift_ns:
                change = counters.total - self.base_total
                log.info("vmemmap changed by %+d pages with no pool event (demote, hotplug, missed event?)",
                         change)
                self.unexplained_pages += abs(change)
                self.drifts += 1
                self.base_total = counters.total
                self._drift_since = None
        return self._restore_failures(now, None)

    # --- attribution ----------------------------------------------------------------------------
    def _settle(self, total: int, now: int) -> list[Event]:
        window, self.window = self.window, []
        self._settle_sample = None
        self._drift_since = None
        saved = self.base_total - total
        self.base_total = total
        prior = bool(self._sysctl_open) or bool(self._read_sysctl())
        optimized, restored = self._attribute(window, saved, prior)
        out: list[Event] = []
        for i, ev in enumerate(window):
            if ev.event is EventType.POOL_ALLOC:
                ok = i in optimized
                self.state[ev.pfn] = ok
                out.append(inferred(ev, EventType.OPTIMIZE, Result.OK if ok else Result.SKIPPED))
            else:
                self.state.pop(ev.pfn, None)
                if i in restored:
                    out.append(inferred(ev, EventType.RESTORE, Result.OK))
        last_free = {ev.order: ev for ev in window if ev.event is EventType.POOL_FREE}
        out += self._restore_failures(now, last_free)
        return out

    def _expected_saved(self) -> int | None:
        """Net vmemmap pages the window should free if every allocation followed the sysctl and
        every freed page restored what we know it saved; None when a freed page's state is unknown."""
        prior = bool(self._sysctl_open) or bool(self._read_sysctl())
        allocated: dict[int, int] = {}
        saved = 0
        for ev in self.window:
            if ev.event is EventType.POOL_ALLOC:
                allocated[ev.pfn] = ev.order
            elif allocated.pop(ev.pfn, None) is None:
                state = self.state.get(ev.pfn)
                if state is None:
                    return None
                saved -= self.freeable.get(ev.order, 0) if state else 0
        if prior:
            saved += sum(self.freeable.get(o, 0) for o in allocated.values())
        return saved

    def _attribute(self, window: list[Event], saved: int, prior: bool) -> tuple[set[int], set[int]]:
        """Indices of allocations that were optimized and of frees that restored, given ``saved``
        (vmemmap pages freed net over the window; negative when restores dominate)."""
        f = self.freeable
        optimized: set[int] = set()
        restored: set[int] = set()
        alloc_at: dict[int, int] = {}
        unknown: list[int] = []  # frees of pages whose state is unknown
        for i, ev in enumerate(window):
            if ev.event is EventType.POOL_ALLOC:
                alloc_at[ev.pfn] = i
                continue
            j = alloc_at.pop(ev.pfn, None)
            if j is not None:  # allocated and freed in this window: no net trace, follow the sysctl
                if prior and f.get(ev.order, 0):
                    optimized.add(j)
                    restored.add(i)
                continue
            state = self.state.get(ev.pfn)
            if state:
                restored.add(i)
                saved += f.get(ev.order, 0)
            elif state is None:
                unknown.append(i)
        free_allocs = sorted(alloc_at.values())  # allocations not freed within the window
        if unknown:
            expected = sum(f.get(window[j].order, 0) for j in free_allocs) if prior else 0
            need = expected - saved  # restores the unknown frees must account for
            if need > 0:
                chosen, need = self._greedy(window, unknown, need)
                restored |= chosen
                saved = expected - need
        chosen, leftover = self._greedy(window, free_allocs, saved) if saved > 0 else (set(), saved)
        optimized |= chosen
        if leftover:
            self.unexplained_pages += abs(leftover)
            log.info("vmemmap inference: %+d pages of the counter change not explained by %d pool events",
                     -leftover, len(window))
        return optimized, restored

    def _greedy(self, window: list[Event], indices: list[int], amount: int) -> tuple[set[int], int]:
        chosen: set[int] = set()
        for order in sorted({window[i].order for i in indices}, reverse=True):
            per = self.freeable.get(order, 0)
            if per <= 0:
                continue
            of_order = [i for i in indices if window[i].order == order]
            k = min(len(of_order), amount // per)
            chosen.update(of_order[:k])
            amount -= k * per
        return chosen, amount

    def _restore_failures(self, now: int, like: dict[int, Event] | None) -> list[Event]:
        """Restore errors from a rise of free surplus pages, judged only on a pool reading that a
        second one at least ``confirm_ns`` later repeats. The four sysfs files of an hstate are read
        one after the other without the kernel's lock, and the kernel's surplus reservation
        (gather_surplus_pages) allocates surplus pages before it reserves them: a single reading can
        show free surplus pages that are reserved a moment later. A failure leaves its free surplus
        page in place, so it survives the wait."""
        pools = self._safe_pools()
        if not pools:
            return []
        if like:
            self._failure_like.update(like)
        if pools == self._pools:
            self._pools_seen, self._failure_like = None, {}
            return []
        if self._pools_seen is None or self._pools_seen[1] != pools:
            self._pools_seen = (now, pools)
            return []
        if now - self._pools_seen[0] < self.confirm_ns:
            return []
        out: list[Event] = []
        for order, p in pools.items():
            before = self._pools.get(order)
            rise = p.free_surplus - before.free_surplus if before else 0
            if rise > 0 and self.freeable.get(order, 0):
                log.warning("hstate order %d: %d free surplus page(s) appeared: vmemmap restore failed "
                            "(ENOMEM)", order, rise)
                out += [_restore_error(order, now, self._failure_like.get(order)) for _ in range(rise)]
        self._pools, self._pools_seen, self._failure_like = pools, None, {}
        return out

    def _safe_pools(self) -> dict[int, PoolState]:
        try:
            return self._read_pools()
        except ObserverError as e:
            log.debug("cannot read pools: %s", e)
            return {}
