"""The reconciliation model: the one place where events and kernel readings become figures.

In: BPF events (``on_event``), kernel snapshots and the in-kernel aggregates (``observe``).
Out: one immutable ``ModelView`` (``view()``) that the Prometheus collector, the JSON API and the CLI
all read, so every consumer shows the same numbers.

Per hstate and NUMA node it keeps the pool size (kernel counters) and the pages currently
vmemmap-optimized (from events, on top of a start-up baseline taken from the counters, see
observer/baseline.py). From those:

    expected saved pages = sum over hstates/nodes of optimized x nr_free_vmemmap_pages(hstate)
    kernel saved pages   = full vmemmap (online memory, nothing optimized)
                           - (nr_memmap_pages + nr_memmap_boot_pages)           (6.11+, global)
    drift                = expected - kernel, in bytes

Settle window: the kernel counts as quiet once no event has arrived and the snapshot (pool sizes,
vmemmap counters, sysctl) has not changed for ``settle_seconds`` (default 1 s). Only then is drift
evaluated and published (``drift_bytes`` holds the value of the last quiet moment, so operations in
flight never raise a false alarm); ``pending_drift_bytes`` is the raw, instantaneous difference.
At a quiet moment drift must be exactly 0.

Generation: every change of what ``view()`` shows (apart from the clock: ``now_ns``, ``quiet_seconds``)
bumps ``ModelView.generation``; a reading that changed nothing does not. Consumers cache per
generation (the view itself, the /metrics exposition), so an idle daemon computes its figures once.

Resync (recompute the optimized counts from the counters, counted in ``resyncs``), always at a
quiet moment so that no operation is half-seen:
- events were lost (the aggregates' ``lost`` grew);
- the counts became impossible (more optimized pages than the pool holds, or a restore for a page the
  model did not know as optimized), i.e. the model's attribution was wrong;
- the probes were restarted (config reload).
The start-up baseline is taken before READY; if anything moved while it was being taken, it is
retaken (not counted as a resync) at the first quiet moment.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from observer.baseline import Split, assume_from_setting, split_by_node, split_saved_pages
from observer.probes.events import Event, EventType, Result
from observer.snapshot import KernelSnapshot, PoolKey, PoolPages

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

# How long more optimized pages than the pool holds are taken for restores still to come (see
# Model._settle) before the counts are clamped (no vmemmap counters) or resynced.
RESTORES_DUE_GRACE_NS = 30 * 1_000_000_000

CountKey = tuple[EventType, int, Result]
HistKey = tuple[EventType, int]


@dataclass(frozen=True)
class HstateSpec:
    name: str  # sysfs name, "2048kB"
    order: int
    freeable_pages: int  # the seed's nr_free_vmemmap_pages: vmemmap pages HVO frees per huge page
    eligible: bool = True  # a page allocated now would be optimized


@dataclass(frozen=True)
class ProbeState:
    probe: str  # tracepoint "system:event" or kernel function
    event: str
    mode: str
    attached: bool
    reason: str = ""


@dataclass(frozen=True)
class Runtime:
    """What the daemon runs as; set by the daemon, exported with the model's figures."""

    version: str = ""
    kernel: str = ""
    mode: str = ""
    mode_reason: str = ""
    degraded: bool = False
    probes: tuple[ProbeState, ...] = ()
    started_unix: float = field(default_factory=time.time)
    degraded_reasons: tuple[str, ...] = ()  # what the mode cannot see on this kernel (modes.mode_limits)
    nodes_known: bool = True  # events carry their NUMA node (False: pfns unknown, see probes.page_pfn)


@dataclass(frozen=True)
class BaselineInfo:
    exact: bool
    candidates: int
    note: str
    taken_ns: int
    provisional: bool  # taken while the kernel was busy: retaken at the first quiet moment


@dataclass(frozen=True)
class PoolView:
    hstate: str
    node: int
    pages: int
    free: int
    surplus: int
    optimized: int


@dataclass(frozen=True)
class ModelView:
    """One consistent picture of the model. Views of one generation share ``counts`` and ``hist``:
    read them, never modify them."""

    generation: int  # changes whenever anything below but now_ns/quiet_seconds changes
    now_ns: int
    page_size: int
    hstates: tuple[HstateSpec, ...]
    pools: tuple[PoolView, ...]
    expected_saved_pages: int
    kernel_saved_pages: int | None
    memmap_pages: int | None
    memmap_counters: tuple[int, int] | None
    full_memmap_pages: int | None
    drift_bytes: int | None  # at the last quiet moment
    pending_drift_bytes: int | None  # now, in flight or not
    settled: bool
    quiet_seconds: float
    settle_seconds: float
    hvo_enabled: bool | None
    resyncs: int
    last_resync: tuple[str, float] | None  # (reason, unix time)
    events_lost: int
    events_seen: int
    counts: dict[CountKey, int]
    hist: dict[HistKey, list[int]]
    baseline: BaselineInfo | None
    inconsistent: str  # why the counts are impossible, "" when they are not
    runtime: Runtime

    @property
    def byte_truth(self) -> bool:
        return self.kernel_saved_pages is not None

    def optimized(self, hstate: str) -> int:
        return sum(p.optimized for p in self.pools if p.hstate == hstate)

    def pool_pages(self, hstate: str) -> int:
        return sum(p.pages for p in self.pools if p.hstate == hstate)

    def split_unknown(self, hstate: str) -> bool:
        """True when this hstate's optimized pages cannot be told apart by node: events carry no node
        (pfns unknown) and the hstate has pages on several nodes. The model still books them on some
        node; that split is a guess and is not published (pool sizes per node are: sysfs gives them)."""
        return hstate in self._unsplit_hstates()

    def _unsplit_hstates(self) -> set[str]:
        if self.runtime.nodes_known:
            return set()
        nodes: dict[str, int] = {}
        for p in self.pools:
            nodes[p.hstate] = nodes.get(p.hstate, 0) + (p.pages > 0)
        return {h for h, n in nodes.items() if n > 1}

    def optimized_by_node(self) -> list[tuple[str, int | None, int]]:
        """(hstate, node, optimized pages): one row per pool, or one row with node None for an hstate
        whose split is unknown (split_unknown)."""
        unsplit = self._unsplit_hstates()
        out: list[tuple[str, int | None, int]] = []
        unknown: dict[str, int] = {}
        for p in self.pools:
            if p.hstate in unsplit:
                unknown[p.hstate] = unknown.get(p.hstate, 0) + p.optimized
            else:
                out.append((p.hstate, p.node, p.optimized))
        return out + [(h, None, n) for h, n in unknown.items()]


class Model:
    @classmethod
    def for_facts(cls, facts: KernelFacts, settle_seconds: float = 1.0) -> Model:
        """A model of this kernel's hstates with their HVO geometry."""
        from observer.geometry import geometry_for

        specs = {name: HstateSpec(name, g.order, g.freeable_vmemmap_pages, g.eligible)
                 for name, g in geometry_for(facts).items()}
        return cls(specs, facts.page_size, settle_seconds)

    def __init__(self, hstates: Mapping[str, HstateSpec], page_size: int = 4096, settle_seconds: float = 1.0,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._lock = threading.Lock()
        self.clock = clock
        self.page_size = page_size
        self.hstates = dict(hstates)
        self._by_order = {s.order: s.name for s in self.hstates.values()}
        self.settle_ns = int(settle_seconds * 1e9)
        self.optimized: dict[PoolKey, int] = {}
        self.snapshot: KernelSnapshot | None = None
        self.baseline_info: BaselineInfo | None = None
        self.runtime = Runtime()
        self.resyncs = 0
        self.last_resync: tuple[str, float] | None = None
        self.events_seen = 0
        self._quiet_since = clock()
        self._settled = False  # the last observe() found the kernel quiet and reconciled
        self._snap_key: tuple[object, ...] | None = None
        self._pending_resync = ""
        self._drift_bytes: int | None = None
        self._inconsistent = ""
        self._restores_due_since: int | None = None  # first quiet moment with more optimized than pooled
        self._lost_seen = 0
        # Aggregates of earlier probe sessions (config reloads) plus the current one.
        self._agg_base: tuple[dict[CountKey, int], dict[HistKey, list[int]], int] = ({}, {}, 0)
        self._agg: tuple[dict[CountKey, int], dict[HistKey, list[int]], int] = ({}, {}, 0)
        self._generation = 0
        self._view: ModelView | None = None  # the view of the current generation, once asked for

    # --- configuration ---------------------------------------------------------------------
    def set_settle_seconds(self, seconds: float) -> None:
        with self._lock:
            self.settle_ns = int(seconds * 1e9)
            self._generation += 1

    def set_runtime(self, runtime: Runtime) -> None:
        with self._lock:
            self.runtime = runtime
            self._generation += 1

    @property
    def settled(self) -> bool:
        """Whether the last observe() found the kernel quiet, with no event since."""
        return self._settled

    def settle_due(self, now: int | None = None) -> tuple[bool, int]:
        """(whether observe() at NOW, default the clock's now, with an unchanged snapshot would find
        the kernel quiet; since when it has been quiet). Pass observe() the same NOW: aggregates read
        because this said yes are then the ones the quiet moment is judged with."""
        with self._lock:
            now = self.clock() if now is None else now
            return now - self._quiet_since >= self.settle_ns, self._quiet_since

    def hstate_of_order(self, order: int) -> str:
        """The sysfs name of the hstate with this order (computed for orders no pool has)."""
        if order < 0:  # probes.aggregates.OTHER_ORDER
            return "other"
        return self._by_order.get(order) or f"{(self.page_size << order) // 1024}kB"

    # --- baseline and resync ---------------------------------------------------------------
    def take_baseline(self, snap: KernelSnapshot, aggregates: object | None = None,
                      provisional: bool = True) -> BaselineInfo:
        """Start-up state from the counters. ``provisional``: retake it at the first quiet moment if
        anything moved in between (the reading may have cut an operation in half). Events the probes
        lost before this point do not matter: the counters already contain their effect."""
        with self._lock:
            if aggregates is not None:
                self._take_aggregates(aggregates)
                self._pending_resync = ""
            info = self._baseline(snap, provisional)
            self._accept_snapshot(snap)
            self._quiet_since = self.clock()
            self._settled = False
            self._drift_bytes = self._drift_now()
            self._generation += 1
            return info

    def request_resync(self, reason: str) -> None:
        """Recompute from the counters at the next quiet moment (e.g. the probes were restarted)."""
        with self._lock:
            self._pending_resync = self._pending_resync or reason

    def _baseline(self, snap: KernelSnapshot, provisional: bool) -> BaselineInfo:
        pools_by_hstate: dict[str, int] = {}
        for (h, _), p in snap.pools.items():
            pools_by_hstate[h] = pools_by_hstate.get(h, 0) + p.pages
        freeable = {h: s.freeable_pages for h, s in self.hstates.items()}
        split: Split
        if snap.saved_pages is not None:
            split = split_saved_pages(snap.saved_pages, pools_by_hstate, freeable)
        else:
            split = assume_from_setting(pools_by_hstate, freeable, self._hvo_on(snap))
        exact = split.exact
        notes = [split.note]
        optimized: dict[PoolKey, int] = {}
        for h, n in split.counts.items():
            node_pools = {node: p.pages for (hh, node), p in snap.pools.items() if hh == h}
            per_node, node_exact = split_by_node(n, node_pools)
            if not node_exact:
                exact = False
                notes.append(f"{h}: {n} optimized pages spread over nodes in proportion to the pool")
            for node, count in per_node.items():
                optimized[(h, node)] = count
        self.optimized = optimized
        self._inconsistent = ""
        self._restores_due_since = None
        info = BaselineInfo(exact, split.candidates, "; ".join(notes), snap.taken_ns, provisional)
        self.baseline_info = info
        return info

    def _hvo_on(self, snap: KernelSnapshot) -> bool:
        if snap.hvo_enabled is not None:
            return snap.hvo_enabled
        return any(s.eligible for s in self.hstates.values())

    # --- events ----------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        with self._lock:
            self.events_seen += 1
            self._generation += 1
            self._quiet_since = self.clock()
            self._settled = False
            base = self.baseline_info
            if base is not None and base.provisional:  # the start-up reading may have cut this one
                self._pending_resync = self._pending_resync or "startup"
            if base is not None and ev.ts_ns <= base.taken_ns:
                return  # finished before the baseline reading: already in it
            if ev.event not in (EventType.OPTIMIZE, EventType.RESTORE) or ev.result != Result.OK:
                # A failed restore leaves the page optimized (and in the pool); a skipped or failed
                # optimize leaves it unoptimized. Pool events change pools, which the counters give.
                return
            h = self.hstate_of_order(ev.order)
            key = (h, self._node_for(h, ev.node))
            if ev.event == EventType.OPTIMIZE:
                self.optimized[key] = self.optimized.get(key, 0) + 1
            elif self.optimized.get(key, 0) > 0:
                self.optimized[key] -= 1
            else:
                self._inconsistent = f"restore of a {h} page on node {key[1]} not known as optimized"

    def _node_for(self, hstate: str, node: int | None) -> int:
        if node is not None:
            return node
        # The BPF side could not map the pfn to a node: take the node that holds this pool.
        nodes = sorted(n for (h, n), p in (self.snapshot.pools.items() if self.snapshot else ())
                       if h == hstate and p.pages > 0)
        return nodes[0] if nodes else 0

    # --- kernel readings -------------------------------------------------------------------
    def observe(self, snap: KernelSnapshot, aggregates: object | None = None, now: int | None = None) -> None:
        """A new snapshot (and, optionally, the probe session's Aggregates); evaluates settling at NOW
        (default: the clock's now; see settle_due())."""
        with self._lock:
            before = self._shown()
            if aggregates is not None:
                self._take_aggregates(aggregates)
            now = self.clock() if now is None else now
            if snap.change_key() != self._snap_key:
                self._quiet_since = now
                if self.baseline_info is not None and self.baseline_info.provisional:
                    self._pending_resync = self._pending_resync or "startup"
            self._accept_snapshot(snap)
            self._settled = now - self._quiet_since >= self.settle_ns
            if self._settled:
                self._settle(snap, now)
            if self._shown() != before:  # most readings of an idle kernel change nothing
                self._generation += 1

    def _shown(self) -> tuple[object, ...]:
        """What observe() may change of the view (the snapshot without its time stamp). Cheap: the
        dicts are compared, not copied (snapshots and aggregates are replaced, never modified)."""
        s = self.snapshot
        snap = None if s is None else (s.pools, s.memmap_pages, s.memmap_counters, s.full_memmap_pages,
                                       s.hvo_enabled)
        return (snap, self._agg, self._settled, self._drift_bytes, self._inconsistent, self.resyncs,
                self.last_resync, self.baseline_info, tuple(self.optimized.items()))

    def _accept_snapshot(self, snap: KernelSnapshot) -> None:
        self.snapshot = snap
        self._snap_key = snap.change_key()
        for key in snap.pools:
            self.optimized.setdefault(key, 0)

    def _take_aggregates(self, agg: object) -> None:
        counts = dict(getattr(agg, "counts", {}))
        hist = {k: list(v) for k, v in getattr(agg, "hist", {}).items()}
        lost = int(getattr(agg, "lost", 0))
        if lost > self._lost_seen:
            self._pending_resync = f"{lost - self._lost_seen} event(s) lost"
        self._lost_seen = lost
        self._agg = (counts, hist, lost)

    def session_restarted(self) -> None:
        """The probe session was replaced: keep its totals, start counting the new one from zero."""
        with self._lock:
            bc, bh, bl = self._agg_base
            c, h, lost = self._agg
            for k, v in c.items():
                bc[k] = bc.get(k, 0) + v
            for k, v in h.items():
                acc = bh.setdefault(k, [0] * len(v))
                for i, x in enumerate(v):
                    acc[i] += x
            self._agg_base = (bc, bh, bl + lost)
            self._agg = ({}, {}, 0)
            self._lost_seen = 0
            self._pending_resync = self._pending_resync or "probes restarted"
            self._generation += 1

    def _settle(self, snap: KernelSnapshot, now: int) -> None:
        base = self.baseline_info
        if self._pending_resync:
            reason, self._pending_resync = self._pending_resync, ""
            self._resync(snap, reason, counted=reason != "startup")
        elif base is not None and base.provisional:
            self.baseline_info = BaselineInfo(base.exact, base.candidates, base.note, base.taken_ns, False)
        self._drift_bytes = self._drift_now()
        impossible = self._impossible(snap)
        kernel_restored = snap.saved_pages is not None and snap.saved_pages < self._expected_pages()
        if not impossible:
            self._restores_due_since = None
        elif not self._inconsistent and not kernel_restored:
            # More optimized pages than the pool holds: the kernel takes pages out of the pool (the
            # count drops) before it restores their vmemmap one by one (a shrink, a demote), so the
            # restore records may still be coming, later than a settle window when the writer is
            # descheduled. Unless a restore of an unknown page came, or the counters say the kernel
            # has already restored them (it saves less than expected): wait for them, a while.
            if self._restores_due_since is None:
                self._restores_due_since = now
            if now - self._restores_due_since < RESTORES_DUE_GRACE_NS:
                return
        why = self._inconsistent or impossible
        if why:
            if snap.saved_pages is None:
                self._clamp(snap)  # no counters to recompute from: keep the counts possible
                self._inconsistent = why
            else:
                log.warning("counts inconsistent with the kernel (%s); drift was %s bytes", why,
                            self._drift_bytes)
                self._resync(snap, f"inconsistent: {why}", counted=True)
                self._drift_bytes = self._drift_now()

    def _resync(self, snap: KernelSnapshot, reason: str, counted: bool) -> None:
        before = dict(self.optimized)
        info = self._baseline(snap, provisional=False)
        if counted:
            self.resyncs += 1
            self.last_resync = (reason, time.time())
        changed = {k: (before.get(k, 0), v) for k, v in self.optimized.items() if before.get(k, 0) != v}
        log.info("%s from the kernel counters (%s): %s%s", "resync" if counted else "baseline retaken",
                 reason, ", ".join(f"{h} node{n} {a}->{b}" for (h, n), (a, b) in sorted(changed.items()))
                 or "no change", "" if info.exact else f" [not exact: {info.note}]")

    def _impossible(self, snap: KernelSnapshot) -> str:
        for key, n in sorted(self.optimized.items()):
            pool = snap.pools.get(key, PoolPages(0)).pages
            if n > pool:
                return f"{key[0]} node {key[1]}: {n} optimized pages but the pool has {pool}"
        return ""

    def _clamp(self, snap: KernelSnapshot) -> None:
        for key, n in self.optimized.items():
            self.optimized[key] = max(0, min(n, snap.pools.get(key, PoolPages(0)).pages))

    # --- figures ---------------------------------------------------------------------------
    def _expected_pages(self) -> int:
        return sum(n * self.hstates[h].freeable_pages for (h, _), n in self.optimized.items()
                   if h in self.hstates)

    def _drift_now(self) -> int | None:
        kernel = self.snapshot.saved_pages if self.snapshot else None
        if kernel is None:
            return None
        return (self._expected_pages() - kernel) * self.page_size

    def view(self) -> ModelView:
        with self._lock:
            now = self.clock()
            quiet = (now - self._quiet_since) / 1e9
            cached = self._view
            if cached is not None and cached.generation == self._generation:
                return dataclasses.replace(cached, now_ns=now, quiet_seconds=quiet)
            self._view = self._build_view(now, quiet)
            return self._view

    def _build_view(self, now: int, quiet: float) -> ModelView:
        """Called with the lock held."""
        snap = self.snapshot or KernelSnapshot(taken_ns=now)
        pools = []
        for key in sorted(set(snap.pools) | set(self.optimized)):
            p = snap.pools.get(key, PoolPages(0))
            pools.append(PoolView(key[0], key[1], p.pages, p.free, p.surplus, self.optimized.get(key, 0)))
        bc, bh, bl = self._agg_base
        c, h, lost = self._agg
        counts = dict(bc)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        hist = {k: list(v) for k, v in bh.items()}
        for k, v in h.items():
            acc = hist.get(k)
            hist[k] = list(v) if acc is None else list(map(operator.add, acc, v))
        return ModelView(
            generation=self._generation, now_ns=now, page_size=self.page_size,
            hstates=tuple(sorted(self.hstates.values(), key=lambda s: s.order)),
            pools=tuple(pools),
            expected_saved_pages=self._expected_pages(),
            kernel_saved_pages=snap.saved_pages,
            memmap_pages=snap.memmap_pages, memmap_counters=snap.memmap_counters,
            full_memmap_pages=snap.full_memmap_pages,
            drift_bytes=self._drift_bytes, pending_drift_bytes=self._drift_now(),
            settled=self._settled,
            quiet_seconds=quiet, settle_seconds=self.settle_ns / 1e9,
            hvo_enabled=snap.hvo_enabled, resyncs=self.resyncs, last_resync=self.last_resync,
            events_lost=bl + lost, events_seen=self.events_seen, counts=counts, hist=hist,
            baseline=self.baseline_info, inconsistent=self._inconsistent, runtime=self.runtime,
        )
