"""Run in a test guest (as root): SIGKILL ``hvo-observer run`` in a function mode while it attaches
its probes; restart it and take its first scrape (it must be exact at once), then SIGKILL that one
too while the 2 MiB pool churns under it. After each kill, see what it left in the kernel. Writes the
findings as JSON for tests/test_faults_vm_kill.py to judge.

    python tests/vm_guest_scripts/daemon_kill.py MODE OUT.json

Each daemon start costs a bcc compile (over a minute under TCG), hence two daemons per mode; the
daemon keeps no state across runs, so a restart after either kill starts from the kernel alone.
kprobe mode is where a leak would show in tracefs kprobe_events (bcc writes text kprobe events for
kretprobes with maxactive, and where the kprobe PMU cannot be used); fentry mode holds BPF links.
Debian kernels default to kernel.perf_event_paranoid=3, where only CAP_SYS_ADMIN may open perf
events: there the daemon runs kprobe mode as full root (matrix_daemon.choose_privileges), as the
kernel matrix does; the refusal itself is judged by the matrix's own test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, tracefs
from tests.daemon_proc import (
    FREE,
    H2M,
    Daemon,
    kernel_saved_pages,
    kill_holding,
    kprobe_events,
    leaked_bpf_ids,
    one,
)
from tests.kernel_state import restored_kernel_state
from tests.vm_guest_scripts.matrix_daemon import choose_privileges

PAGES = 16
MID_ATTACH = 3  # of the 14 (fentry: 7 functions, entry and exit) or 15 (kprobe) probes attached on sid
ATTACHMENT_FDS = ("anon_inode:bpf_link", "anon_inode:[perf_event]")
CHURN_PAGES = 8  # the pool swings between PAGES and PAGES + CHURN_PAGES while the daemon is killed
CHURN_STEPS_BEFORE_KILL = 6
READY_S = 900.0  # bcc compiles for about a minute under TCG, longer on a busy host


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the daemon serves on 127.0.0.1
    tracefs.ensure_tracefs()
    result: dict[str, object] = {"mode": mode, "privileges": choose_privileges(mode)}
    result["kprobe_events_before"] = before = kprobe_events()
    try:
        run(mode, out, result)
    finally:
        remove_new_kprobe_events(before)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def remove_new_kprobe_events(before: list[str]) -> None:
    """Undo kprobe events left behind (the guest is shared with other tests): after recording."""
    events = tracefs.ensure_tracefs() / "kprobe_events"
    for line in kprobe_events():
        if line not in before:
            with events.open("a") as f:  # "-:GROUP/NAME" removes one event
                f.write(f"-:{line.split()[0].split(':', 1)[1]}\n")


def findings(d: Daemon, when: str, held: dict[str, set[int]], **extra: object) -> dict[str, object]:
    return {"when": when, "killed_before_ready": "ready:" not in d.full_output(),
            "held": {k: sorted(v) for k, v in held.items()},
            "leaked": {k: sorted(v) for k, v in leaked_bpf_ids(held).items()},
            "kprobe_events_after": kprobe_events(), **extra}


def attachments(pid: int) -> int:
    """Probes ``pid`` has attached: BPF links (fentry, raw tracepoints) and perf events (kprobes). Only
    readlink, no fdinfo reads: kprobes attach fast, and a slow look lands after the last one."""
    n = 0
    with suppress(OSError):  # the process is gone
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):  # the fd is closed
                n += os.readlink(f"/proc/{pid}/fd/{fd}") in ATTACHMENT_FDS
    return n


def kill_during_attach(mode: str, out: Path) -> dict[str, object]:
    """Start a daemon, SIGKILL it once it has attached MID_ATTACH probes (of the 14 or 15 it attaches
    on sid, one after another): some of its probes attached, others not yet."""
    with started(mode, out) as d:
        deadline, look = time.monotonic() + READY_S, 0.0
        # Also stops once all are attached (fewer than MID_ATTACH probes): the host sees attached_logged.
        # The log (in the 9p share) is read twice a second only: each read is slow under TCG.
        while attachments(d.pid) < MID_ATTACH:
            now = time.monotonic()
            if d.proc.poll() is not None or now > deadline:
                raise RuntimeError(f"the daemon never attached {MID_ATTACH} probes:\n{d.output()}")
            if now > look:
                if attached_logged(d):
                    break
                look = now + 0.5
            time.sleep(0.001)
        os.kill(d.pid, signal.SIGSTOP)  # kill_holding stops it again, harmlessly
        n = attachments(d.pid)
        held = kill_holding(d)
    return findings(d, "attach", held, attachments=n, attached_logged=attached_logged(d))


def attached_logged(d: Daemon) -> bool:
    """The daemon logged that it attached all its probes (the baseline and READY come next)."""
    try:
        return "INFO hvo-observer: probes: mode" in d.full_output()
    except OSError:  # 9p may answer ENODATA while the daemon appends to its log: not yet, then
        return False


def churn_and_kill(d: Daemon) -> tuple[dict[str, set[int]], int, int]:
    """SIGKILL ``d`` in the middle of a churn: (what it held, churn steps made, events delivered)."""
    stop, steps = threading.Event(), [0]

    def churn() -> None:
        while not stop.is_set():
            hugepages.set_nr_hugepages(H2M, PAGES + CHURN_PAGES * (1 - steps[0] % 2))
            steps[0] += 1

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        deadline = time.monotonic() + READY_S
        delivered = 0
        # Killed once the daemon has been handed events of this churn, with the churn still going.
        while (steps[0] < CHURN_STEPS_BEFORE_KILL or delivered == 0) and churner.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no events delivered after {steps[0]} churn steps:\n{d.output()}")
            time.sleep(0.05)
            delivered = d.events_delivered()
        held = kill_holding(d)
    finally:
        stop.set()
        churner.join()
    return held, steps[0], delivered


@contextmanager
def started(mode: str, out: Path) -> Iterator[Daemon]:
    """A starting daemon, killed on the way out should the test not have killed it."""
    d = Daemon(out.parent, mode=mode)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.kill()


def run(mode: str, out: Path, result: dict[str, object]) -> None:
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        hugepages.set_nr_hugepages(H2M, PAGES)  # before any probe: optimized pages the daemon finds
        kills = result["kills"] = [kill_during_attach(mode, out)]
        # The restart: exact at its first scrape, then killed in its turn while the pool churns.
        with started(mode, out) as d:
            d.wait_ready(READY_S)
            m = d.scrape()
            result.update(
                optimized=one(m, "hvo_optimized_hugepages", hstate=H2M, node="0"),
                kernel_saved_pages=kernel_saved_pages(), expected_saved_pages=PAGES * FREE[H2M],
                saved_bytes={src: one(m, "hvo_vmemmap_saved_bytes", source=src)
                             for src in ("kernel", "expected")},
                pending_drift_bytes=one(m, "hvo_reconcile_pending_drift_bytes"),
                baseline_exact=one(m, "hvo_baseline_exact"),
                mode_seen=next(dict(k)["mode"] for k in m["hvo_build_info"]),
            )
            held, steps, delivered = churn_and_kill(d)
        kills.append(findings(d, "churn", held, churn_steps=steps, delivered_before_kill=delivered))


if __name__ == "__main__":
    sys.exit(main())
