"""Run in a matrix guest (as root): ``hvo-observer run`` in one function mode while the pools change,
recording the kernel's and the daemon's figures at a quiet moment after every step, as JSON for
tests/test_vm_matrix.py to judge.

    python tests/vm_guest_scripts/matrix_daemon.py MODE OUT.json [--pages N] [--final]

The guest is booted with HVO on and 2 MiB and 1 GiB pages reserved on the command line
(tests/test_vm_matrix.py's BOOT_CMDLINE): the first daemon of the boot starts on pools optimized
before it existed. Steps, sysctl on, adapting to the pools found (the next mode starts where this
one ended):
  at_once         the first scrape after READY (the baseline, no settling)
  start           the first quiet moment
  with boot-time 1 GiB pages: demote (one page into 512 pages of 2 MiB), shrink_1g (the rest:
                  restore), grow_1g_again (a runtime page, retried after compaction; "impossible"
                  is recorded), shrink_1g_again
  without:        grow_1g (runtime), shrink_1g, grow_1g_again, demote
  grow_2m         2 MiB pool + N;  shrink_2m: back
  shrink_demoted  the 2 MiB pool back to its size before the demote (see drive() for kernels whose
                  demote leaves pieces unoptimized)
The daemon's log and its recent events are written next to OUT (the host shows the log on failure).
The guest is disposable: pools are not put back.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, tracefs
from tests import daemon_proc
from tests.daemon_proc import FREE as FREEABLE
from tests.daemon_proc import H1G, H2M, daemon
from tests.vm_guest_scripts import matrix_privileges
from tests.vm_guest_scripts.gigantic import grow_1g
from tests.vm_guest_scripts.matrix_common import (
    Run,
    bring_up_loopback,
    dump_events,
    first_scrape,
    kernel_errors_since,
    mark,
    recorded,
    settle,
    write_json,
)

READY_S = 900.0  # bcc compiles for 15-50 s under TCG, much longer on a busy host
DEMOTE = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/demote")


def nr(name: str) -> int:
    return hugepages.by_name(hugepages.read_hstates(), name).nr_hugepages


def impossible(rec: dict[str, Any]) -> bool:
    return bool(rec["detail"].get("impossible"))


def stale_pieces(rec: dict[str, Any]) -> int:
    """2 MiB pieces of a demote that the kernel left unoptimized although HVO is on (Debian 6.12 and
    sid: they inherit a stale HPG_vmemmap_optimized flag, so optimize returns early): counted from
    the vmemmap counters, 0 where there are none (6.1, which has no such bug)."""
    k, before = rec["kernel"], rec["before"]
    if k["saved_pages"] is None:
        return 0
    gained = (k["saved_pages"] - before["saved_pages"] + FREEABLE[H1G]) // FREEABLE[H2M]
    return k["pools"][H2M]["nr"] - before["pools"][H2M]["nr"] - gained


def drive(run: Run, pages: int, final: bool) -> None:
    """1 GiB steps first: on Debian 6.12 every first shrink of optimized 2 MiB pages leaks them as
    bad pages all over memory (a kernel bug), after which an aligned free GiB gets rare. A runtime
    1 GiB page is grown where one was just freed (the best chance of a free aligned GiB)."""
    demoted_from = None

    def demote() -> None:
        nonlocal demoted_from
        if not DEMOTE.exists():
            run.result["demote_skipped"] = f"no {DEMOTE}"
            return
        demoted_from = nr(H2M)
        run.step("demote", "demote", H1G, lambda: DEMOTE.write_text("1\n"))

    def shrink_1g(name: str) -> None:
        run.step(name, "shrink", H1G, lambda: hugepages.set_nr_hugepages(H1G, 0))

    if nr(H1G) > 0:  # boot-time pages: demote one, restore the rest, then one at runtime
        demote()
        if nr(H1G) > 0:
            shrink_1g("shrink_1g")
        if not impossible(run.step("grow_1g_again", "grow", H1G, lambda: grow_1g(1))):
            shrink_1g("shrink_1g_again")
    elif not impossible(run.step("grow_1g", "grow", H1G, lambda: grow_1g(1))):
        shrink_1g("shrink_1g")
        if not impossible(run.step("grow_1g_again", "grow", H1G, lambda: grow_1g(1))):
            demote()
    base = nr(H2M)
    run.step("grow_2m", "grow", H2M, lambda: hugepages.set_nr_hugepages(H2M, base + pages))
    run.step("shrink_2m", "shrink", H2M, lambda: hugepages.set_nr_hugepages(H2M, base))
    if demoted_from is None:
        return
    stale = stale_pieces(next(s for s in run.steps if s["name"] == "demote"))
    if stale and not final:
        # Freeing those pieces makes the kernel "restore" vmemmap that was never optimized: it maps
        # 7 new pages per piece and leaks the old ones, so the vmemmap counters stay wrong for the
        # rest of the boot. Only the last daemon of the boot (--final) goes there.
        run.result["shrink_demoted_skipped"] = f"{stale} demoted pieces left unoptimized by the kernel"
        return
    run.step("shrink_demoted", "shrink", H2M, lambda: hugepages.set_nr_hugepages(H2M, demoted_from))


def choose_privileges(mode: str) -> dict[str, object]:
    """The daemon runs with the systemd unit's privileges (tests/daemon_proc.py), except in kprobe
    mode when those cannot open a kprobe perf event on this kernel (Debian's perf_event_paranoid=3
    asks for CAP_SYS_ADMIN): then as full root, so that the counting is still tested; the refusal
    itself is judged by its own test."""
    perf = matrix_privileges.check()
    unit_ok = mode != "kprobe" or perf["unit"].get("kprobe") == ""  # type: ignore[union-attr]
    if not unit_ok:
        daemon_proc.UNIT_PRIVILEGES = ()
    return {"daemon": "unit" if unit_ok else "root", "perf_events": perf}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fentry", "kprobe"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pages", type=int, default=16, help="2 MiB pages to grow and shrink by")
    ap.add_argument("--final", action="store_true", help="the last daemon of this boot")
    args = ap.parse_args()
    bring_up_loopback()
    tracefs.ensure_tracefs()
    sysctl.write_hvo_sysctl(True)
    result: dict[str, Any] = {"mode": args.mode,
                              "release": Path("/proc/sys/kernel/osrelease").read_text().strip(),
                              "cmdline": Path("/proc/cmdline").read_text().strip()}
    result["privileges"] = choose_privileges(args.mode)
    logdir = args.out.parent if args.out.parent.is_dir() else Path(tempfile.mkdtemp())
    with recorded(args.out, result) as t0:
        marker = mark(f"{args.mode} daemon starts")
        with daemon(logdir, mode=args.mode, ready_timeout=READY_S) as d:
            result["daemon_log"] = str(d.log_path)
            result["ready_s"] = round(time.monotonic() - t0, 1)
            k, v, status = first_scrape(d)
            result["at_once"] = {"kernel": k, "daemon": v, "status": status,
                                 "kernel_errors": kernel_errors_since(marker)}
            k, v = settle(d)
            result["start"] = {"kernel": k, "daemon": v}
            write_json(args.out, result)
            try:
                drive(Run(d, args.out, result), args.pages, args.final)
            finally:  # the recent events, for reading a discrepancy (not judged)
                dump_events(d, args.out.with_name(f"events-{args.mode}.json"))
            result["stop_code"] = d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
