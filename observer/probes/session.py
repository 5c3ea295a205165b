"""One probe session: pick a mode, compile the mode's ProbeSets as one bcc program, attach, poll.

Everything the session creates in the kernel hangs off file descriptors of this process (bcc's
perf-event tracepoint/kprobe attachments, fentry links, maps): nothing is pinned and no
kprobe_events text entry is written, so a SIGKILLed daemon leaves nothing behind. ``close()``
detaches explicitly; SIGTERM handling belongs to the caller (the daemon turns it into close()).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from collections.abc import Callable
from ctypes import string_at
from typing import TYPE_CHECKING, Any

from observer.bpf_sources import BPF_DIR, read_bpf_source
from observer.errors import ObserverError
from observer.probes.aggregates import AggregateLayout, Aggregates, CountKey, HistKey
from observer.probes.bpf_maps import u64_values
from observer.probes.events import EVENT_SIZE, HIST_BUCKETS, Event, EventType, decode
from observer.probes.probeset import MODES, PROBESET_FACTORIES, Attachment, BaseProbeSet, ProbeSet

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NODE_MAP_MIN_BLOCKS = 4096  # pfn->node map entries at least (16 KiB): room for hot-added memory
DEFAULT_RINGBUF_BYTES = 1 << 22
CORE_EVENTS = (EventType.OPTIMIZE, EventType.RESTORE)

__all__ = ["Aggregates", "CountKey", "HistKey", "ProbeSession", "select_mode"]


def select_mode(facts: KernelFacts) -> tuple[str, str]:
    """The best mode this kernel allows, and why the better ones were passed over.

    fentry/kprobe need the kernel to allow them (observer.modes: a real fentry load trial, the
    kprobe PMU) and the core HVO functions (optimize and restore) to resolve; tracepoint mode is
    the fallback (it needs only kmem tracepoints).
    """
    from observer import modes
    from observer.probes.resolve import resolve_all

    support = modes.mode_support(facts)
    passed: list[str] = []
    for mode in ("fentry", "kprobe"):
        if not support[mode].available:
            passed.append(f"{mode}: {support[mode].reason}")
            continue
        resolutions = resolve_all(facts, mode)
        missing = [e.label for e in CORE_EVENTS if not any(r.ok and r.spec.event is e for r in resolutions)]
        if not missing:
            return mode, f"{mode}: the kernel allows it and the HVO functions resolve" + _why(passed)
        passed.append(f"{mode}: no probe-able function for {', '.join(missing)}")
    if not support["tracepoint"].available:
        raise ObserverError("no probe mode is available: " + "; ".join(
            [*passed, f"tracepoint: {support['tracepoint'].reason}"]))
    why = "tracepoint: pool events from kmem tracepoints, optimize/restore inferred"
    return "tracepoint", why + _why(passed)


def _why(passed: list[str]) -> str:
    return f" (not {'; not '.join(passed)})" if passed else ""


class ProbeSession:
    def __init__(
        self,
        mode: str = "auto",
        facts: KernelFacts | None = None,
        on_event: Callable[[Event], None] | None = None,
        ringbuf_bytes: int = DEFAULT_RINGBUF_BYTES,
        output: str = "auto",
    ) -> None:
        """``output``: "auto" (ring buffer when the kernel has it, 5.8+), "ringbuf" or "perfbuf";
        ``ringbuf_bytes`` is the ring buffer size, or the total of the per-CPU perf buffers."""
        if output not in ("auto", "ringbuf", "perfbuf"):
            raise ObserverError(f"unknown event output {output!r} (choose auto, ringbuf, perfbuf)")
        if mode not in ("auto", *MODES):
            raise ObserverError(f"unknown probe mode {mode!r} (choose auto, {', '.join(MODES)})")
        pages = ringbuf_bytes // PAGE_SIZE
        if ringbuf_bytes <= 0 or ringbuf_bytes % PAGE_SIZE or pages & (pages - 1):
            raise ObserverError(
                f"ring buffer size {ringbuf_bytes} is not a power-of-two multiple of the page size "
                f"({PAGE_SIZE})"
            )
        self.requested_mode = mode
        self.facts = facts
        self.on_event = on_event or (lambda e: None)
        self.ringbuf_bytes = ringbuf_bytes
        self.output = output
        self.mode: str | None = None
        self.mode_reason = ""
        self.degraded_reasons: list[str] = []  # what the mode cannot see on this kernel (modes.mode_limits)
        self.nodes_known = True  # False when pfns (so nodes) of struct page pointers are unknown
        self.attachments: list[Attachment] = []
        self.probe_sets: list[ProbeSet] = []
        self.perfbuf = False
        self.startup_s = 0.0
        self.timings: dict[str, float] = {}  # seconds per start-up phase: select, compile, attach
        self._bpf: Any = None
        self._user_counts: dict[CountKey, int] = {}
        self._user_hist: dict[HistKey, list[int]] = {}
        self._perf_lost = 0
        self.records = 0  # records taken from the ring/perf buffer, deferred and retracted ones included
        self._observers: list[Callable[[Event], bool]] = []
        self._cb_error: BaseException | None = None
        self._ring_cb: Any = None  # keeps the ctypes callback alive
        self._layout: Any = None  # MemoryLayout for the pfn -> node map
        self.aggregate_layout = AggregateLayout(())  # slots of `counts`/`hist`, set at compile
        self._kernel_counts: list[int] | None = None  # the `counts` map at the last aggregates()
        self._kernel_hist: dict[HistKey, list[int]] | None = None  # `hist`, while it cannot have moved

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ProbeSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        from observer import modes

        t0 = time.monotonic()
        if self.facts is None:
            from observer.kernel.facts import gather

            self.facts = gather()
        if self.requested_mode == "auto":
            self.mode, self.mode_reason = select_mode(self.facts)
        else:
            # Fail before a long compile, with the kernel's reason (e.g. perf_event_paranoid).
            support = modes.mode_support(self.facts)[self.requested_mode]
            if not support.available:
                raise ObserverError(f"{self.requested_mode} mode is not available: {support.reason}")
            self.mode, self.mode_reason = self.requested_mode, "requested"
        log.info("probe mode %s: %s", self.mode, self.mode_reason)
        self.degraded_reasons = modes.mode_limits(self.facts, self.mode)
        for reason in self.degraded_reasons:
            log.warning("degraded: %s", reason)
        self.timings["select"] = time.monotonic() - t0
        self.probe_sets = self._make_probe_sets(self.mode)
        try:
            t = time.monotonic()
            self._bpf = self._compile()
            self.timings["compile"] = time.monotonic() - t
            t = time.monotonic()
            for ps in self.probe_sets:
                self.attachments.extend(ps.attach(self._bpf))
            self.timings["attach"] = time.monotonic() - t
            if not any(a.ok for a in self.attachments):
                failed = "; ".join(f"{a.target}: {a.reason}" for a in self.attachments) or "no targets"
                raise ObserverError(f"{self.mode} mode: nothing could be attached ({failed})")
            self._open_output()
        except BaseException:
            self.close()
            raise
        self._observers = [
            ps.observe for ps in self.probe_sets if type(ps).observe is not BaseProbeSet.observe
        ]
        self.startup_s = time.monotonic() - t0

    def close(self) -> None:
        for ps in self.probe_sets:
            ps.close()
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()  # detaches every probe and closes all program/map fds

    # --- building --------------------------------------------------------------------------
    def _make_probe_sets(self, mode: str) -> list[ProbeSet]:
        sets: list[ProbeSet] = []
        for modname in PROBESET_FACTORIES[mode]:
            try:
                module = importlib.import_module(modname)
            except ImportError as e:
                raise ObserverError(f"{mode} mode is not available in this build ({modname}: {e})") from None
            sets.extend(module.probe_sets(mode, self.facts))
        if not sets:
            raise ObserverError(f"{mode} mode: no probe sets for this kernel")
        return sets

    def _compile(self) -> Any:
        from observer.kernel import headers

        headers.apply(headers.find_bcc_headers())
        from bcc import BPF

        self.perfbuf = self.output == "perfbuf" or (self.output == "auto" and not _has_ringbuf(self.facts))
        # Inline, not #include: bcc rewrites map calls (m.lookup(), ring/perf output) only in the
        # program text itself, never in included files.
        text = "\n".join([read_bpf_source("hvo_common.h"), *(ps.bpf_text() for ps in self.probe_sets)])
        # -Wno-ignored-attributes: Debian 6.12+ headers' __noendbr (nocf_check) warns under bcc's clang
        self.aggregate_layout = AggregateLayout(tuple(sorted({h.order for h in self.facts.hstates()})))
        cflags = [f"-I{BPF_DIR}", "-Wno-ignored-attributes", *self._node_cflags(),
                  *self.aggregate_layout.cflags()]
        if self.perfbuf:
            cflags.append("-DHVO_PERFBUF")
        else:
            cflags.append(f"-DHVO_RINGBUF_PAGES={self.ringbuf_bytes // PAGE_SIZE}")
        for ps in self.probe_sets:
            cflags.extend(f for f in ps.cflags() if f not in cflags)
        try:
            bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception with the compiler/verifier log on stderr
            raise ObserverError(f"{self.mode} mode: BPF compile/load failed: {e}") from None
        self._fill_node_map(bpf)
        return bpf

    def _node_cflags(self) -> list[str]:
        from observer.probes.page_pfn import vmemmap_base_problem

        if vmemmap_base_problem(self.facts):  # pfns unknown: no node is better than a guessed one
            self._layout = None
            self.nodes_known = False
            return []
        self._layout = _memory_layout(self.facts)
        if self._layout is None or not self._layout.blocks:
            return []
        pages_per_block = self._layout.block_size_bytes // PAGE_SIZE
        shift = pages_per_block.bit_length() - 1
        # room for memory hot-added later (refresh_node_map): 4 bytes an entry
        nblocks = max(4 * (max(b.index for b in self._layout.blocks) + 1), NODE_MAP_MIN_BLOCKS)
        return [f"-DHVO_BLOCK_PFN_SHIFT={shift}", f"-DHVO_NODE_BLOCKS={nblocks}"]

    def _fill_node_map(self, bpf: Any, before: Any = None) -> None:
        if self._layout is None or not self._layout.blocks:
            return
        table = bpf[b"hvo_block_node"]
        now = {b.index: b.node for b in self._layout.blocks if b.node is not None}
        old = {b.index: b.node for b in before.blocks if b.node is not None} if before is not None else {}
        for index in old.keys() - now.keys():  # removed memory: node unknown again
            with contextlib.suppress(Exception):
                table[table.Key(index)] = table.Leaf(0)
        for index, node in now.items():
            if old.get(index) != node:
                try:
                    table[table.Key(index)] = table.Leaf(node + 1)
                except Exception:  # beyond the map's room (hot-added far above boot memory)
                    log.warning("memory block %d is beyond the pfn->node map: its events carry no node",
                                index)

    def refresh_node_map(self, layout: Any) -> None:
        """Memory was hot-added or removed: the BPF pfn -> node map follows the new layout (only if
        the map was built with the same block size)."""
        if self._bpf is None or layout is None or self._layout is None:
            return
        if layout.block_size_bytes != self._layout.block_size_bytes:
            return
        before, self._layout = self._layout, layout
        self._fill_node_map(self._bpf, before)

    def _open_output(self) -> None:
        events = self._bpf[b"events"]
        if self.perfbuf:
            ncpu = max(os.cpu_count() or 1, 1)
            per_cpu = max(self.ringbuf_bytes // PAGE_SIZE // ncpu, 1)
            per_cpu = 1 << (per_cpu.bit_length() - 1)
            events.open_perf_buffer(self._on_perf, page_cnt=per_cpu, lost_cb=self._on_perf_lost)
        else:
            # Our own ctypes callback instead of bcc's open_ring_buffer() wrapper: one Python frame
            # less per record, and a raising on_event stops the poll (returning < 0 makes libbpf
            # stop consuming) instead of being printed and ignored by ctypes.
            from bcc.libbcc import _RINGBUF_CB_TYPE

            self._ring_cb = _RINGBUF_CB_TYPE(self._on_ring)
            self._bpf._open_ring_buffer(events.map_fd, self._ring_cb, None)

    # --- event path (keep lean: this runs once per record) -----------------------------------
    def _on_ring(self, ctx: Any, data: Any, size: int) -> int:
        self.records += 1
        try:
            self._dispatch(decode(string_at(data, EVENT_SIZE)))
        except BaseException as e:  # re-raised by poll()
            self._cb_error = e
            return -1
        return 0

    def _on_perf(self, cpu: int, data: Any, size: int) -> None:
        if self._cb_error is not None:
            return  # drop the rest of this poll's records: poll() raises
        self.records += 1
        try:
            self._dispatch(decode(string_at(data, EVENT_SIZE)))
        except BaseException as e:
            self._cb_error = e

    def _on_perf_lost(self, count: int) -> None:
        self._perf_lost += count

    def _dispatch(self, ev: Event) -> None:
        for observe in self._observers:
            if not observe(ev):
                return  # deferred (pending() re-emits it) or retracted: counted only if accepted
        if not ev.kernel_counted:
            self._count_user(ev)  # a candidate the probe set accepted at once
        self.on_event(ev)

    def poll(self, timeout_ms: int = 100) -> None:
        """Wait up to ``timeout_ms`` for records, dispatch them, then any due user-space events."""
        if self._bpf is None:
            raise ObserverError("probe session is not started")
        if self.perfbuf:
            self._bpf.perf_buffer_poll(timeout=timeout_ms)
        else:
            self._bpf.ring_buffer_poll(timeout=timeout_ms)
        if self._cb_error is not None:
            err, self._cb_error = self._cb_error, None
            raise err
        self._flush_pending()

    def _flush_pending(self) -> None:
        now = time.monotonic_ns()
        for ps in self.probe_sets:
            for ev in ps.pending(now):
                if not ev.kernel_counted:
                    self._count_user(ev)
                self.on_event(ev)

    def _count_user(self, ev: Event) -> None:
        """Count an event user space made or accepted. Only ever adds: counters never go down."""
        key = (ev.event, ev.order, ev.result)
        self._user_counts[key] = self._user_counts.get(key, 0) + 1
        if ev.duration_ns:
            h = self._user_hist.setdefault((ev.event, ev.order), [0] * HIST_BUCKETS)
            h[min(ev.duration_ns.bit_length() - 1, HIST_BUCKETS - 1)] += 1

    # --- aggregates ------------------------------------------------------------------------
    def aggregates(self) -> Aggregates:
        if self._bpf is None:
            raise ObserverError("probe session is not started")
        counts: dict[CountKey, int] = dict(self._user_counts)
        raw_counts = u64_values(self._bpf[b"counts"])
        for key, n in self.aggregate_layout.decode_counts(raw_counts).items():
            counts[key] = counts.get(key, 0) + n
        hist = {k: list(v) for k, v in self._user_hist.items()}
        for key, buckets in self._read_kernel_hist(raw_counts).items():
            acc = hist.setdefault(key, [0] * HIST_BUCKETS)
            for i, n in enumerate(buckets):
                acc[i] += n
        # A failed perf_submit is also reported by the kernel as PERF_RECORD_LOST (self._perf_lost):
        # the BPF-side count alone is exact for both outputs.
        lost = u64_values(self._bpf[b"lost"])[0]
        return Aggregates(counts=counts, hist=hist, lost=lost)

    def _read_kernel_hist(self, raw_counts: list[int]) -> dict[HistKey, list[int]]:
        """The `hist` map (the bulk of a read: 600 slots with two hstates), read only when it may
        have changed. hvo_emit() adds to `counts` before `hist`, and every hist entry has its count: while
        the counts stay as they were, so does hist. A read right after the counts moved may come
        between an event's two increments, so hist is read once more at the next call, and from then
        on reused until the counts move again."""
        unchanged = raw_counts == self._kernel_counts
        self._kernel_counts = raw_counts
        if unchanged and self._kernel_hist is not None:
            return self._kernel_hist
        hist = self.aggregate_layout.decode_hist(u64_values(self._bpf[b"hist"]))
        self._kernel_hist = hist if unchanged else None
        return hist


def _has_ringbuf(facts: KernelFacts) -> bool:
    v = facts.version
    return (v.major, v.minor) >= (5, 8)


def _memory_layout(facts: KernelFacts) -> Any:
    from observer.kernel.memory_blocks import read_memory_layout

    try:
        return read_memory_layout(facts.root)
    except ObserverError as e:
        log.warning("no pfn->node map (%s): events carry no node", e)
        return None
