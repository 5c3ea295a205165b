"""``hvo-observer explain``: why the vmemmap savings differ from what the geometry promises.

The geometry promises ``pages x freeable vmemmap pages`` for every pooled huge page. Each finding
names one reason the kernel saves less (or differs from what the events say), with the numbers that
show it and what to do. Figures come from the daemon's model (or, with no daemon, the same model fed
with one kernel snapshot); kernel facts (sysctl, boot parameters, sizeof(struct page),
memmap_on_memory) are read on this host.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from observer import render
from observer.client import add_daemon_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Why savings differ from what the geometry promises, with the evidence: HVO off (sysctl or boot "
        "parameter) while pages were allocated, sizeof(struct page) not a power of two, memmap on "
        "hotplugged memory, restore failures, operations pending, lost events, drift; and what to do "
        "about each. Uses the daemon's model when it runs, else the kernel's counters; kernel facts are "
        "read on this host.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_daemon_argument(parser)


@dataclass(frozen=True)
class Finding:
    id: str
    title: str
    evidence: str
    action: str
    severity: str = "warning"  # "info" | "warning" | "error"


def _pages_mib(pages: int, page_size: int) -> str:
    return f"{pages} pages, {render.mib(pages * page_size)} MiB"


def _event_count(doc: dict[str, Any], event: str, result: str, hstate: str | None = None) -> int:
    return sum(e["count"] for e in doc.get("events", [])
               if e["event"] == event and e["result"] == result and (hstate is None or e["hstate"] == hstate))


class Explainer:
    def __init__(self, doc: dict[str, Any], facts: Any) -> None:
        from observer.geometry import hvo_support

        self.doc = doc
        self.facts = facts
        self.ps = doc["page_size"]
        self.support = hvo_support(facts)
        self.findings: list[Finding] = []

    def add(self, *args: str, **kw: str) -> None:
        self.findings.append(Finding(*args, **kw))

    # --- why pages are not optimized ---------------------------------------------------------
    def hvo_off(self) -> None:
        doc, facts = self.doc, self.facts
        unopt = [(h, h["pages"] - h["optimized"]) for h in doc["hstates"]
                 if h["freeable_vmemmap_pages"] > 0 and h["pages"] > h["optimized"]]
        if not unopt:
            return
        lost = sum(n * h["freeable_vmemmap_pages"] for h, n in unopt)
        per = "; ".join(
            f"{h['name']}: {n} of {h['pages']} pages not optimized ({n} x {h['freeable_vmemmap_pages']} = "
            f"{_pages_mib(n * h['freeable_vmemmap_pages'], self.ps)} not freed)" for h, n in unopt)
        skipped = {h["name"]: _event_count(doc, "optimize", "skipped", h["name"]) for h, _ in unopt}
        seen = "; ".join(f"optimize skipped {n} time(s) for {name}" for name, n in skipped.items() if n)
        sysctl = facts.hvo_sysctl()
        boot = facts.boot_params
        setting = (f"vm.hugetlb_optimize_vmemmap = {int(sysctl)} now" if sysctl is not None else
                   f"hugetlb_free_vmemmap={boot.hugetlb_free_vmemmap or '(not set: kernel default)'} on the "
                   "kernel command line")
        boot_pages = (f"; boot allocates {', '.join(str(c) for _, c in boot.hugepages)} page(s) "
                      "(hugepages= on the command line)" if boot.hugepages else "")
        evidence = f"{per}; {setting}{boot_pages}" + (f"; events: {seen}" if seen else "")
        reallocate = ("pages already in the pool keep their state: free and re-allocate them (shrink "
                      "nr_hugepages to what is in use, then grow it back) once HVO is on")
        if self.support.built is False:
            self.add("hvo-unavailable", "HVO is not available on this kernel",
                     f"{per}; {self.support.reason}",
                     "use a kernel built with CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP on an architecture that "
                     "supports it (see 'hvo-observer doctor')", severity="error")
        elif not self.support.enabled or seen:
            steps = []
            if sysctl is False:
                steps.append("turn HVO on: echo 1 > /proc/sys/vm/hugetlb_optimize_vmemmap (persist it in "
                             "/etc/sysctl.d)")
            elif sysctl:
                steps.append("HVO is on now, so pages allocated from here on are optimized")
            if sysctl is None or (boot.hugepages and boot.hugetlb_free_vmemmap not in ("on", "1", "y")):
                steps.append("add hugetlb_free_vmemmap=on to the kernel command line"
                             + (" so boot-time pages are optimized" if sysctl is not None else ""))
            self.add("hvo-off-at-allocation",
                     f"HVO was off while pages were allocated ({lost} vmemmap pages, "
                     f"{render.mib(lost * self.ps)} MiB not freed)", evidence,
                     "; ".join([*steps, reallocate]))
        else:
            self.add("unoptimized-pages",
                     f"{sum(n for _, n in unopt)} pooled page(s) are not optimized although HVO is on now",
                     evidence + "; they were allocated while HVO was off (before the daemon watched, e.g. "
                     "at boot or before the sysctl was set), or the kernel left them unoptimized (out of "
                     "memory splitting the vmemmap, memmap_on_memory)",
                     f"{reallocate}; if new pages stay unoptimized, check memory pressure and "
                     "'hvo-observer events --event optimize'")

    def struct_page(self) -> None:
        size = self.facts.struct_page_size
        if size is None:
            self.add("struct-page-unknown", "sizeof(struct page) is unknown (no BTF): 64 bytes assumed",
                     "no /sys/kernel/btf/vmlinux", "figures assume 64-byte struct pages; use a kernel with "
                     "CONFIG_DEBUG_INFO_BTF to check", severity="info")
        elif size & (size - 1):
            pages = sum(h["pages"] for h in self.doc["hstates"])
            self.add("struct-page-size",
                     f"sizeof(struct page) is {size}, not a power of two: HVO frees nothing",
                     f"sizeof(struct page) = {size} bytes (BTF); struct pages straddle page boundaries, so "
                     f"tails cannot share one vmemmap page; {pages} pooled huge page(s) save 0 pages",
                     "use a kernel configuration whose struct page is 64 bytes (debug options such as "
                     "page owner/KMSAN-style instrumentation grow it)", severity="error")

    def memmap_on_memory(self) -> None:
        if not self.facts.memmap_on_memory:
            return
        try:
            layout = self.facts.memory_layout()
            blocks = f"{sum(b.online for b in layout.blocks)} memory blocks online"
        except Exception as e:  # evidence only: do not fail the report over it
            blocks = f"memory blocks unreadable ({e})"
        boot = self.facts.boot_params.memmap_on_memory
        self.add("memmap-on-memory",
                 "memmap_on_memory is on: huge pages on hotplugged memory keep their vmemmap",
                 f"memory_hotplug.memmap_on_memory = on (command line: {boot or 'not set'}); {blocks}; "
                 "huge pages whose vmemmap lives on the hotplugged block itself are skipped by HVO "
                 "(refused with HVO altogether before 5.19)",
                 "boot without memory_hotplug.memmap_on_memory, or allocate huge pages from boot memory "
                 "(e.g. per node via /sys/devices/system/node/nodeN/hugepages)")

    # --- what the events say -----------------------------------------------------------------
    def restore_failures(self) -> None:
        for op in ("restore", "optimize"):
            failed = [e for e in self.doc.get("events", []) if e["event"] == op and e["result"] == "error"]
            if not failed:
                continue
            counts = ", ".join(f"{e['hstate']}: {e['count']}" for e in failed)
            surplus = ", ".join(f"{h['name']}: {h['surplus']}" for h in self.doc["hstates"] if h["surplus"])
            if op == "restore":
                self.add("restore-failures", f"{sum(e['count'] for e in failed)} vmemmap restore(s) failed",
                         f"restore errors (ENOMEM) {counts}; surplus pages now: {surplus or 'none'}; a page "
                         "whose vmemmap cannot be restored stays in the pool (as a surplus page, still "
                         "optimized)",
                         "free memory (the restore needs the vmemmap pages back), then shrink the pool "
                         "again; 'hvo-observer events --result error' shows when and where", severity="error")
            else:
                self.add("optimize-failures", f"{sum(e['count'] for e in failed)} optimization(s) failed",
                         f"optimize errors {counts}; those pages keep their full vmemmap",
                         "usually memory pressure while splitting the vmemmap mapping: re-allocate the "
                         "pages when memory is available")

    def pending(self) -> None:
        rec = self.doc["reconcile"]
        if self.doc["source"] != "daemon" or rec["settled"]:
            return
        pending = rec["pending_drift_bytes"]
        self.add("pending", "operations in flight: the figures are not final",
                 f"quiet for {rec['quiet_seconds']:.1f} s of the {rec['settle_seconds']:g} s settle window"
                 + (f"; expected minus kernel right now: {render.signed_mib(pending)} MiB "
                    f"({pending // self.ps:+d} pages)" if pending is not None else ""),
                 f"wait {rec['settle_seconds']:g} s after the pool stops changing and run explain again",
                 severity="info")

    def lost_events(self) -> None:
        rec = self.doc["reconcile"]
        if self.doc["source"] != "daemon":
            self.add("no-daemon", "no daemon: events (failures, lost events) are unknown",
                     self.doc.get("daemon_error") or "no daemon",
                     "start 'hvo-observer run' (systemctl start hvo-observer) to watch HVO events",
                     severity="info")
            return
        if not rec["events_lost"]:
            return
        last = rec.get("last_resync")
        self.add("lost-events", f"{rec['events_lost']} event record(s) were lost",
                 f"{rec['events_lost']} lost of {rec['events_seen']} seen; {rec['resyncs']} resync(s) from "
                 "the kernel's counters" + (f" (last: {last['reason']})" if last else ""),
                 "raise ring_buffer_bytes in the daemon's configuration (a power-of-two number of pages) "
                 "and reload it (SIGHUP); counts are exact again after each resync")

    def degraded(self) -> None:
        if self.doc["source"] != "daemon":
            return
        missing = [p for p in self.doc.get("probes", []) if not p["attached"]]
        limits = self.doc.get("degraded_reasons") or []
        if self.doc.get("degraded") or missing or limits:
            self.add("degraded", f"probes degraded (mode {self.doc.get('mode')})",
                     "; ".join([*limits, *(f"{p['probe']} ({p['event']}) not attached: {p['reason']}"
                                           for p in missing)])
                     or self.doc.get("mode_reason", ""),
                     "run 'hvo-observer doctor' to see which mode this kernel allows and what it cannot see",
                     severity="warning")

    def drift(self) -> None:
        rec = self.doc["reconcile"]
        drift = rec["drift_bytes"]
        if rec.get("inconsistent"):
            self.add("inconsistent", "the event-derived counts are impossible", rec["inconsistent"],
                     "the daemon resyncs from the counters when it can; if this persists, report it with "
                     "'hvo-observer status --json'", severity="error")
        if drift is None:
            self.add("no-byte-truth", "savings cannot be checked in bytes on this kernel",
                     f"kernel {self.doc.get('kernel') or self.facts.release} has no nr_memmap_pages / "
                     "nr_memmap_boot_pages in /proc/vmstat (6.11+): only page counts are reconciled",
                     "nothing to do; a 6.11+ kernel gives exact byte savings", severity="info")
            return
        if not drift or (self.doc["source"] == "daemon" and not rec["settled"] and
                         drift == rec["pending_drift_bytes"]):
            return
        pages = drift // self.ps
        hints = [f"{abs(pages) // f} {h['name']} page(s)" for h in self.doc["hstates"]
                 if (f := h["freeable_vmemmap_pages"]) and abs(pages) % f == 0 and abs(pages) >= f]
        direction = ("the kernel frees less than the events say (pages left unoptimized, missed restores)"
                     if drift > 0 else
                     "the kernel frees more than the events say (optimizations not seen, e.g. before the "
                     "daemon started or by a path no probe covers)")
        self.add("drift",
                 f"expected and kernel savings differ by {render.signed_mib(drift)} MiB at a quiet moment",
                 f"expected minus kernel = {pages:+d} vmemmap pages"
                 + (f" (= the freeable vmemmap of {' or '.join(hints)})" if hints else "") + f"; {direction}",
                 "check 'hvo-observer doctor' (are all probes of the mode attached?) and "
                 "'hvo-observer events' around the change; the daemon resyncs on lost events and impossible "
                 "counts; report a persistent drift with 'hvo-observer status --json'", severity="error")

    def baseline(self) -> None:
        base = self.doc["reconcile"].get("baseline")
        if base and not base["exact"]:
            self.add("baseline-not-exact", "which pages are optimized was inferred by a rule",
                     base["note"], "nothing to do unless the per-hstate split matters: cycling the pools "
                     "with the daemon running makes it exact", severity="info")

    # --- the whole report --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        for step in (self.hvo_off, self.struct_page, self.memmap_on_memory, self.restore_failures,
                     self.pending, self.lost_events, self.degraded, self.drift, self.baseline):
            step()
        doc, ps = self.doc, self.ps
        promised = sum(h["pages"] * h["freeable_vmemmap_pages"] for h in doc["hstates"])
        expected = doc["saved_bytes"]["expected"] // ps
        kernel_bytes = doc["saved_bytes"]["kernel"]
        kernel = kernel_bytes // ps if kernel_bytes is not None else None
        actual = kernel if kernel is not None else expected
        if not any(f.severity != "info" for f in self.findings) and promised == actual:
            pooled = sum(h["pages"] for h in doc["hstates"])
            self.findings.insert(0, Finding(
                "ok", "savings match the geometry",
                (f"{pooled} pooled page(s), all optimized: {_pages_mib(promised, ps)} freed"
                 + ("" if kernel is None else ", as the kernel counts")) if pooled else
                "no huge pages in the pools: nothing to save", "nothing to do", severity="info"))
        return {
            "source": doc["source"],
            "daemon": doc.get("daemon"),
            "promised_saved_bytes": promised * ps,
            "expected_saved_bytes": expected * ps,
            "kernel_saved_bytes": kernel_bytes,
            "difference_bytes": (promised - actual) * ps,
            "hstates": [{"name": h["name"], "pages": h["pages"], "optimized": h["optimized"],
                         "freeable_vmemmap_pages": h["freeable_vmemmap_pages"],
                         "promised_saved_bytes": h["pages"] * h["freeable_vmemmap_pages"] * ps,
                         "expected_saved_bytes": h["expected_saved_bytes"]} for h in doc["hstates"]],
            "findings": [asdict(f) for f in self.findings],
        }


def human(r: dict[str, Any]) -> str:
    kernel = r["kernel_saved_bytes"]
    lines = [f"geometry promises {render.mib(r['promised_saved_bytes'])} MiB for the pooled pages; "
             f"events say {render.mib(r['expected_saved_bytes'])} MiB; the kernel saves "
             + (f"{render.mib(kernel)} MiB" if kernel is not None else "an unknown amount (kernel < 6.11)")
             + f" (difference {render.mib(r['difference_bytes'])} MiB)"]
    for h in r["hstates"]:
        lines.append(f"  {h['name']:<10} {h['optimized']}/{h['pages']} pages optimized x "
                     f"{h['freeable_vmemmap_pages']} freeable: promised "
                     f"{render.mib(h['promised_saved_bytes'])} MiB, expected "
                     f"{render.mib(h['expected_saved_bytes'])} MiB")
    if r["source"] != "daemon":
        lines.append("  (no daemon: figures from the kernel's counters only)")
    for i, f in enumerate(r["findings"], 1):
        lines += ["", f"{i}. [{f['severity']}] {f['title']}", f"   evidence: {f['evidence']}",
                  f"   do:       {f['action']}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from observer.commands.status import gather_status
    from observer.kernel.facts import gather

    r = Explainer(gather_status(args), gather()).report()
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        print(human(r))
    return 0
