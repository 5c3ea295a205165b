"""``hvo-observer doctor``: what this kernel supports, what HVO frees per hstate, and which probes
resolve. Reads only; never changes the system (beyond mounting tracefs/securityfs to look)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any

from observer import geometry, modes
from observer.errors import ObserverError
from observer.kernel.facts import KernelFacts, gather


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _toolchain() -> dict[str, Any]:
    bcc = importlib.util.find_spec("bcc") is not None
    result: dict[str, Any] = {"bcc": {"available": bcc, "reason": "" if bcc else
                                      "python module bcc not importable (install python3-bpfcc; "
                                      "use a venv with --system-site-packages)"}}
    try:
        from observer.kernel import headers
    except ImportError:
        return result
    try:
        choice = headers.find_bcc_headers()
        result["headers"] = {"available": True, "path": str(choice.path), "exact": choice.exact}
    except ObserverError as e:
        result["headers"] = {"available": False, "reason": str(e)}
    return result


def _probes(facts: KernelFacts, support: dict[str, modes.ModeSupport]) -> dict[str, list[dict[str, Any]]]:
    """What each mode's probes resolve to on this kernel (when the probe catalog is installed)."""
    try:
        from observer.probes.catalog import CATALOG
        from observer.probes.resolve import resolve
    except ImportError:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in modes.MODES:
        out[mode] = [{"event": r.spec.event.label, "target": r.target, "ok": r.ok, "reason": r.reason}
                     for r in resolve(CATALOG, facts, mode)]
    return out


def report(facts: KernelFacts) -> dict[str, Any]:
    support = modes.mode_support(facts)
    best, why = modes.best_mode(support)
    hvo = geometry.hvo_support(facts)
    counters = facts.memmap_counters()
    layout = facts.memory_layout()
    struct_page = facts.struct_page_size or 64
    pools = {h.name: h for h in facts.hstates()}
    hstates = []
    for name, g in geometry.geometry_for(facts).items():
        pool = pools[name]
        hstates.append({
            "name": name, "size_bytes": g.size_bytes, "order": g.order,
            "nr_hugepages": pool.nr_hugepages, "free_hugepages": pool.free_hugepages,
            "nodes": {str(n): p.nr_hugepages for n, p in sorted(pool.nodes.items())},
            "struct_pages": g.struct_pages, "vmemmap_pages": g.vmemmap_pages,
            "reserved_vmemmap_pages": g.reserved_vmemmap_pages,
            "freeable_vmemmap_pages": g.freeable_vmemmap_pages,
            "eligible": g.eligible, "reason": g.reason, "notes": list(g.notes),
        })
    boot = facts.boot_params
    return {
        "kernel": facts.release,
        "machine": facts.machine,
        "lockdown": facts.lockdown,
        "btf": facts.btf is not None,
        "struct_page_size": facts.struct_page_size,
        "page_size": facts.page_size,
        "modes": {m: {"available": s.available, "reason": s.reason} for m, s in support.items()},
        "best_mode": best,
        "mode_reason": why,
        "mode_limits": {m: modes.mode_limits(facts, m) for m in modes.MODES if support[m].available},
        "hvo_built": hvo.built,
        "hvo_enabled": hvo.enabled,
        "hvo_sysctl": facts.hvo_sysctl(),
        "hvo_reason": hvo.reason,
        "memmap_counters": counters is not None,
        "memmap": None if counters is None else {
            "nr_memmap_pages": counters.memmap_pages, "nr_memmap_boot_pages": counters.memmap_boot_pages},
        "memory": {
            "block_size_bytes": layout.block_size_bytes,
            "online_blocks": sum(1 for b in layout.blocks if b.online),
            "baseline_memmap_pages": geometry.baseline_memmap_pages(layout, struct_page, facts.page_size),
        },
        "boot_params": {
            "hugepages": [{"size_bytes": s, "count": c} for s, c in boot.hugepages],
            "hugetlb_free_vmemmap": boot.hugetlb_free_vmemmap,
            "memmap_on_memory": boot.memmap_on_memory,
        },
        "hstates": hstates,
        "probes": _probes(facts, support),
        "toolchain": _toolchain(),
    }


def _human(r: dict[str, Any]) -> str:
    yes = {True: "yes", False: "no", None: "unknown"}
    lines = [f"kernel      {r['kernel']} ({r['machine']}), lockdown: {r['lockdown'] or 'none'}, "
             f"BTF: {yes[r['btf']]}, sizeof(struct page): {r['struct_page_size'] or 'unknown'}",
             "modes"]
    for mode, s in r["modes"].items():
        lines.append(f"  {mode:<11} {'available' if s['available'] else 'unavailable: ' + s['reason']}")
    lines.append(f"  -> {r['mode_reason']}")
    for mode, limits in r["mode_limits"].items():
        lines.extend(f"  {mode:<11} degraded: {why}" for why in limits)
    lines.append(f"HVO         {'enabled' if r['hvo_enabled'] else 'not applied now: ' + r['hvo_reason']}")
    if r["memmap"]:
        m = r["memmap"]
        lines.append(f"vmemmap     nr_memmap_pages {m['nr_memmap_pages']}, nr_memmap_boot_pages "
                     f"{m['nr_memmap_boot_pages']}, "
                     f"baseline {r['memory']['baseline_memmap_pages']}")
    else:
        lines.append("vmemmap     no nr_memmap counters (kernel < 6.11): savings are checked by page counts")
    lines.append("hstates     name        pool  vmemmap/page  freeable/page  eligible")
    for h in r["hstates"]:
        # The kernel-wide reason is printed once above; only hstate-specific ones here.
        own = h["reason"] if h["reason"] and h["reason"] != r["hvo_reason"] else ""
        lines.append(f"            {h['name']:<10} {h['nr_hugepages']:>5}  {h['vmemmap_pages']:>12}  "
                     f"{h['freeable_vmemmap_pages']:>13}  {yes[h['eligible']]}"
                     + (f" ({own})" if own else ""))
        lines.extend(f"              note: {n}" for n in h["notes"])
    if r["probes"]:
        lines.append("probes")
        for mode, entries in r["probes"].items():
            for e in entries:
                status = f"-> {e['target']}" if e["ok"] else f"unresolved: {e['reason']}"
                lines.append(f"  {mode:<11} {e['event']:<12} {status}")
    tc = r["toolchain"]
    lines.append(f"toolchain   bcc: {'ok' if tc['bcc']['available'] else tc['bcc']['reason']}")
    if "headers" in tc:
        h = tc["headers"]
        lines.append("            headers: " + (f"{h['path']}" + ("" if h["exact"] else
                     " (not this kernel's: layout-independent programs only, offsets from BTF)")
                     if h["available"] else h["reason"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    r = report(gather())
    print(json.dumps(r, indent=2) if args.json else _human(r))
    return 0 if r["best_mode"] is not None else 1
