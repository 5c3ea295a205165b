"""bcc compiles, loads, attaches and detaches a tracepoint program with the headers setup provides."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from observer.kernel import headers, tracefs

pytestmark = pytest.mark.live

# Counts page allocations made by one process: layout-independent (tracepoint args come from the
# event's format file, not from kernel structs), so inexact headers are fine.
PROGRAM = rb"""
BPF_ARRAY(allocs, u64, 1);

TRACEPOINT_PROBE(kmem, mm_page_alloc) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET_PID)
        return 0;
    int zero = 0;
    u64 *n = allocs.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


def _prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def _fdinfo_id(fd: int, field: str) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/fdinfo/{fd}")


@pytest.fixture
def tracing():
    """tracefs mounted for bcc's tracepoint lookup; unmounted afterwards if this test mounted it."""
    was_mounted = tracefs.tracefs_dir() is not None
    tracefs.ensure_tracefs()
    yield
    if not was_mounted:
        subprocess.run(["umount", tracefs.TRACEFS], check=False)


def test_tracepoint_program_compiles_loads_counts_and_detaches(tracing):
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    bcc = pytest.importorskip(
        "bcc", reason="bcc (Debian's python3-bpfcc) is not importable: run scripts/setup"
    )

    choice = headers.find_bcc_headers()
    headers.apply(choice)
    before = _prog_ids()

    b = bcc.BPF(text=PROGRAM, cflags=[f"-DTARGET_PID={os.getpid()}"])
    try:
        prog = b.load_func(b"tracepoint__kmem__mm_page_alloc", bcc.BPF.TRACEPOINT)
        prog_id = _fdinfo_id(prog.fd, "prog_id")
        assert prog_id in _prog_ids() - before
        assert b.num_open_tracepoints() == 1

        # Fault in 8 MiB of fresh anonymous memory: the kernel allocates pages for this process.
        with mmap.mmap(-1, 8 << 20) as buf:
            for offset in range(0, len(buf), mmap.PAGESIZE):
                buf[offset] = 1
        seen = b[b"allocs"][0].value
        print(f"headers: {choice.describe()}; mm_page_alloc events for this process: {seen}")
        assert seen > 0
    finally:
        b.cleanup()

    assert b.num_open_tracepoints() == 0
    assert prog_id not in _prog_ids(), f"BPF program {prog_id} leaked"
