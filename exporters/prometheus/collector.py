"""The Prometheus collector: every family is computed from ONE model view taken at scrape time, so
a scrape is a consistent picture (pools, optimized pages, savings and drift from the same moment).

``Exposition(view).render(accept)`` is what GET /metrics serves: the model's families are encoded
once per model generation (the model changes only when an event arrives or a kernel reading differs,
so an idle daemon's scrapes reuse one body), the process metrics afresh at every scrape.
``registry(view)`` builds a registry holding only this collector and the process metrics.
Metric names and help texts are listed in METRICS (the README's table is generated from it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from observer.model import ModelView
from observer.probes.events import HIST_BUCKETS, EventType, Result

METRICS: dict[str, str] = {
    "hvo_build_info": "hvo-observer version, running kernel and probe mode (value 1).",
    "hvo_hvo_enabled": "1 when huge pages allocated now get HVO (vm.hugetlb_optimize_vmemmap, or the boot "
                       "setting on kernels without the sysctl), else 0.",
    "hvo_mode_degraded": "1 when the daemon runs in a worse probe mode than the kernel allows, some probe "
                         "is not attached, or the mode cannot see everything on this kernel (tracepoint "
                         "mode without nr_memmap_* counters, pfns unknown under KASLR; see hvo-observer "
                         "doctor), else 0.",
    "hvo_probe_attached": "1 when the probe is attached, 0 when attaching it failed.",
    "hvo_hugepages": "Huge pages in the pool (nr_hugepages, surplus pages included).",
    "hvo_hugepages_free": "Free huge pages in the pool (free_hugepages).",
    "hvo_hugepages_surplus": "Surplus huge pages in the pool (surplus_hugepages).",
    "hvo_optimized_hugepages": "Huge pages whose vmemmap is optimized (HVO applied) right now; "
                               "node=\"unknown\" for an hstate with pages on several nodes when events "
                               "carry no node (hvo_mode_degraded).",
    "hvo_vmemmap_freeable_pages": "vmemmap pages HVO frees per huge page of this hstate "
                                  "(the kernel's nr_free_vmemmap_pages).",
    "hvo_vmemmap_saved_bytes": "vmemmap memory HVO saves now. source=expected: optimized pages x freeable "
                               "pages (total, and per hstate/node); source=kernel: the full vmemmap "
                               "(hvo_memmap_unoptimized_pages) minus nr_memmap_pages + nr_memmap_boot_pages "
                               "(6.11+, global only).",
    "hvo_memmap_pages": "The kernel's vmemmap counters from /proc/vmstat (6.11+).",
    "hvo_memmap_unoptimized_pages": "vmemmap pages with nothing optimized: present RAM sections (online or "
                                    "offline) x vmemmap pages per section, calibrated against the kernel's "
                                    "counters whenever the pools are empty (device memory included); absent "
                                    "while unknown.",
    "hvo_reconcile_drift_bytes": "Expected minus kernel saved bytes at the last quiet moment (no event and "
                                 "no counter change for the settle window); 0 when the model is right.",
    "hvo_reconcile_pending_drift_bytes": "Expected minus kernel saved bytes right now; may be non-zero "
                                         "while operations are in flight.",
    "hvo_reconcile_settled": "1 when the kernel has been quiet for the settle window and drift is current.",
    "hvo_reconcile_settle_window_seconds": "Quiet time required before drift is evaluated.",
    "hvo_reconcile_byte_truth": "1 when the kernel counts its vmemmap (6.11+) so savings can be checked in "
                                "bytes, 0 when only page counts can be reconciled.",
    "hvo_reconcile_inconsistent": "1 when the event-derived counts were impossible at the last quiet moment "
                                  "(and could not be resynced), else 0.",
    "hvo_baseline_exact": "1 when the start-up/resync baseline is the only split consistent with the "
                          "kernel's counters, 0 when a rule had to choose (see hvo-observer explain).",
    "hvo_events_total": "HVO events. Events a probe saw are counted in the kernel: exact, even when their "
                        "records are lost. Inferred events are estimates, counted when user space settles "
                        "them and never taken back: tracepoint mode's optimize/restore (from the vmemmap "
                        "counters) and restore errors (from free surplus pages), pool events found by a "
                        "resync, and tracepoint mode's gigantic allocations (confirmed in "
                        "/proc/kpageflags).",
    "hvo_events_lost_total": "Event records the ring/perf buffer could not take (a loss triggers a resync "
                             "at the next quiet moment).",
    "hvo_resyncs_total": "Times the optimized counts were recomputed from the kernel's counters.",
    "hvo_operation_duration_seconds": "Duration of HVO operations, from the in-kernel log2 histogram "
                                      "(bucket bounds are powers of two nanoseconds, 2^10 to 2^36 ns; the "
                                      "sum is estimated from bucket midpoints).",
}

# Exported bucket bounds: 2**10 ns (~1 us) .. 2**36 ns (~69 s), then +Inf. Smaller durations fall into
# the first bucket. A fixed set keeps every series' buckets stable for histogram_quantile().
_FIRST_BOUND_LOG2, _LAST_BOUND_LOG2 = 10, 36
_BOUND_TEXT = {bound: repr((1 << bound) / 1e9) for bound in range(_FIRST_BOUND_LOG2, _LAST_BOUND_LOG2 + 1)}
_ZERO_SERIES = ((EventType.OPTIMIZE, (Result.OK, Result.ERROR, Result.SKIPPED)),
                (EventType.RESTORE, (Result.OK, Result.ERROR, Result.SKIPPED)),
                (EventType.POOL_ALLOC, (Result.OK,)), (EventType.POOL_FREE, (Result.OK,)))


def _gauge(name: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name], labels=labels)


def histogram_buckets(counts: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and an estimated sum (seconds) from log2(ns) buckets, where
    bucket i holds durations in [2**i, 2**(i+1)) ns."""
    total_ns = 0.0
    for i, n in enumerate(counts):
        total_ns += n * (1.0 if i == 0 else 1.5 * (1 << i))
    running = list(accumulate(counts, initial=0))  # running[b]: durations below 2**b ns
    buckets = [(_BOUND_TEXT[bound], float(running[min(bound, len(counts))]))
               for bound in range(_FIRST_BOUND_LOG2, _LAST_BOUND_LOG2 + 1)]
    buckets.append(("+Inf", float(running[-1])))
    return buckets, total_ns / 1e9


class HvoCollector(Collector):
    def __init__(self, view: Callable[[], ModelView]) -> None:
        self._view = view

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time only; registering must not take a view

    def collect(self) -> Iterator[Metric]:
        return families(self._view())


def families(v: ModelView) -> Iterator[Metric]:
    """Every hvo_* family, computed from this one view."""
    for section, _ in SECTIONS:
        yield from section(v)


def _runtime_families(v: ModelView) -> Iterator[Metric]:
    rt = v.runtime
    g = _gauge("hvo_build_info", ["version", "kernel", "mode"])
    g.add_metric([rt.version, rt.kernel, rt.mode], 1)
    yield g
    if v.hvo_enabled is not None or v.hstates:
        g = _gauge("hvo_hvo_enabled")
        enabled = v.hvo_enabled if v.hvo_enabled is not None else any(s.eligible for s in v.hstates)
        g.add_metric([], int(enabled))
        yield g
    g = _gauge("hvo_mode_degraded")
    g.add_metric([], int(rt.degraded))
    yield g
    g = _gauge("hvo_probe_attached", ["probe", "event", "mode"])
    for p in rt.probes:
        g.add_metric([p.probe, p.event, p.mode], int(p.attached))
    yield g


def _pool_families(v: ModelView) -> Iterator[Metric]:
    """Per hstate and node: the bulk of a body on a host with many nodes."""
    pools = _gauge("hvo_hugepages", ["hstate", "node"])
    free = _gauge("hvo_hugepages_free", ["hstate", "node"])
    surplus = _gauge("hvo_hugepages_surplus", ["hstate", "node"])
    optimized = _gauge("hvo_optimized_hugepages", ["hstate", "node"])
    for p in v.pools:
        labels = [p.hstate, str(p.node)]
        pools.add_metric(labels, p.pages)
        free.add_metric(labels, p.free)
        surplus.add_metric(labels, p.surplus)
    # node="unknown" for an hstate whose per-node split is a guess (ModelView.split_unknown)
    by_node = [(hstate, "unknown" if node is None else str(node), n)
               for hstate, node, n in v.optimized_by_node()]
    for hstate, node, n in by_node:
        optimized.add_metric([hstate, node], n)
    yield from (pools, free, surplus, optimized)

    g = _gauge("hvo_vmemmap_freeable_pages", ["hstate"])
    for s in v.hstates:
        g.add_metric([s.name], s.freeable_pages)
    yield g

    # Totals carry only `source`; the per-hstate/node breakdown of "expected" adds hstate and node,
    # so rules select one or the other with hstate="" / hstate!="".
    saved = Metric("hvo_vmemmap_saved_bytes", METRICS["hvo_vmemmap_saved_bytes"], "gauge")
    name = "hvo_vmemmap_saved_bytes"
    saved.samples.append(Sample(name, {"source": "expected"}, v.expected_saved_pages * v.page_size))
    if v.kernel_saved_pages is not None:
        saved.samples.append(Sample(name, {"source": "kernel"}, v.kernel_saved_pages * v.page_size))
    freeable = {s.name: s.freeable_pages for s in v.hstates}
    for hstate, node, n in by_node:
        saved.samples.append(Sample(name, {"source": "expected", "hstate": hstate, "node": node},
                                    n * freeable.get(hstate, 0) * v.page_size))
    yield saved


def _reconcile_families(v: ModelView) -> Iterator[Metric]:
    if v.memmap_counters is not None:
        g = _gauge("hvo_memmap_pages", ["counter"])
        g.add_metric(["nr_memmap_pages"], v.memmap_counters[0])
        g.add_metric(["nr_memmap_boot_pages"], v.memmap_counters[1])
        yield g
    if v.full_memmap_pages is not None:
        g = _gauge("hvo_memmap_unoptimized_pages")
        g.add_metric([], v.full_memmap_pages)
        yield g

    if v.drift_bytes is not None:
        g = _gauge("hvo_reconcile_drift_bytes")
        g.add_metric([], v.drift_bytes)
        yield g
    if v.pending_drift_bytes is not None:
        g = _gauge("hvo_reconcile_pending_drift_bytes")
        g.add_metric([], v.pending_drift_bytes)
        yield g
    for metric, value in (("hvo_reconcile_settled", int(v.settled)),
                          ("hvo_reconcile_settle_window_seconds", v.settle_seconds),
                          ("hvo_reconcile_byte_truth", int(v.byte_truth)),
                          ("hvo_reconcile_inconsistent", int(bool(v.inconsistent))),
                          ("hvo_baseline_exact", int(bool(v.baseline and v.baseline.exact)))):
        g = _gauge(metric)
        g.add_metric([], value)
        yield g


def _event_families(v: ModelView) -> Iterator[Metric]:
    """Event counters and latency histograms: what changes while the kernel is busy."""
    order_name = {s.order: s.name for s in v.hstates}

    def hstate(order: int) -> str:
        if order < 0:  # aggregates.OTHER_ORDER: pages of an order no hstate has
            return "other"
        return order_name.get(order) or f"{(v.page_size << order) // 1024}kB"

    c = CounterMetricFamily("hvo_events", METRICS["hvo_events_total"],
                            labels=["event", "hstate", "result"])
    counts = dict(v.counts)
    for s in v.hstates:
        for ev, results in _ZERO_SERIES:
            for res in results:
                counts.setdefault((ev, s.order, res), 0)
    for (ev, order, res), n in sorted(counts.items()):
        c.add_metric([ev.label, hstate(order), res.label], n)
    yield c
    c = CounterMetricFamily("hvo_events_lost", METRICS["hvo_events_lost_total"])
    c.add_metric([], v.events_lost)
    yield c
    c = CounterMetricFamily("hvo_resyncs", METRICS["hvo_resyncs_total"])
    c.add_metric([], v.resyncs)
    yield c

    h = HistogramMetricFamily("hvo_operation_duration_seconds", METRICS["hvo_operation_duration_seconds"],
                              labels=["op", "hstate"])
    hist = dict(v.hist)
    for s in v.hstates:  # every op/hstate series exists from the first scrape, like hvo_events_total
        for ev in (EventType.OPTIMIZE, EventType.RESTORE):
            hist.setdefault((ev, s.order), [0] * HIST_BUCKETS)
    for (ev, order), buckets in sorted(hist.items()):
        h.samples.extend(_histogram_series(ev.label, hstate(order), tuple(buckets)))
    yield h


# (op, hstate) -> the buckets last encoded as samples, and those samples: one entry per series
_HIST_SERIES: dict[tuple[str, str], tuple[tuple[int, ...], tuple[Sample, ...]]] = {}


def _histogram_series(op: str, hstate: str, buckets: tuple[int, ...]) -> tuple[Sample, ...]:
    """One series of hvo_operation_duration_seconds: the same samples (the same objects, which the
    series cache compares at no cost) while its buckets stay the same."""
    cached = _HIST_SERIES.get((op, hstate))
    if cached is not None and cached[0] == buckets:
        return cached[1]
    h = HistogramMetricFamily("hvo_operation_duration_seconds", "", labels=["op", "hstate"])
    cumulative, total = histogram_buckets(list(buckets))
    h.add_metric([op, hstate], cumulative, total)
    samples = tuple(h.samples)
    _HIST_SERIES[(op, hstate)] = (buckets, samples)
    return samples


# The families in sections, each with what it is computed from: Exposition re-encodes a section only
# when that changed (a busy kernel moves the event counters, not the per-node pools). None: always.
SECTIONS: tuple[tuple[Callable[[ModelView], Iterator[Metric]],
                      Callable[[ModelView], object] | None], ...] = (
    (_runtime_families, None),
    (_pool_families, lambda v: (v.pools, v.hstates, v.page_size, v.expected_saved_pages,
                                v.kernel_saved_pages, v.runtime.nodes_known)),
    (_reconcile_families, None),
    (_event_families, lambda v: (v.counts, v.hist, v.hstates, v.page_size, v.events_lost, v.resyncs)),
)


def registry(view: Callable[[], ModelView], process: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HvoCollector(view))
    if process:
        ProcessCollector(registry=reg)
    return reg


_OPENMETRICS_EOF = b"# EOF\n"
_MAX_BODIES = 8  # formats cached per generation (Accept headers may vary the version/escaping)
_MAX_SERIES = 50_000  # encoded series kept (all formats): far above a 2-hstate x 64-node body's ~900
# samples the text format moves to a family of their own (after the others): never cached per series
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")
_Labels = tuple[tuple[str, str], ...]


class _Families(Collector):
    """Given families, as a collector: what an encoder is handed."""

    def __init__(self, *metrics: Metric) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


class _SeriesCache:
    """Encoded sample lines per (format, family, series), reused while the series' samples are equal.

    A series is one label set without ``le``: one counter or gauge sample, or a histogram's buckets,
    count and sum. While the kernel is busy an aggregate read moves a few series (the ops running
    now) of a section that has hundreds; only those are encoded again. The lines come from the
    format's own encoder (a family holding that series alone, its comment lines dropped), so the body
    is byte for byte what the encoder makes of the whole family."""

    def __init__(self) -> None:
        self._headers: dict[tuple[str, str], bytes] = {}  # (type, family) -> # HELP/TYPE/UNIT lines
        # (type, family, labels without le) -> the samples last encoded, their lines
        self._series: dict[tuple[str, str, _Labels], tuple[tuple[Sample, ...], bytes]] = {}

    def encode(self, metric: Metric, encoder: Callable[[Collector], bytes], content_type: str) -> bytes:
        if any(s.name.endswith(_OM_ONLY_SUFFIXES) for s in metric.samples):
            return _strip_eof(encoder(_Families(metric)))
        header = self._headers.get((content_type, metric.name))
        if header is None:
            header = self._headers[(content_type, metric.name)] = _strip_eof(
                encoder(_Families(Metric(metric.name, metric.documentation, metric.type, metric.unit))))
        parts = [header]
        for labels, samples in _series(metric.samples):
            slot = (content_type, metric.name, labels)
            cached = self._series.get(slot)
            if cached is not None and cached[0] == samples:
                parts.append(cached[1])
                continue
            family = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            family.samples = list(samples)
            lines = b"".join(line for line in encoder(_Families(family)).splitlines(keepends=True)
                             if not line.startswith(b"#"))
            if len(self._series) >= _MAX_SERIES:
                self._series.clear()
            self._series[slot] = (samples, lines)
            parts.append(lines)
        return b"".join(parts)


def _series(samples: list[Sample]) -> Iterator[tuple[_Labels, tuple[Sample, ...]]]:
    """(labels without le, samples) of each series in a family's samples. A histogram's bucket
    samples come before its count and sum, which carry the series' labels."""
    groups: dict[_Labels, list[Sample]] = {}
    buckets: list[Sample] = []
    for sample in samples:
        if "le" in sample.labels:
            buckets.append(sample)
            continue
        group = groups.setdefault(tuple(sample.labels.items()), [])
        if buckets:
            group.extend(buckets)
            buckets = []
        group.append(sample)
    for sample in buckets:  # buckets without a count: grouped by their own labels
        groups.setdefault(tuple(kv for kv in sample.labels.items() if kv[0] != "le"), []).append(sample)
    return ((labels, tuple(group)) for labels, group in groups.items())


def _strip_eof(body: bytes) -> bytes:
    return body.removesuffix(_OPENMETRICS_EOF)


class Exposition:
    """The body of GET /metrics for one model: its families encoded once per model generation and
    format, the process metrics (CPU, memory, fds: they change all the time) encoded at each scrape.
    A new generation re-encodes only the SECTIONS whose inputs changed (while the kernel is busy the
    event counters move at every aggregate read, the per-hstate/node pool families rarely) and, in a
    changed section, only the series that changed (_SeriesCache)."""

    def __init__(self, view: Callable[[], ModelView], process: bool = True) -> None:
        self._view = view
        self._process = ProcessCollector(registry=None) if process else None
        self._lock = threading.Lock()
        self._generation = -1
        self._bodies: dict[str, bytes] = {}  # content type -> the model's part of the body
        self._sections: dict[tuple[str, int], tuple[object, bytes]] = {}  # (type, section) -> key, bytes
        self._series = _SeriesCache()
        self._encoding = threading.Lock()  # one encoding at a time: they share the series cache

    def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a request with this Accept header."""
        encoder, content_type = choose_encoder(accept)
        v = self._view()
        with self._lock:
            if v.generation > self._generation:  # generations only grow; a racing older view encodes anew
                self._generation, self._bodies = v.generation, {}
            body = self._bodies.get(content_type) if v.generation == self._generation else None
        if body is None:
            with self._encoding:
                body = self._encode(v, encoder, content_type)
            with self._lock:
                if v.generation == self._generation:
                    if len(self._bodies) >= _MAX_BODIES:
                        self._bodies.clear()
                    self._bodies[content_type] = body
        if self._process is None:
            return body, content_type
        if content_type.startswith("application/openmetrics-text"):  # one "# EOF" line, at the very end
            body = _strip_eof(body)
        return body + encoder(self._process), content_type

    def _encode(self, v: ModelView, encoder: Callable[[Collector], bytes], content_type: str) -> bytes:
        openmetrics = content_type.startswith("application/openmetrics-text")
        parts = []
        for i, (section, inputs) in enumerate(SECTIONS):
            key = inputs(v) if inputs is not None else None
            cached = self._sections.get((content_type, i)) if inputs is not None else None
            if cached is not None and cached[0] == key:
                parts.append(cached[1])
                continue
            if inputs is None:  # a few samples, all of which may change: encoded whole
                part = _strip_eof(encoder(_Families(*section(v))))
            else:
                part = b"".join(self._series.encode(m, encoder, content_type) for m in section(v))
                if len(self._sections) >= _MAX_BODIES * len(SECTIONS):
                    self._sections.clear()
                self._sections[(content_type, i)] = (key, part)
            parts.append(part)
        return b"".join(parts) + (_OPENMETRICS_EOF if openmetrics else b"")
