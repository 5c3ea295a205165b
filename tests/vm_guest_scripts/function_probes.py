"""Run in a test guest (as root): load the function probes once in one mode and drive HVO through
its scenarios, writing what was seen as JSON for tests/test_vm_probes.py to judge.

    python tests/vm_guest_scripts/function_probes.py MODE OUT.json [--pages N] [--surplus N]

Before loading anything, HVO is exercised once (sysctl on, N 2 MiB pages in and out): Debian
6.12.117 logs "BUG: Bad page state" (vmemmap pages freed with stale flags) the first time the
vmemmap of freshly optimized pages is restored, with no probe loaded at all; later rounds on the
same pages are clean, so the warm-up keeps that out of the scenarios where it can.
Scenarios, all in this one probe session (a bcc compile takes ~40 s under TCG):
  on       vm.hugetlb_optimize_vmemmap=1, grow the 2 MiB pool by N, shrink it back
  off      the same with the sysctl off
  surplus  sysctl on, fault in N surplus pages of a MAP_HUGETLB mapping, unmap them
  demote   sysctl on, allocate a 1 GiB page, demote it, then shrink the 2 MiB pool back
The pools, the overcommit limit and the sysctl are restored at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import json
import mmap
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl
from observer.kernel.facts import gather
from observer.probes.events import Event
from observer.probes.session import ProbeSession
from tests.vm.guest import KERNEL_ERROR
from tests.vm_guest_scripts.gigantic import grow_1g

H2M, H1G = "2048kB", "1048576kB"
DEMOTE = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/demote")
H2M_DIR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
ROOT = Path("/")


def alloc_1g(count: int) -> None:
    got = grow_1g(count, ROOT)
    if got.get("impossible"):
        raise RuntimeError(f"the kernel gave {got['got']} of {count} 1 GiB pages in {got['attempts']} "
                           "attempts with compaction and dropped caches (memory too fragmented?)")


def warm_up(pages: int) -> list[str]:
    """HVO once through with as many pages as the scenarios use, before the probes (the buddy
    allocator hands the same pages out again): returns the kernel errors it caused (see above)."""
    marker = f"hvo-test: warm-up begins ({time.monotonic_ns()})"
    Path("/dev/kmsg").write_text(marker + "\n")
    was = nr(H2M)
    sysctl.write_hvo_sysctl(True, ROOT)
    hugepages.set_nr_hugepages(H2M, was + pages, ROOT)
    hugepages.set_nr_hugepages(H2M, was, ROOT)
    return kernel_errors_since(marker)


def nr(name: str) -> int:
    for h in hugepages.read_hstates(ROOT):
        if h.name == name:
            return h.nr_hugepages
    return 0


class Surplus:
    """Surplus huge pages: allowed by nr_overcommit_hugepages, taken by touching a MAP_HUGETLB
    mapping (the kernel allocates them on the fault path, alloc_surplus_hugetlb_folio) and given
    back to the buddy allocator on unmap (from a workqueue when the page is optimized)."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.map: mmap.mmap | None = None

    def take(self) -> None:
        (H2M_DIR / "nr_overcommit_hugepages").write_text(f"{self.pages}\n")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB
        self.map = mmap.mmap(-1, self.pages << 21, flags=flags)
        for i in range(self.pages):
            self.map[i << 21] = 1

    def give_back(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        deadline = time.monotonic() + 30
        while int((H2M_DIR / "surplus_hugepages").read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        (H2M_DIR / "nr_overcommit_hugepages").write_text("0\n")


def settle(rec: Recorder, since: int, kinds: tuple[str, ...], count: int, timeout: float = 30) -> None:
    """Poll until ``count`` events of each kind arrived: frees of optimized surplus pages are
    deferred to a workqueue (an RCU grace period first), which TCG can delay past a quiet drain."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = collections.Counter(e.event.label for e in rec.events[since:])
        if all(seen[k] >= count for k in kinds):
            return
        rec.session.poll(200)


def kernel_errors_since(marker: str) -> list[str]:
    """Kernel error lines logged after ``marker`` (written to /dev/kmsg when the scenario began)."""
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()
    begin = max((i for i, ln in enumerate(lines) if marker in ln), default=-1)
    return [ln for ln in lines[begin + 1:] if KERNEL_ERROR.search(ln)]


class Recorder:
    def __init__(self, session: ProbeSession) -> None:
        self.session = session
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    def drain(self) -> None:
        """Poll until the buffer stays empty for a while (events are emitted synchronously with the
        write that caused them; this only empties the ring buffer)."""
        quiet = 0
        while quiet < 3:
            before = len(self.events)
            self.session.poll(200)
            quiet = quiet + 1 if len(self.events) == before else 0

    def scenario(self, name: str, steps: list[tuple[str, Any]]) -> dict[str, Any]:
        self.drain()
        start = len(self.events)
        marker = f"hvo-test: scenario {name} begins ({time.monotonic_ns()})"
        Path("/dev/kmsg").write_text(marker + "\n")
        t0 = time.monotonic()
        for what, action in steps:
            action()
            self.drain()
            print(f"{name}: {what}: {len(self.events) - start} events so far", flush=True)
        return {
            "name": name,
            "seconds": round(time.monotonic() - t0, 3),
            "steps": [what for what, _ in steps],
            "events": [e.to_json() for e in self.events[start:]],
            # kernel errors while the scenario ran (the kernel's own bugs show up here too)
            "kernel_errors": kernel_errors_since(marker),
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fentry", "kprobe"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pages", type=int, default=16)
    ap.add_argument("--surplus", type=int, default=4, help="surplus pages to fault in")
    args = ap.parse_args()

    facts = gather()
    sysctl_was = sysctl.read_hvo_sysctl(ROOT)
    n2m, n1g = nr(H2M), nr(H1G)
    result: dict[str, Any] = {
        "release": facts.release, "mode": args.mode, "pages": args.pages, "surplus": args.surplus,
        "pages_1g_at_start": n1g,
    }  # fmt: skip
    result["warm_up_kernel_errors"] = warm_up(args.pages + args.surplus)[:5]
    t0 = time.monotonic()
    session = ProbeSession(args.mode, facts)
    rec = Recorder(session)
    session.on_event = rec
    try:
        session.start()
        result["startup_s"] = round(time.monotonic() - t0, 2)
        result["attachments"] = [
            {"event": a.event.label, "target": a.target, "ok": a.ok, "reason": a.reason}
            for a in session.attachments
        ]
        result["probe_sets"] = [ps.name for ps in session.probe_sets]
        result["resolutions"] = [
            {"event": r.spec.event.label, "handler": r.spec.handler, "target": r.target, "ok": r.ok,
             "reason": r.reason}
            for ps in session.probe_sets
            for r in ps.resolve(facts)
        ]  # fmt: skip

        def pool(count: int) -> Any:
            return lambda: hugepages.set_nr_hugepages(H2M, count, ROOT)

        def hvo(on: bool) -> Any:
            return lambda: sysctl.write_hvo_sysctl(on, ROOT)

        grow, shrink = ("grow", pool(n2m + args.pages)), ("shrink", pool(n2m))
        scenarios = [
            rec.scenario("on", [("sysctl on", hvo(True)), grow, shrink]),
            rec.scenario("off", [("sysctl off", hvo(False)), grow, shrink]),
        ]
        surplus = Surplus(args.surplus)
        try:
            since = len(rec.events)
            steps = [
                ("sysctl on", hvo(True)), ("take", surplus.take), ("give back", surplus.give_back),
                ("settle", lambda: settle(rec, since, ("restore", "pool_free"), args.surplus)),
            ]  # fmt: skip
            scenarios.append(rec.scenario("surplus", steps))
        finally:
            surplus.give_back()
        if DEMOTE.exists():
            steps = [("sysctl on", hvo(True)), ("alloc 1 GiB", lambda: alloc_1g(n1g + 1)),
                     ("demote", lambda: DEMOTE.write_text("1")), shrink]  # fmt: skip
            scenarios.append(rec.scenario("demote", steps))
        else:
            result["demote_skipped"] = f"no {DEMOTE} (kernel older than 5.16?)"
        result["scenarios"] = scenarios
        agg = session.aggregates()
        result["aggregates"] = {
            "counts": [[k[0].label, k[1], k[2].label, v] for k, v in sorted(agg.counts.items())],
            "lost": agg.lost,
        }
    finally:
        session.close()
        hugepages.set_nr_hugepages(H2M, n2m, ROOT)
        hugepages.set_nr_hugepages(H1G, n1g, ROOT)
        if sysctl_was is not None:
            sysctl.write_hvo_sysctl(sysctl_was, ROOT)
        result["total_s"] = round(time.monotonic() - t0, 2)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
