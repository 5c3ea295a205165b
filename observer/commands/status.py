"""``hvo-observer status``: one screen of what HVO is doing on this host.

From the running daemon's ``/api/v1/status`` (plus its recent failed events); with no daemon, from
the same reconciliation model fed with one kernel snapshot only (observer.model + observer.report),
so the figures are computed the same way, and events are reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from observer import render
from observer.client import DaemonClient, DaemonStarting, DaemonUnavailable, add_daemon_argument, client_from

FAILURES_SHOWN = 5
RING_LIMIT = 10000  # the API's per-request maximum


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "One screen: probe mode and probes, per hstate and NUMA node the pool, optimized pages, freeable "
        "vmemmap pages per huge page, expected vs. kernel savings, drift, recent failures and lost events. "
        "Asks the running daemon; with none, computes the same from the kernel's counters (events are "
        "then unavailable).")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_daemon_argument(parser)


# --- where the figures come from ----------------------------------------------------------------
def local_status(settle_seconds: float = 1.0) -> dict[str, Any]:
    """The daemon's status document, computed here from one kernel snapshot with the same model."""
    from observer import __version__
    from observer.kernel.facts import gather
    from observer.model import Model, Runtime
    from observer.report import view_to_json
    from observer.snapshot import SnapshotReader

    facts = gather()
    model = Model.for_facts(facts, settle_seconds)
    model.set_runtime(Runtime(__version__, facts.release, "", "no daemon: no probes attached"))
    reader = SnapshotReader(facts.root, facts.page_size, facts.struct_page_size or 64)
    model.take_baseline(reader.read(), provisional=False)
    return view_to_json(model.view())


def recent_failures(client: DaemonClient, limit: int = FAILURES_SHOWN) -> list[dict[str, Any]]:
    """The newest failed events still in the daemon's ring (oldest first)."""
    failed: list[dict[str, Any]] = []
    since = 0
    while True:
        batch = client.get("/events", {"since": since, "limit": RING_LIMIT})
        failed.extend(e for e in batch.get("events", []) if e.get("result") == "error")
        failed = failed[-limit:]
        nxt = int(batch.get("next", since))
        if nxt <= since or not batch.get("events"):
            return failed
        since = nxt


def gather_status(args: argparse.Namespace) -> dict[str, Any]:
    """The status document plus where it came from: ``source`` is "daemon" or "kernel"."""
    client = client_from(args)
    try:
        doc = client.status()
        doc["recent_failures"] = recent_failures(client)
        doc.update(source="daemon", daemon=str(client.addr), daemon_error=None, events_available=True)
    except (DaemonUnavailable, DaemonStarting) as e:
        doc = local_status()
        doc.update(source="kernel", daemon=str(client.addr), daemon_error=str(e), events_available=False,
                   recent_failures=None)
    return doc


# --- rendering ----------------------------------------------------------------------------------
def _pages_and_mib(pages: int | None, page_size: int) -> str:
    if pages is None:
        return "unknown"
    return f"{render.mib(pages * page_size)} MiB ({pages} pages)"


def _hvo_line(doc: dict[str, Any]) -> str:
    on = doc.get("hvo_enabled")
    if on is None:
        return "HVO        no vm.hugetlb_optimize_vmemmap sysctl (boot setting applies)"
    return ("HVO        on: pages allocated now are optimized (vm.hugetlb_optimize_vmemmap = 1)" if on else
            "HVO        OFF: pages allocated now are not optimized (vm.hugetlb_optimize_vmemmap = 0)")


def _probe_lines(doc: dict[str, Any]) -> list[str]:
    if doc["source"] != "daemon":
        return [f"daemon     none: {doc['daemon_error']}",
                "           figures below come from the kernel's counters; events are unavailable"]
    probes = doc.get("probes", [])
    attached = sum(1 for p in probes if p["attached"])
    up = render.ago(doc.get("uptime_seconds")).removesuffix(" ago")
    lines = [f"daemon     {doc['daemon']}, hvo-observer {doc.get('version', '?')}, up {up}"
             + ("" if doc.get("ready", True) else " (starting)"),
             f"mode       {doc.get('mode') or '?'}{' (DEGRADED)' if doc.get('degraded') else ''}, "
             f"{attached}/{len(probes)} probes attached"]
    lines.extend(f"           not attached: {p['probe']} ({p['event']}): {p['reason']}"
                 for p in probes if not p["attached"])
    return lines


def _pool_lines(doc: dict[str, Any]) -> list[str]:
    ps = doc["page_size"]
    lines = [f"{'hstate':<11}{'node':>5}{'pages':>8}{'free':>7}{'surplus':>8}{'optimized':>10}"
             f"{'freeable/page':>14}  expected saved"]
    for h in doc["hstates"]:
        per = h["freeable_vmemmap_pages"]
        rows = h["nodes"] if len(h["nodes"]) > 1 else []
        node = "all" if rows else (str(h["nodes"][0]["node"]) if h["nodes"] else "-")
        lines.append(f"{h['name']:<11}{node:>5}{h['pages']:>8}{h['free']:>7}{h['surplus']:>8}"
                     f"{h['optimized']:>10}{per:>14}  {_pages_and_mib(h['optimized'] * per, ps)}")
        for n in rows:
            if n["optimized"] is None:  # the split by node is unknown (events carry no node)
                opt, saved = "?", "unknown (events carry no node)"
            else:
                opt, saved = str(n["optimized"]), _pages_and_mib(n["optimized"] * per, ps)
            lines.append(f"{'':<11}{n['node']:>5}{n['pages']:>8}{n['free']:>7}{n['surplus']:>8}"
                         f"{opt:>10}{'':>14}  {saved}")
    return lines


def _savings_lines(doc: dict[str, Any]) -> list[str]:
    ps = doc["page_size"]
    saved = doc["saved_bytes"]
    rec = doc["reconcile"]
    kernel = saved["kernel"]
    lines = [f"savings    expected {_pages_and_mib(saved['expected'] // ps, ps)}, kernel "
             + (_pages_and_mib(kernel // ps, ps) if kernel is not None else
                "unknown (no nr_memmap counters before 6.11: only page counts are checked)")]
    drift, pending = rec["drift_bytes"], rec["pending_drift_bytes"]
    if drift is None:
        lines.append("drift      unknown (no byte truth on this kernel)")
    elif doc["source"] != "daemon":
        lines.append(f"drift      {render.signed_mib(drift)} MiB ({drift // ps:+d} pages) (counters only: "
                     "non-zero means they fit no split of the pools; events are needed for more)")
    else:
        state = ("settled" if rec["settled"] else
                 f"not settled: {rec['quiet_seconds']:.1f} s quiet of {rec['settle_seconds']:g} s needed")
        line = (f"drift      {render.signed_mib(drift)} MiB ({drift // ps:+d} pages) at the last quiet "
                f"moment ({state})")
        if pending is not None and pending != drift:
            line += f"; now {render.signed_mib(pending)} MiB ({pending // ps:+d} pages) in flight"
        lines.append(line)
    if rec.get("inconsistent"):
        lines.append(f"           INCONSISTENT: {rec['inconsistent']}")
    base = rec.get("baseline")
    if base:
        lines.append(f"baseline   {'exact' if base['exact'] else 'NOT exact'}: {base['note']}")
    return lines


def _event_lines(doc: dict[str, Any]) -> list[str]:
    rec = doc["reconcile"]
    if not doc["events_available"]:
        return ["events     unavailable (no daemon): start 'hvo-observer run', or watch live with "
                "'hvo-observer events'"]
    resync = rec.get("last_resync")
    lines = [f"events     {rec['events_seen']} seen, {rec['events_lost']} lost, {rec['resyncs']} resyncs"]
    if resync:
        lines[0] += f" (last: {resync['reason']}, {render.ago(time.time() - resync['unix_time'])})"
    counts = {}
    for e in doc.get("events", []):
        counts.setdefault((e["event"], e["hstate"]), {})[e["result"]] = e["count"]
    if counts:
        lines.append("           " + "; ".join(
            f"{ev} {hs} " + " ".join(f"{r} {n}" for r, n in sorted(by.items()))
            for (ev, hs), by in sorted(counts.items())))
    errors = [e for e in doc.get("events", []) if e["result"] == "error"]
    if not errors:
        lines.append("failures   none")
        return lines
    lines.append("failures   " + "; ".join(f"{e['event']} {e['hstate']}: {e['count']}" for e in errors))
    lines.extend(f"           {render.event_line(f)}" for f in doc.get("recent_failures") or [])
    return lines


def human(doc: dict[str, Any]) -> str:
    lines = [f"kernel     {doc.get('kernel') or '?'}, page size {doc['page_size']}"]
    lines += _probe_lines(doc)
    lines.append(_hvo_line(doc))
    lines.append("")
    lines += _pool_lines(doc)
    lines.append("")
    lines += _savings_lines(doc)
    lines += _event_lines(doc)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    doc = gather_status(args)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(human(doc))
    return 0
