"""Tracepoint mode on a kernel without the nr_memmap_* counters (Debian 6.1, before 6.11), in a QEMU
guest (TCG): it cannot infer optimize/restore, so the daemon says it runs degraded and why
(hvo_mode_degraded, the status document), and doctor and explain name the reason.
Judged here from tests/vm_guest_scripts/tracepoint_limits.py's JSON; the truth (no such counters) is
read from the guest's /proc/vmstat by the script itself."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "tests/vm_guest_scripts/tracepoint_limits.py"


def test_tracepoint_mode_without_memmap_counters_runs_degraded_and_says_why(
        shared_guest: Callable[..., Any]) -> None:
    guest = shared_guest("6.1")
    python = os.path.join(REPO, ".venv/bin/python")
    r = guest.run(f"cd {REPO} && {python} {RUNNER} $HVO_OUT/limits.json", timeout=1800)
    res = r.output_json("limits.json")
    print(f"{res['release']}: {r.duration_s:.0f} s in the guest")
    assert not res["vmstat_has_memmap"], "this guest kernel has nr_memmap_* counters: pick one before 6.11"
    assert res["metrics_status"] == 200
    assert res["mode_degraded"] == ["hvo_mode_degraded 1.0"], res["mode_degraded"]
    assert res["status"]["mode"] == "tracepoint" and res["status"]["degraded"] is True
    [reason] = [w for w in res["status"]["degraded_reasons"] if "nr_memmap" in w]
    assert "cannot infer optimize/restore" in reason
    assert reason in res["doctor"]["mode_limits"]["tracepoint"], res["doctor"].get("mode_limits")
    [finding] = [f for f in res["explain"]["findings"] if f["id"] == "degraded"]
    assert reason in finding["evidence"], finding
    assert res["stop_code"] == 0
