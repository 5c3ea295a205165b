"""The one table of what hvo-observer probes, in which mode, through which kernel target.

Each ``ProbeSpec`` says: to observe ``event`` in one of ``modes``, use the first of ``targets``
that exists on the running kernel (observer/probes/resolve.py decides), with the BPF handler
template ``handler`` (a function name in the contributing ProbeSet's BPF text).

kind:
  "function"   targets are kernel symbol candidates, newest generation first (a compiler clone
               ``name.isra.N`` / ``.constprop.N`` / ``.part.N`` of a candidate is accepted in kprobe mode)
  "tracepoint" targets are "system:event"
  "counter"    targets are "file:field" counters sampled in user space (inferred events)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from observer.probes.events import EventType

Kind = Literal["function", "tracepoint", "counter"]

TRACEPOINT = frozenset({"tracepoint"})
FUNCTION_MODES = frozenset({"fentry", "kprobe"})


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    event: EventType
    kind: Kind
    targets: tuple[str, ...]
    handler: str
    modes: frozenset[str]
    note: str = ""


CATALOG: tuple[ProbeSpec, ...] = (
    # --- tracepoint mode ---
    ProbeSpec(
        EventType.POOL_ALLOC, "tracepoint", ("kmem:mm_page_alloc",), "tp_page_alloc", TRACEPOINT,
        "buddy allocation at a hugetlb hstate order with hugetlb's gfp signature (__GFP_COMP, no "
        "__GFP_NOMEMALLOC, __GFP_RETRY_MAYFAIL or __GFP_THISNODE); the pfn joins the known set",
    ),
    ProbeSpec(
        EventType.POOL_ALLOC, "tracepoint", ("page_isolation:test_pages_isolated",),
        "tp_pages_isolated", TRACEPOINT,
        "gigantic (1 GiB) runtime pages come from alloc_contig_range: a successful isolation of a "
        "size-aligned range of exactly one gigantic page counts as its allocation (heuristic)",
    ),
    ProbeSpec(
        EventType.POOL_FREE, "tracepoint", ("kmem:mm_page_free",), "tp_page_free", TRACEPOINT,
        "a free at a hugetlb order of a pfn in the known set (seeded from /proc/kpageflags at start)",
    ),
    ProbeSpec(
        EventType.OPTIMIZE, "counter", ("/proc/vmstat:nr_memmap_pages", "/proc/vmstat:nr_memmap_boot_pages"),
        "infer_optimize", TRACEPOINT,
        "inferred after pool allocations from the vmemmap counters (6.11+) and vm.hugetlb_optimize_vmemmap",
    ),
    ProbeSpec(
        EventType.RESTORE, "counter", ("/proc/vmstat:nr_memmap_pages", "/proc/vmstat:nr_memmap_boot_pages"),
        "infer_restore", TRACEPOINT,
        "inferred after pool frees of optimized pages from the vmemmap counters (6.11+); a restore "
        "failure (page kept as surplus) cannot be told from a page that was never freed",
    ),
    # --- function probes ---
    # Targets are symbol candidates newest generation first; observer/probes/functions.py resolves
    # them (compiler clones only for return-only handlers) and holds the handler table.
    ProbeSpec(
        EventType.OPTIMIZE, "function",
        ("__hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize",
         "hugetlb_vmemmap_free", "free_huge_page_vmemmap"),
        "fn_optimize", FUNCTION_MODES,
        "one event per huge page: the 6.7+ static per-folio worker (the batched and single-folio "
        "functions both call it) before the exported entry points of older generations; never both. "
        "ok: HPG_vmemmap_optimized set at exit; skipped: returned without optimizing (sysctl off, "
        "self-hosted vmemmap, already optimized); error: ret < 0 or a failed remap inside",
    ),
    ProbeSpec(
        EventType.OPTIMIZE, "function", ("hugetlb_vmemmap_optimize_folio",), "fn_optimize", FUNCTION_MODES,
        "6.7+ single-folio path (surplus/migration pages; 7.x: every fresh page outside a pool grow), "
        "probed as well: 7.x builds call the worker's body from it through a .part clone that the "
        "worker probe does not see. When it calls the probed worker, the outer call reports (once)",
    ),
    ProbeSpec(
        EventType.RESTORE, "function",
        ("__hugetlb_vmemmap_restore_folio", "hugetlb_vmemmap_restore_folio", "hugetlb_vmemmap_restore",
         "hugetlb_vmemmap_alloc", "alloc_huge_page_vmemmap"),
        "fn_restore", FUNCTION_MODES,
        "one event per huge page (6.7+ per-folio worker first); error: ret < 0 (-ENOMEM: the page "
        "stays in the pool as surplus); skipped: the page was not optimized",
    ),
    ProbeSpec(
        EventType.REMAP_FREE, "function", ("vmemmap_remap_free", "vmemmap_remap_range"), "fn_remap",
        FUNCTION_MODES,
        "the page-table remap of optimize (static, often inlined: optional); else the common walker "
        "vmemmap_remap_range, whose walk->remap_pte tells the direction; order and head page from "
        "the [start, end) vmemmap range, whatever the argument layout (7.1+ dropped 'reuse')",
    ),
    ProbeSpec(
        EventType.REMAP_ALLOC, "function", ("vmemmap_remap_alloc", "vmemmap_remap_range"), "fn_remap",
        FUNCTION_MODES,
        "the page-table remap of restore (optional), as for remap_free; one program serves both when "
        "both resolve to vmemmap_remap_range",
    ),
    ProbeSpec(
        EventType.POOL_ALLOC, "function", ("only_alloc_fresh_hugetlb_folio", "alloc_pool_huge_folio"),
        "fn_pool_alloc", FUNCTION_MODES,
        "6.7+ pool grow (7.x: every fresh page, alloc_fresh_hugetlb_folio calls it); its .isra clone "
        "is probed at return only (kprobe), fentry falls back to alloc_pool_huge_folio",
    ),
    ProbeSpec(
        EventType.POOL_ALLOC, "function",
        ("alloc_fresh_hugetlb_folio", "alloc_fresh_huge_page", "alloc_surplus_hugetlb_folio"),
        "fn_pool_alloc", FUNCTION_MODES,
        "every fresh huge page up to 6.6; from 6.7 surplus and migration pages. Order from the "
        "returned folio; an inner probed allocator stays silent while an outer one is in flight, so "
        "a page counts once. Missing one of these, pool events come from the tracepoints instead",
    ),
    ProbeSpec(
        EventType.POOL_FREE, "function",
        ("__update_and_free_hugetlb_folio", "__update_and_free_page", "update_and_free_hugetlb_folio",
         "update_and_free_page"),
        "fn_pool_free", FUNCTION_MODES,
        "a huge page leaves hugetlb for the buddy allocator (shrink, dissolve, surplus; atomic-context "
        "frees are counted when deferred to the workqueue); error when its vmemmap restore failed "
        "in the call (the page stays as surplus)",
    ),
    ProbeSpec(
        EventType.DEMOTE, "function",
        ("demote_free_hugetlb_folios", "demote_free_hugetlb_folio", "demote_free_huge_page",
         "demote_pool_huge_page", "demote_store"),
        "fn_demote", FUNCTION_MODES,
        "5.16+; one event per source page (6.11+ takes a list: up to 8 pages per call). Where those "
        "are inlined (Debian 6.1/6.12/7.x), a vmemmap restore inside demote_pool_huge_page or "
        "demote_store is the demoted page (not seen for never-optimized pages on 6.7+). error: its "
        "vmemmap restore failed",
    ),
)


def specs_for(mode: str, catalog: tuple[ProbeSpec, ...] = CATALOG) -> list[ProbeSpec]:
    return [s for s in catalog if mode in s.modes]
