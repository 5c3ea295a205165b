"""Run in a small matrix guest (as root): make vmemmap restore fail with ENOMEM while
``hvo-observer run`` watches, and record the kernel's and the daemon's figures as JSON for
tests/test_vm_matrix.py to judge.

    python tests/vm_guest_scripts/matrix_fault.py MODE OUT.json [--shrink N]

Steps (sysctl on; 2 MiB pool):
  grow      the pool up to what free memory holds without compaction (MemFree - HEADROOM, in one
            write: pushing it to the very last page takes many minutes of compaction under TCG)
  fault     memory is filled and the pool shrunk by N; every vmemmap restore fails with -ENOMEM and
            the kernel keeps those pages (as surplus). See ``window`` for how memory is filled.
  recover   memory back: the surplus pages are made persistent again and the pool emptied
The daemon's recent events are written next to OUT (the host checks each failure's errno there).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, tracefs
from tests.daemon_proc import H2M, daemon
from tests.vm_guest_scripts.matrix_common import (
    Run,
    bring_up_loopback,
    dump_events,
    recorded,
    settle,
)

READY_S = 900.0
HEADROOM_KB = 128 << 10  # left free after the grow: the filler takes most of it
FILL_MARGIN_KB = 16 << 10  # the filler stops this far above the low watermark (no reclaim, no OOM)
RESERVE_EXTRA_KB = 32 << 10  # the raised min watermark exceeds everything allocatable by this much
MIN_FREE = Path("/proc/sys/vm/min_free_kbytes")
LOWMEM_RESERVE = Path("/proc/sys/vm/lowmem_reserve_ratio")
NR = Path("/proc/sys/vm/nr_hugepages")
MCL_CURRENT, MCL_FUTURE = 1, 2


def meminfo() -> dict[str, int]:
    text = Path("/proc/meminfo").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\S+):\s+(\d+)", text, re.M)}


def low_watermark_kb() -> int:
    text = Path("/proc/zoneinfo").read_text()
    return sum(int(n) for n in re.findall(r"^\s+low\s+(\d+)$", text, re.M)) * 4


def nr(name: str = H2M) -> int:
    return hugepages.by_name(hugepages.read_hstates(), name).nr_hugepages


def window(daemon_pid: int, shrink_to: int) -> dict[str, Any]:
    """Fill memory and shrink the pool, in a forked child that holds the memory.

    Under a full memory the kernel reclaims (page cache) before an allocation fails, so filling alone
    cannot make the 7-page vmemmap allocation fail without the OOM killer stepping in first. The
    child therefore (1) mlocks itself and anonymous memory down to just above the low watermark,
    (2) raises vm.min_free_kbytes above all that is still free or reclaimable, so the restore's
    order-0 allocations (GFP_KERNEL|__GFP_NORETRY on 6.1, __GFP_RETRY_MAYFAIL on 6.7+: neither
    OOM-kills) fail, and closes the ZONE_DMA fallback (lowmem_reserve_ratio 1 for DMA: its share of
    min_free_kbytes is too small to matter, and 7 pages always fit there), (3) shrinks the pool,
    (4) puts both settings back. The daemon is stopped
    (SIGSTOP) for those few writes: its events wait in the BPF ring buffer, but page faults of its
    own would wake the OOM killer. No allocation in the child between (2) and (4): pre-opened files,
    pre-built bytes, os.write.
    """
    min_was = MIN_FREE.read_text().strip()
    ratio_was = LOWMEM_RESERVE.read_text().split()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(rfd)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
                raise OSError(ctypes.get_errno(), "mlockall")
            m = meminfo()
            fill_kb = max(0, m["MemFree"] - low_watermark_kb() - FILL_MARGIN_KB)
            # MCL_FUTURE: the mapping is populated and locked as it is made (unevictable, no swap).
            filler = mmap.mmap(-1, fill_kb << 10, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            filler[0] = 1  # held until the child exits
            m = meminfo()
            raise_kb = (m["MemFree"] + m["Active(file)"] + m["Inactive(file)"] + m["SReclaimable"]
                        + RESERVE_EXTRA_KB)
            raise_fd, back_fd = os.open(MIN_FREE, os.O_WRONLY), os.open(MIN_FREE, os.O_WRONLY)
            close_fd, open_fd = os.open(LOWMEM_RESERVE, os.O_WRONLY), os.open(LOWMEM_RESERVE, os.O_WRONLY)
            nr_fd = os.open(NR, os.O_WRONLY)
            raise_b, back_b = f"{raise_kb}\n".encode(), f"{min_was}\n".encode()
            close_b, open_b = " ".join(["1", *ratio_was[1:]]).encode(), " ".join(ratio_was).encode()
            nr_b = f"{shrink_to}\n".encode()
            err = 0
            os.kill(daemon_pid, signal.SIGSTOP)
            try:
                os.write(close_fd, close_b)
                os.write(raise_fd, raise_b)
                try:
                    os.write(nr_fd, nr_b)
                except OSError as e:
                    err = e.errno
            finally:
                os.write(back_fd, back_b)
                os.write(open_fd, open_b)
                os.kill(daemon_pid, signal.SIGCONT)
            info = {"filled_kb": fill_kb, "min_free_kbytes": [int(min_was), raise_kb], "write_errno": err,
                    "lowmem_reserve_ratio": [open_b.decode(), close_b.decode()],
                    "memfree_kb": m["MemFree"], "reclaimable_kb": raise_kb - m["MemFree"] - RESERVE_EXTRA_KB}
            os.write(wfd, json.dumps(info).encode())
            code = 0
        except BaseException:
            os.write(wfd, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        data = b""
        while chunk := os.read(rfd, 65536):
            data += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(rfd)
        MIN_FREE.write_text(f"{min_was}\n")  # whatever happened to the child
        LOWMEM_RESERVE.write_text(" ".join(ratio_was) + "\n")
        os.kill(daemon_pid, signal.SIGCONT)
    info = json.loads(data or b'{"error": "the child wrote nothing"}')
    info["child_status"] = status
    if "error" in info:
        raise RuntimeError(f"fault window failed: {info}")
    return info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fentry", "kprobe"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shrink", type=int, default=8, help="2 MiB pages to try to free under pressure")
    args = ap.parse_args()
    bring_up_loopback()
    tracefs.ensure_tracefs()
    sysctl.write_hvo_sysctl(True)
    result: dict[str, Any] = {"mode": args.mode, "shrink": args.shrink,
                              "release": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    with (recorded(args.out, result) as t0,
          daemon(args.out.parent, mode=args.mode, ready_timeout=READY_S) as d):
        result["daemon_log"] = str(d.log_path)
        result["ready_s"] = round(time.monotonic() - t0, 1)
        k, v = settle(d)
        result["start"] = {"kernel": k, "daemon": v}
        run = Run(d, args.out, result)
        try:
            target = nr() + max(0, meminfo()["MemFree"] - HEADROOM_KB) // 2048
            run.step("grow", "grow", H2M, lambda: hugepages.set_nr_hugepages(H2M, target))
            if nr() <= args.shrink:
                raise RuntimeError(f"the pool grew to {nr()} pages only: nothing to shrink")
            pool = nr()
            run.step("fault", "fault", H2M, lambda: window(d.pid, pool - args.shrink))
            # Surplus pages become persistent when the pool is set to its current size; then out.
            run.step("recover", "shrink", H2M,
                     lambda: [hugepages.set_nr_hugepages(H2M, nr()), hugepages.set_nr_hugepages(H2M, 0)])
        finally:
            dump_events(d, args.out.with_name(f"events-{args.mode}.json"))
        result["stop_code"] = d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
