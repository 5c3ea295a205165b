"""SIGKILL during attach and during pool churn in the function modes, in a QEMU guest (stock Debian
sid 7.x, TCG): nothing left in the kernel (BPF programs, maps, links, kprobe events) and the daemon
restarted after the first kill is exact at once.
Judged here from tests/vm_guest_scripts/daemon_kill.py's JSON; the host-side (tracepoint) version of
this test is tests/test_faults_kill.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.vm

KERNEL = "sid"  # as tests/test_vm_storm.py (same guest)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "tests/vm_guest_scripts/daemon_kill.py"


@pytest.fixture(scope="module")
def guest(shared_guest: Callable[..., Any]) -> Any:
    return shared_guest(KERNEL, mem_mb=3072)  # the guest of tests/test_vm_storm.py


@pytest.mark.parametrize("mode", ["kprobe", "fentry"])
def test_sigkill_in_a_function_mode_leaves_nothing(guest: Any, mode: str) -> None:
    python = os.path.join(REPO, ".venv/bin/python")
    r = guest.run(f"cd {REPO} && {python} {RUNNER} {mode} $HVO_OUT/kill.json", timeout=2400)
    res = r.output_json("kill.json")
    print(f"{guest.kernel.release} {mode}: daemon ran as {res['privileges']['daemon']}, "
          f"{r.duration_s:.0f} s in the guest")
    for kill in res["kills"]:
        held = {k: len(v) for k, v in kill["held"].items()}
        extra = {k: v for k, v in kill.items()
                 if k in ("attachments", "attached_logged", "churn_steps", "delivered_before_kill")}
        print(f"{guest.kernel.release} {mode}, killed during {kill['when']}: held {held}, "
              f"before READY: {kill['killed_before_ready']}, {extra}")
        assert kill["held"]["prog"], "killed before anything was loaded"
        assert not any(kill["leaked"].values()), (kill["when"], kill["leaked"])
        assert kill["kprobe_events_after"] == res["kprobe_events_before"], kill["when"]
    attach, churn = res["kills"]
    assert attach["when"] == "attach" and not attach["attached_logged"], "the first kill came after attaching"
    assert not churn["killed_before_ready"] and churn["delivered_before_kill"] > 0, churn
    assert res["mode_seen"] == mode
    assert res["kernel_saved_pages"] == res["expected_saved_pages"]
    assert res["optimized"] == 16 and res["baseline_exact"] == 1
    assert res["saved_bytes"]["kernel"] == res["saved_bytes"]["expected"] == 16 * 7 * 4096
    assert res["pending_drift_bytes"] == 0
