"""Guest-side helpers of the kernel-matrix acceptance (matrix_daemon.py, matrix_fault.py): what the
kernel says, what the daemon says, and a quiet moment at which both are read.

Nothing here judges: the scripts record both sides per step as JSON and tests/test_vm_matrix.py,
on the host, compares them.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, vmstat
from tests.daemon_proc import H1G, H2M, Daemon, Samples, kernel_saved_pages, parse_metrics
from tests.vm.guest import KERNEL_ERROR

HSTATES = (H2M, H1G)
SETTLE_WAIT_S = 300.0  # only turns a hang into a recorded failure (TCG on a busy host is slow)
EVENTS_PAGE = 1000
EVENTS = ("optimize", "restore", "demote", "pool_alloc", "pool_free", "remap_free", "remap_alloc")


class NotSettled(RuntimeError):
    pass


def bring_up_loopback() -> None:
    # The test guest's init leaves lo down; the daemon serves on 127.0.0.1.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def kernel_view() -> dict[str, Any]:
    """The kernel's own figures now: pools, vmemmap counters (6.11+) and the saved pages they imply."""
    pools = {h.name: {"nr": h.nr_hugepages, "free": h.free_hugepages, "surplus": h.surplus_hugepages}
             for h in hugepages.read_hstates() if h.name in HSTATES}
    counters = vmstat.read_memmap_counters()
    return {
        "pools": pools,
        "memmap": None if counters is None else [counters.memmap_pages, counters.memmap_boot_pages],
        "saved_pages": None if counters is None else kernel_saved_pages(),
        "hvo_sysctl": sysctl.read_hvo_sysctl(),
    }


def _value(m: Samples, name: str, **labels: str) -> float | None:
    return m.get(name, {}).get(tuple(sorted(labels.items())))


def daemon_view(m: Samples) -> dict[str, Any]:
    """The daemon's figures from one /metrics scrape (None where a series is absent)."""
    def per_hstate(name: str) -> dict[str, float | None]:
        return {h: _value(m, name, hstate=h, node="0") for h in HSTATES}

    events = {}
    for labels, v in m.get("hvo_events_total", {}).items():
        d = dict(labels)
        events[f"{d['event']}/{d['hstate']}/{d['result']}"] = int(v)
    return {
        "pages": per_hstate("hvo_hugepages"),
        "surplus": per_hstate("hvo_hugepages_surplus"),
        "optimized": per_hstate("hvo_optimized_hugepages"),
        "saved_bytes": {"kernel": _value(m, "hvo_vmemmap_saved_bytes", source="kernel"),
                        "expected": _value(m, "hvo_vmemmap_saved_bytes", source="expected")},
        "memmap": [_value(m, "hvo_memmap_pages", counter="nr_memmap_pages"),
                   _value(m, "hvo_memmap_pages", counter="nr_memmap_boot_pages")],
        "drift_bytes": _value(m, "hvo_reconcile_drift_bytes"),
        "settled": _value(m, "hvo_reconcile_settled"),
        "byte_truth": _value(m, "hvo_reconcile_byte_truth"),
        "inconsistent": _value(m, "hvo_reconcile_inconsistent"),
        "baseline_exact": _value(m, "hvo_baseline_exact"),
        "resyncs": _value(m, "hvo_resyncs_total"),
        "lost": _value(m, "hvo_events_lost_total"),
        "hvo_enabled": _value(m, "hvo_hvo_enabled"),
        "mode": next((dict(k).get("mode") for k in m.get("hvo_build_info", {})), None),
        "probes": {f"{dict(k)['event']}={dict(k)['probe']}": int(v)
                   for k, v in m.get("hvo_probe_attached", {}).items()},
        "events": events,
    }


def _matches(k: dict[str, Any], v: dict[str, Any]) -> bool:
    """The daemon's last quiet moment is one after the step: it shows the kernel's present state."""
    same_pools = all(v["pages"][h] == k["pools"][h]["nr"] and v["surplus"][h] == k["pools"][h]["surplus"]
                     for h in HSTATES)
    same_counters = k["memmap"] is None or v["memmap"] == k["memmap"]
    return v["settled"] == 1 and same_pools and same_counters


def settle(d: Daemon, timeout: float = SETTLE_WAIT_S) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kernel, daemon) read at one quiet moment after everything done so far: the daemon reports
    settled, its pools and counters equal the kernel's, and nothing moved across two scrapes."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        k = kernel_view()
        v = daemon_view(parse_metrics(_metrics(d)))
        if _matches(k, v):
            again = daemon_view(parse_metrics(_metrics(d)))
            if again == v and kernel_view() == k:
                return k, v
        last = {"kernel": k, "daemon": v}
        time.sleep(0.2)
    raise NotSettled(f"no quiet moment matching the kernel within {timeout:.0f} s; last: {json.dumps(last)}")


def _metrics(d: Daemon) -> str:
    status, body = d.get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body[:200]}")
    return body


def first_scrape(d: Daemon) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Kernel, metrics and /api/v1/status right after the daemon became ready (no settling)."""
    k = kernel_view()
    v = daemon_view(parse_metrics(_metrics(d)))
    return k, v, json.loads(d.get("/api/v1/status")[1])


def mark(text: str) -> str:
    """A unique line in the kernel log: kernel errors after it belong to what follows."""
    line = f"hvo-matrix: {text} ({time.monotonic_ns()})"
    Path("/dev/kmsg").write_text(line + "\n")
    return line


def kernel_errors_since(marker: str) -> list[str]:
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()
    begin = max((i for i, ln in enumerate(lines) if marker in ln), default=-1)
    return [ln for ln in lines[begin + 1:] if KERNEL_ERROR.search(ln)]


@contextlib.contextmanager
def recorded(out: Path, result: dict[str, Any]) -> Iterator[float]:
    """Around a guest script's run: yields its start time; whatever happens, OUT gets RESULT with the
    total time, and an exception is recorded there for the host, then re-raised (traceback on stderr)."""
    t0 = time.monotonic()
    try:
        yield t0
    except BaseException as e:
        result["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        result["total_s"] = round(time.monotonic() - t0, 1)
        write_json(out, result)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.rename(path)


def dump_events(d: Daemon, path: Path) -> None:
    """The daemon's recent events (/api/v1/events), for reading a discrepancy; not judged."""
    events: list[dict[str, Any]] = []
    since = 0
    while True:
        status, body = d.get(f"/api/v1/events?since={since}&limit={EVENTS_PAGE}")
        if status != 200:
            break
        batch = json.loads(body)
        events += batch["events"]
        if not batch["events"]:
            break
        since = batch["next"]
    path.write_text(json.dumps(events) + "\n")


class Run:
    """Steps against one daemon: each records the kernel before, then kernel and daemon at the quiet
    moment after, the step's own result and the kernel errors it caused; OUT is rewritten each time."""

    def __init__(self, d: Daemon, out: Path, result: dict[str, Any]) -> None:
        self.d, self.out, self.result = d, out, result
        self.steps: list[dict[str, Any]] = result.setdefault("steps", [])

    def step(self, name: str, kind: str, hstate: str | None, action: Callable[[], Any]) -> dict[str, Any]:
        before = kernel_view()
        marker = mark(f"{self.result['mode']} {name} begins")
        t0 = time.monotonic()
        detail = action()
        done = time.monotonic()
        k, v = settle(self.d)
        v["delivered"] = self.d.events_delivered()  # records handed to the daemon (diagnosis only)
        rec = {"name": name, "kind": kind, "hstate": hstate, "before": before, "kernel": k, "daemon": v,
               "detail": detail, "action_s": round(done - t0, 2),
               "settle_s": round(time.monotonic() - done, 2), "kernel_errors": kernel_errors_since(marker)}
        self.steps.append(rec)
        print(f"{name}: pools {k['pools']}, daemon optimized {v['optimized']}, "
              f"{rec['action_s']} s + {rec['settle_s']} s", flush=True)
        write_json(self.out, self.result)  # partial results survive a later failure
        return rec
