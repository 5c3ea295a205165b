"""The model's view as JSON: the body of ``/api/v1/status`` and what ``status``/``explain`` read.

Shape (bytes are bytes, pages are base pages; ``null`` where the kernel cannot tell):

    {"version", "kernel", "mode", "mode_reason", "degraded", "degraded_reasons", "nodes_known",
     "started_unix", "uptime_seconds", "page_size", "hvo_enabled",
     "hstates": [{"name", "order", "freeable_vmemmap_pages", "eligible", "pages", "free", "surplus",
                  "optimized", "expected_saved_bytes",
                  "nodes": [{"node", "pages", "free", "surplus", "optimized", "expected_saved_bytes"}]}],
                  (a node's optimized and expected_saved_bytes are null when the split by node is
                  unknown: ModelView.split_unknown)
     "saved_bytes": {"expected", "kernel"},
     "memmap": {"nr_memmap_pages", "nr_memmap_boot_pages", "unoptimized_pages"},
     "reconcile": {"byte_truth", "settled", "settle_seconds", "quiet_seconds", "drift_bytes",
                   "pending_drift_bytes", "inconsistent", "resyncs", "last_resync": {"reason", "unix_time"},
                   "events_lost", "events_seen",
                   "baseline": {"exact", "candidates", "provisional", "note"}},
     "events": [{"event", "hstate", "result", "count"}],
     "probes": [{"probe", "event", "mode", "attached", "reason"}]}
"""

from __future__ import annotations

import time
from typing import Any

from observer.model import ModelView


def view_to_json(v: ModelView) -> dict[str, Any]:
    rt = v.runtime
    freeable = {s.name: s.freeable_pages for s in v.hstates}
    hstates = []
    names = [s.name for s in v.hstates] + sorted({p.hstate for p in v.pools} - set(freeable))
    for name in names:
        spec = next((s for s in v.hstates if s.name == name), None)
        nodes = [p for p in v.pools if p.hstate == name]
        per_page = freeable.get(name, 0) * v.page_size
        split_unknown = v.split_unknown(name)
        hstates.append({
            "name": name,
            "order": spec.order if spec else None,
            "freeable_vmemmap_pages": freeable.get(name, 0),
            "eligible": spec.eligible if spec else False,
            "pages": sum(p.pages for p in nodes),
            "free": sum(p.free for p in nodes),
            "surplus": sum(p.surplus for p in nodes),
            "optimized": sum(p.optimized for p in nodes),
            "expected_saved_bytes": sum(p.optimized for p in nodes) * per_page,
            "nodes": [{"node": p.node, "pages": p.pages, "free": p.free, "surplus": p.surplus,
                       "optimized": None if split_unknown else p.optimized,
                       "expected_saved_bytes": None if split_unknown else p.optimized * per_page}
                      for p in nodes],
        })
    order_name = {s.order: s.name for s in v.hstates}
    base = v.baseline
    return {
        "version": rt.version,
        "kernel": rt.kernel,
        "mode": rt.mode,
        "mode_reason": rt.mode_reason,
        "degraded": rt.degraded,
        "degraded_reasons": list(rt.degraded_reasons),
        "nodes_known": rt.nodes_known,  # False: events carry no node (see the nodes' optimized)
        "started_unix": rt.started_unix,
        "uptime_seconds": round(time.time() - rt.started_unix, 3),
        "page_size": v.page_size,
        "hvo_enabled": v.hvo_enabled,
        "hstates": hstates,
        "saved_bytes": {
            "expected": v.expected_saved_pages * v.page_size,
            "kernel": None if v.kernel_saved_pages is None else v.kernel_saved_pages * v.page_size,
        },
        "memmap": {
            "nr_memmap_pages": v.memmap_counters[0] if v.memmap_counters else None,
            "nr_memmap_boot_pages": v.memmap_counters[1] if v.memmap_counters else None,
            "unoptimized_pages": v.full_memmap_pages,
        },
        "reconcile": {
            "byte_truth": v.byte_truth,
            "settled": v.settled,
            "settle_seconds": v.settle_seconds,
            "quiet_seconds": round(v.quiet_seconds, 3),
            "drift_bytes": v.drift_bytes,
            "pending_drift_bytes": v.pending_drift_bytes,
            "inconsistent": v.inconsistent or None,
            "resyncs": v.resyncs,
            "last_resync": ({"reason": v.last_resync[0], "unix_time": v.last_resync[1]}
                            if v.last_resync else None),
            "events_lost": v.events_lost,
            "events_seen": v.events_seen,
            "baseline": ({"exact": base.exact, "candidates": base.candidates, "provisional": base.provisional,
                          "note": base.note} if base else None),
        },
        "events": [{"event": ev.label, "result": res.label, "count": n,
                    "hstate": order_name.get(order)
                    or ("other" if order < 0 else f"{(v.page_size << order) // 1024}kB")}
                   for (ev, order, res), n in sorted(v.counts.items()) if n],
        "probes": [{"probe": p.probe, "event": p.event, "mode": p.mode, "attached": p.attached,
                    "reason": p.reason} for p in rt.probes],
    }
