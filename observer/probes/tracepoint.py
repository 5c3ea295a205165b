"""Tracepoint mode: hugetlb pool events from the page allocator's tracepoints (bpf/pool_tracepoints.bpf.c).

For kernels where neither kprobes nor fentry work (this project's 6.18 host). The programs attach as raw
tracepoints: no trace record is built and no perf event opened for them, which keeps the cost on every page
allocation and free of the whole system low, and Debian's perf_event_paranoid=3 does not apply. They get
struct page pointers: pfns come from hvo_page_pfn() (observer/probes/page_pfn.py). What is seen and how:

pool_alloc, buddy hstates (2 MiB): ``kmem:mm_page_alloc`` at the hstate's order with hugetlb's gfp
  signature (see the BPF file). Verified in the sources: 6.1 ``alloc_buddy_huge_page`` and
  6.12/6.18 ``alloc_buddy_hugetlb_folio`` add ``__GFP_COMP|__GFP_NOWARN`` and (unless a previous
  attempt on that node failed) ``__GFP_RETRY_MAYFAIL`` to ``htlb_alloc_mask()`` =
  GFP_HIGHUSER[_MOVABLE]; pool growth adds ``__GFP_THISNODE``. Seen on 6.18:
  ``GFP_HIGHUSER_MOVABLE|__GFP_NOWARN|__GFP_RETRY_MAYFAIL|__GFP_COMP|__GFP_THISNODE``.
  Limit: any other order-9 allocation with __GFP_COMP|__GFP_HARDWALL, no __GFP_NOMEMALLOC and
  __GFP_RETRY_MAYFAIL or __GFP_THISNODE would be taken for hugetlb (none known in mainline).
  A failed hugetlb allocation (pfn -1) is reported as pool_alloc with result error/ENOMEM.
pool_alloc, gigantic hstates (1 GiB): runtime pages come from alloc_contig_range (or CMA), which fires
  no mm_page_alloc; a successful ``page_isolation:test_pages_isolated`` over exactly one naturally
  aligned gigantic page is taken as a candidate and confirmed in /proc/kpageflags (KPF_HUGE head of
  that order). A candidate not confirmed within ``VERIFY_S`` is retracted (other users of
  alloc_contig_range, memory offlining of a 1 GiB block). A candidate freed before we could look
  (free event of the same pfn) is accepted. Gigantic pages from hugetlb_cma are freed through
  cma_release in order-0 pieces: their pool_free is not seen.
pool_free: ``kmem:mm_page_free`` at an hstate order of a pfn in the BPF set of known hugetlb heads.
  The set is filled by the alloc handlers and, at start, from /proc/kpageflags (pages that existed
  before the observer). It is an array with a slot per frame of the smallest hstate up to twice the
  highest pfn at start (``known_frames``). Limit: memory hot-added beyond that is not tracked (the hash
  it replaced could fill up alike): frees of pool pages there are missed and each resync reports such a
  page as a new pool_alloc.
  Pages that become hugetlb pages without any allocation (demote of a 1 GiB page into 2 MiB pages)
  are found by a resync: when the known count of an hstate disagrees with
  its nr_hugepages twice in a row with no pool event in between (or 5 times in a row regardless),
  /proc/kpageflags is scanned again and the difference is reported as inferred events without a
  task: demote (a gigantic page replaced by smaller ones), pool_free, pool_alloc.
  Start-up race: a page freed between attach and the seeding scan is not reported.
optimize/restore: inferred from the vmemmap counters (observer/probes/infer.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observer.bpf_sources import bpf_source
from observer.errors import KernelFactError, ObserverError
from observer.kernel import kpageflags, tracefs
from observer.kernel.files import read_text, under
from observer.probes import bpf_maps
from observer.probes.catalog import CATALOG, ProbeSpec
from observer.probes.events import Event, EventType, Result
from observer.probes.infer import VmemmapInference
from observer.probes.page_pfn import page_pfn_cflags
from observer.probes.probeset import Attachment, BaseProbeSet, Resolution

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

BPF_SOURCE = bpf_source("pool_tracepoints.bpf.c")
VERIFY_S = 2.0  # how long a gigantic candidate may stay unconfirmed
RESYNC_CHECK_S = 1.0  # consistency check interval (known heads vs nr_hugepages)
DEFAULT_MAX_PAGE_ORDER = 10  # x86-64 and most configs; read from /proc/buddyinfo when possible

# tracepoint -> (BPF function, the leading TP_PROTO argument types it reads, as BTF spells them)
TRACEPOINTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kmem:mm_page_alloc": ("hvo_tp_page_alloc", ("struct page *", "unsigned int", "gfp_t")),
    "kmem:mm_page_free": ("hvo_tp_page_free", ("struct page *", "unsigned int")),
    "page_isolation:test_pages_isolated": ("hvo_tp_pages_isolated", ("long unsigned int",) * 3),
}
DEFAULT_STRUCT_PAGE_SIZE = 64  # x86-64 and arm64 in every config HVO supports (geometry.py assumes it too)


def resolve_event_spec(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    """Whether a tracepoint or vmemmap-counter catalog entry can be used on this kernel, and why."""
    if spec.kind == "tracepoint":
        return _resolve_tracepoint(spec, facts, mode)
    return _resolve_counter(spec, facts, mode)


def _resolve_tracepoint(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    missing: list[str] = []
    for target in spec.targets:
        system, _, name = target.partition(":")
        try:
            if tracefs.event_exists(system, name, facts.root):
                problem = raw_args_problem(facts, target)
                if problem is not None:
                    return Resolution(spec, mode, None, False, problem)
                return Resolution(spec, mode, target, True, "tracepoint exists")
        except ObserverError as e:
            return Resolution(spec, mode, None, False, str(e))
        missing.append(target)
    return Resolution(spec, mode, None, False, "no such tracepoint: " + ", ".join(missing))


def _resolve_counter(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    from observer.kernel import sysctl, vmstat

    try:
        counters = vmstat.read_memmap_counters(facts.root)
        hvo_sysctl = sysctl.read_hvo_sysctl(facts.root)
    except ObserverError as e:
        return Resolution(spec, mode, None, False, str(e))
    if counters is None:
        return Resolution(spec, mode, None, False, "no nr_memmap_pages in /proc/vmstat (kernel < 6.11)")
    if hvo_sysctl is None:
        return Resolution(spec, mode, None, False, "no vm.hugetlb_optimize_vmemmap (kernel without HVO)")
    return Resolution(spec, mode, ",".join(spec.targets), True, "inferred from vmemmap counters")


def raw_args_problem(facts: KernelFacts, target: str) -> str | None:
    """Why the program of ``target`` cannot read its raw tracepoint's arguments, or None. Checked
    against BTF's btf_trace_<event> typedef (kernels without BTF: the prototypes, unchanged since
    2.6.33 and 4.x, are trusted)."""
    spec = TRACEPOINTS.get(target)
    if spec is None or facts.btf is None:
        return None
    event = target.partition(":")[2]
    params = facts.btf.raw_tracepoint_params(event)
    if params is None:
        return None
    wanted = spec[1]
    if tuple(params[: len(wanted)]) != wanted:
        return f"raw tracepoint {event} takes ({', '.join(params)}), not ({', '.join(wanted)}, ...)"
    return None


@dataclass(frozen=True)
class GfpRule:
    """A gfp mask test by flag names; bit values come from the running kernel's format file."""

    all_of: tuple[str, ...]
    none_of: tuple[str, ...]
    any_of: tuple[str, ...]

    def names(self) -> tuple[str, ...]:
        return self.all_of + self.none_of + self.any_of

    def masks(self, bits: dict[str, int]) -> tuple[int, int, int]:
        def mask(names: tuple[str, ...]) -> int:
            return sum(bits[n] for n in names)

        return mask(self.all_of), mask(self.none_of), mask(self.any_of)

    def matches(self, gfp: int, bits: dict[str, int]) -> bool:
        all_, none, any_ = self.masks(bits)
        return gfp & all_ == all_ and not gfp & none and bool(gfp & any_)

    def cflags(self, bits: dict[str, int]) -> list[str]:
        """The same test for bpf/pool_tracepoints.bpf.c's HVO_GFP_IS_HUGETLB()."""
        all_, none, any_ = self.masks(bits)
        return [f"-DHVO_GFP_ALL={all_:#x}ULL", f"-DHVO_GFP_NONE={none:#x}ULL", f"-DHVO_GFP_ANY={any_:#x}ULL"]


# hugetlb's buddy allocations: htlb_alloc_mask() (GFP_HIGHUSER[_MOVABLE], so __GFP_HARDWALL) plus
# __GFP_COMP, and __GFP_RETRY_MAYFAIL (alloc_buddy_hugetlb_folio trying hard) or __GFP_THISNODE (pool
# growth); every GFP_TRANSHUGE* mask has __GFP_NOMEMALLOC.
HUGETLB_GFP = GfpRule(
    all_of=("__GFP_COMP", "__GFP_HARDWALL"),
    none_of=("__GFP_NOMEMALLOC",),
    any_of=("__GFP_RETRY_MAYFAIL", "__GFP_THISNODE"),
)


def max_page_order(root: Path) -> int:
    """MAX_PAGE_ORDER: /proc/buddyinfo has one column per order 0..MAX_PAGE_ORDER."""
    path = under(root, "/proc/buddyinfo")
    try:
        line = next(ln for ln in read_text(path).splitlines() if ln.strip())
    except (KernelFactError, StopIteration):
        return DEFAULT_MAX_PAGE_ORDER
    columns = line.split(",", 1)[-1].split()[2:]  # "Node 0, zone DMA c0 c1 ..."
    return len(columns) - 1 if len(columns) > 1 else DEFAULT_MAX_PAGE_ORDER


def known_frames(facts: KernelFacts, shift: int) -> int:
    """Slots of the BPF set of known heads: one per 2**shift pages up to twice the highest pfn (room for
    memory hot-added later). The highest pfn is the end of the last memory block; without memory
    block sysfs, the RAM size plus the 4 GiB below which PCI holes lie."""
    try:
        layout = facts.memory_layout()
    except ObserverError:
        layout = None
    if layout is not None and layout.blocks and layout.block_size_bytes:
        end_pfn = (layout.blocks[-1].index + 1) * layout.block_size_bytes // facts.page_size
    else:
        end_pfn = os.sysconf("SC_PHYS_PAGES") + (4 << 30) // facts.page_size
    return max(2 * ((end_pfn >> shift) + 1), 1024)


def order_mask(orders: set[int]) -> str:
    return f"{sum(1 << o for o in orders):#x}ULL"


class TracepointProbeSet(BaseProbeSet):
    name = "tracepoint"

    def __init__(self, facts: KernelFacts, infer: VmemmapInference | PoolEventsOnly | None = None) -> None:
        self.facts = facts
        hstates = facts.hstates()
        if not hstates:
            raise ObserverError("tracepoint mode: no hugetlb hstates in /sys/kernel/mm/hugepages")
        self.orders = {h.order for h in hstates}
        self.order_names = {h.order: h.name for h in hstates}
        buddy_max = max_page_order(facts.root)
        self.buddy_orders = {o for o in self.orders if o <= buddy_max}
        self.contig_orders = self.orders - self.buddy_orders
        self._infer = infer
        self._known: Any = None
        self._known_count: dict[int, int] = dict.fromkeys(self.orders, 0)
        self._candidates: dict[int, tuple[Event, float]] = {}  # gigantic pfn -> (event, deadline)
        self._release: list[Event] = []  # confirmed candidates, dispatched and accounted by pending()
        self._unseen: list[Event] = []  # changes found by a resync: dispatched, already accounted
        self._events_since_check = 0
        self._quiet_mismatches = 0  # consecutive quiet checks where pool sizes and known set disagreed
        self._next_check = 0.0
        self.resyncs = 0
        self.retracted = 0

    @property
    def infer(self) -> VmemmapInference | PoolEventsOnly:
        # Built on first use (at attach, after bcc compiled): it needs the geometry, i.e. BTF.
        if self._infer is None:
            self._infer = VmemmapInference.for_facts(self.facts)
        return self._infer

    # --- ProbeSet ----------------------------------------------------------------------------
    def resolve(self, facts: KernelFacts) -> list[Resolution]:
        return [resolve_event_spec(s, facts, "tracepoint") for s in CATALOG if "tracepoint" in s.modes]

    def bpf_text(self) -> str:
        return read_text(BPF_SOURCE)

    def cflags(self) -> list[str]:
        # gfp bit values changed across versions: take them from the flag names the format prints
        gfp = tracefs.gfp_flags(tracefs.event_format("kmem", "mm_page_alloc", self.facts.root))
        for name in HUGETLB_GFP.names():
            if name not in gfp:
                path = f"{tracefs.ensure_tracefs(self.facts.root)}/events/kmem/mm_page_alloc/format"
                raise ObserverError(f"tracepoint mode: {path} does not print {name}")
        spage = self.facts.struct_page_size
        if spage is None:
            log.warning("tracepoint mode: no BTF: pfns assume sizeof(struct page) is %d",
                        DEFAULT_STRUCT_PAGE_SIZE)
            spage = DEFAULT_STRUCT_PAGE_SIZE
        return [
            *HUGETLB_GFP.cflags(gfp),
            *page_pfn_cflags(self.facts, spage),
            f"-DHVO_TP_ORDERS={order_mask(self.orders)}",
            f"-DHVO_TP_BUDDY_ORDERS={order_mask(self.buddy_orders)}",
            f"-DHVO_TP_CONTIG_ORDERS={order_mask(self.contig_orders)}",
            f"-DHVO_TP_FRAME_SHIFT={self.frame_shift}",
            f"-DHVO_TP_FRAMES={self.frames}",
        ]

    @property
    def frame_shift(self) -> int:
        return min(self.orders)

    @cached_property
    def frames(self) -> int:
        return known_frames(self.facts, self.frame_shift)

    def attach(self, bpf: Any) -> list[Attachment]:
        out: list[Attachment] = []
        for target, (fn, _) in TRACEPOINTS.items():
            event = EventType.POOL_FREE if target.endswith("mm_page_free") else EventType.POOL_ALLOC
            if target.startswith("page_isolation:") and not self.contig_orders:
                out.append(Attachment(event, target, "tracepoint", False, "no gigantic hstate: not needed"))
                continue
            problem = raw_args_problem(self.facts, target)
            if problem is not None:
                out.append(Attachment(event, target, "tracepoint", False, problem))
                continue
            try:
                bpf.attach_raw_tracepoint(tp=target.partition(":")[2].encode(), fn_name=fn.encode())
            except Exception as e:  # bcc raises bare Exception
                out.append(Attachment(event, target, "tracepoint", False, str(e)))
                continue
            out.append(Attachment(event, target, "tracepoint", True, "attached (raw tracepoint)"))
        self._known = bpf[b"hvo_tp_known"]
        # Seed after attaching: a page allocated in between is then in the set twice (harmless);
        # one freed in between is missed (documented).
        self._seed()
        return out

    def _seed(self) -> dict[int, int]:
        heads = self._scan()
        for pfn, order in heads.items():
            self._set_known(pfn, order)
        self._known_count = dict.fromkeys(self.orders, 0)
        for order in heads.values():
            self._known_count[order] += 1
        self.infer.seed(heads)
        log.info("tracepoint mode: %d hugetlb pages known at start (%s)", len(heads),
                 ", ".join(f"{self.order_names[o]}: {n}" for o, n in sorted(self._known_count.items())))
        return heads

    def observe(self, event: Event) -> bool:
        if event.event is EventType.POOL_ALLOC:
            if event.result is not Result.OK:
                return True
            if event.order in self.contig_orders and not self._confirmed(event):
                self._candidates[event.pfn] = (event, time.monotonic() + VERIFY_S)
                return False  # deferred: re-emitted by pending() once confirmed
        elif event.event is EventType.POOL_FREE:
            cand = self._candidates.pop(event.pfn, None)
            if cand is not None:  # freed before we could look: the free confirms it
                self._release += [cand[0], event]
                return False
        else:
            return True
        self._account(event)
        return True

    def _account(self, event: Event) -> None:
        self._events_since_check += 1
        if event.order in self._known_count:
            self._known_count[event.order] += 1 if event.event is EventType.POOL_ALLOC else -1
        self.infer.note(event)

    def _confirmed(self, event: Event) -> bool:
        try:
            return kpageflags.huge_head_at(event.pfn, event.order, min(self.orders), self.facts.root)
        except ObserverError:
            return False

    def _scan(self) -> dict[int, int]:
        expected = {h.order: h.nr_hugepages for h in self.facts.hstates()}
        return kpageflags.scan_huge_heads(self.orders, self.facts.root, expected=expected)

    def pending(self, now_ns: int) -> list[Event]:
        out: list[Event] = []
        if self._candidates:
            self._check_candidates()
        for ev in self._release:
            self._account(ev)
            out.append(ev)
        self._release.clear()
        out += self.infer.poll(now_ns)
        self._check_consistency()
        out += self._unseen
        self._unseen = []
        return out

    def _check_candidates(self) -> None:
        now = time.monotonic()
        for pfn, (ev, deadline) in list(self._candidates.items()):
            if self._confirmed(ev):
                del self._candidates[pfn]
                self._release.append(ev)
            elif now > deadline:
                del self._candidates[pfn]
                self.retracted += 1
                log.info("tracepoint mode: isolated range at pfn %#x was not a %s hugetlb page: dropped",
                         pfn, self.order_names.get(ev.order, ev.order))
                self._forget(pfn, ev.order)

    def _set_known(self, pfn: int, order: int) -> None:
        frame = pfn >> self.frame_shift
        if frame < self.frames:  # beyond: hot-added memory, not tracked (module docstring)
            self._known[self._known.Key(frame)] = self._known.Leaf(order)

    def _forget(self, pfn: int, order: int) -> None:
        frame = pfn >> self.frame_shift
        if frame < self.frames and self._known[self._known.Key(frame)].value == order:
            self._set_known(pfn, 0)

    def _known_heads(self) -> dict[int, int]:
        """The BPF set as {head pfn: order}."""
        slots = bpf_maps.u8_values(self._known)
        return {frame << self.frame_shift: order for frame, order in enumerate(slots) if order}

    def _check_consistency(self) -> None:
        """Resync the known set with /proc/kpageflags when the pool sizes disagree with it in two
        checks in a row with no pool activity in between. Only at quiet moments: a rescan while pages
        come and go (user space lags the kernel) would invent events and lose inferred ones."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RESYNC_CHECK_S
        quiet = self._events_since_check == 0 and not self._candidates and not self.infer.busy
        self._events_since_check = 0
        try:
            nr = {h.order: h.nr_hugepages for h in self.facts.hstates()}
        except ObserverError:
            return
        if all(nr.get(o, 0) == n for o, n in self._known_count.items()):
            self._quiet_mismatches = 0
            return
        self._quiet_mismatches = self._quiet_mismatches + 1 if quiet else 0
        if self._quiet_mismatches >= 2:
            self._quiet_mismatches = 0
            self.resync()

    def resync(self) -> None:
        """Make the BPF set match /proc/kpageflags, and report what changed unseen, as inferred
        events without a task: a gigantic page replaced by smaller ones is a demote; a page gone
        otherwise a pool_free (e.g. gigantic pages freed page by page, hugetlb_cma); a new page a
        pool_alloc."""
        heads = self._scan()
        current = self._known_heads()
        for pfn, order in heads.items():
            if current.get(pfn) != order:
                self._set_known(pfn, order)
        for pfn in current.keys() - heads.keys():
            self._forget(pfn, current[pfn])
        self._unseen += self._unseen_changes(current, heads)
        self._known_count = dict.fromkeys(self.orders, 0)
        for order in heads.values():
            self._known_count[order] += 1
        self.infer.reseed(heads)
        self.resyncs += 1
        log.info("tracepoint mode: known hugetlb pages resynced from /proc/kpageflags (%d pages)", len(heads))

    def _unseen_changes(self, before: dict[int, int], after: dict[int, int]) -> list[Event]:
        try:
            layout = self.facts.memory_layout()
        except ObserverError:
            layout = None
        now = time.monotonic_ns()

        def event(kind: EventType, pfn: int, order: int) -> Event:
            node = layout.node_of_pfn(pfn, self.facts.page_size) if layout else None
            return Event(ts_ns=now, pfn=pfn, cgroup_id=0, duration_ns=0, tgid=0, tid=0, err=0, node=node,
                         event=kind, result=Result.OK, order=order, inferred=True, comm="")

        out: list[Event] = []
        demoted: list[range] = []
        for pfn, order in sorted(before.items()):
            if after.get(pfn) == order:
                continue
            extent = range(pfn, pfn + (1 << order))
            if any(p in extent and o < order for p, o in after.items() if before.get(p) != o):
                out.append(event(EventType.DEMOTE, pfn, order))
                demoted.append(extent)
            else:
                out.append(event(EventType.POOL_FREE, pfn, order))
        for pfn, order in sorted(after.items()):
            if before.get(pfn) != order and not any(pfn in r for r in demoted):
                out.append(event(EventType.POOL_ALLOC, pfn, order))
        return out


class PoolEventsOnly:
    """The inference stand-in for fentry/kprobe modes that take pool events from tracepoints:
    optimize/restore come from the function probes there, so nothing is inferred (or counted twice)."""

    busy = False

    def seed(self, heads: dict[int, int]) -> None:
        pass

    def reseed(self, heads: dict[int, int]) -> None:
        pass

    def note(self, event: Event) -> None:
        pass

    def poll(self, now_ns: int) -> list[Event]:
        return []


def probe_sets(mode: str, facts: KernelFacts) -> list[TracepointProbeSet]:
    return [TracepointProbeSet(facts)]


def pool_probe_sets(mode: str, facts: KernelFacts) -> list[TracepointProbeSet]:
    """Pool events only, for function modes whose kernel hides the pool functions (inlined, clones)."""
    return [TracepointProbeSet(facts, infer=PoolEventsOnly())]

