"""``hvo-observer doctor`` run as a user runs it, on this machine's real kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from observer.kernel import hugepages
from tests.kernel_state import restored_kernel_state


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "observer", "doctor", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.live
def test_doctor_json_reports_this_machine() -> None:
    with restored_kernel_state():  # holds the pools lock: no other live test resizes pools meanwhile
        r = _doctor("--json")
        pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kernel"] == Path("/proc/sys/kernel/osrelease").read_text().strip()
    modes = report["modes"]
    assert modes["tracepoint"] == {"available": True, "reason": ""}
    assert not modes["kprobe"]["available"] and "without kprobes" in modes["kprobe"]["reason"]
    assert not modes["fentry"]["available"] and "refuses to load" in modes["fentry"]["reason"]
    assert report["best_mode"] == "tracepoint"
    assert report["memmap_counters"] is True
    assert report["hvo_enabled"] == (Path("/proc/sys/vm/hugetlb_optimize_vmemmap").read_text().strip() == "1")
    by_name = {h["name"]: h for h in report["hstates"]}
    assert (by_name["2048kB"]["vmemmap_pages"], by_name["2048kB"]["freeable_vmemmap_pages"]) == (8, 7)
    g1 = by_name["1048576kB"]
    assert (g1["vmemmap_pages"], g1["freeable_vmemmap_pages"]) == (4096, 4095)
    for name, h in by_name.items():
        assert h["size_bytes"] == int(name[:-2]) * 1024 and h["nr_hugepages"] == pools[name]
        assert isinstance(h["eligible"], bool) and (h["eligible"] or h["reason"])
    assert report["toolchain"]["bcc"]["available"]


@pytest.mark.live
def test_doctor_human_report() -> None:
    r = _doctor()
    assert r.returncode == 0, r.stderr
    assert "tracepoint  available" in r.stdout
    assert "kprobe      unavailable: the kernel is built without kprobes" in r.stdout
    assert "2048kB" in r.stdout and "1048576kB" in r.stdout


def test_bad_flag_is_one_line() -> None:
    r = _doctor("--jsn")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--jsn" in r.stderr and "Traceback" not in r.stderr
