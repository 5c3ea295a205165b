"""``overhead_pool`` of ``hvo-observer bench`` in a QEMU guest, in fentry and kprobe mode.

These machines' kernel has neither, so those modes' cost is measured in a guest booting a stock
Debian kernel through the test harness (tests/vm). Development tool, not part of the product:

    .venv/bin/python -m tests.bench_guest [--quick] [--pool-pages N] [--json FILE]

The guest shares this tree read-only and runs ``python -m observer bench --force --only overhead_pool``
there; the figures are printed in the same table as the host bench.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from observer import __version__
from observer.bench import FULL, QUICK, Figure, machine, table
from tests.vm import Guest

REPO = Path(__file__).resolve().parents[1]
GUEST_KERNEL = "sid"  # 7.x: fentry and kprobes, the per-folio HVO functions (Debian 6.12 reports bad pages)
GUEST_MODES = ("fentry", "kprobe")
NAMES = tuple(f"guest_overhead_pool_ratio_{m}" for m in GUEST_MODES)


def _progress(msg: str) -> None:
    print(f"bench_guest: {msg}", file=sys.stderr, flush=True)


def _missing(name: str, why: str) -> Figure:
    return Figure(name, name, None, "", None, note=why)


def guest_figures(quick: bool, pool_pages: int) -> list[Figure]:
    if os.geteuid() != 0:
        return [_missing(n, "QEMU guests sharing / over 9p need root") for n in NAMES]
    figures: list[Figure] = []
    python = Path(sys.executable)
    # Under TCG one grow+shrink of 1,000 pages takes seconds and each daemon start a minute of compiling:
    # fewer starts and one cycle per run keep a full guest run near ten minutes per mode.
    flags = "--quick" if quick else "--pairs 3,3 --cycles 1"
    # The guest needs the pool plus room for the daemon: 2 MiB per page, and 2 GiB to spare.
    mem_mb = max(2048, pool_pages * 2 + 2048)
    # One vCPU: the guest's clock is the host's, so with two vCPU threads (and QEMU's own) sharing this
    # machine's cores, whatever the emulator loses to the daemon's vCPU is charged to the writer's CPU
    # time. On one vCPU the guest kernel accounts the writer and the daemon apart, as on real hardware.
    _progress(f"booting Debian {GUEST_KERNEL} under QEMU TCG ({mem_mb} MiB, 1 vCPU)")
    try:
        with Guest(GUEST_KERNEL, mem_mb=mem_mb, cpus=1) as g:
            for mode, name in zip(GUEST_MODES, NAMES, strict=True):
                _progress(f"overhead_pool in {mode} mode (compiling under TCG takes about a minute)")
                cmd = (f"cd {REPO} && {python} -m observer bench {flags} --force --only overhead_pool "
                       f"--mode {mode} --pool-pages {pool_pages} --json $HVO_OUT/bench.json")
                r = g.run(cmd, timeout=3600)
                out = r.outdir / "bench.json"
                if r.exit_code != 0 or not out.is_file():
                    why = (r.stderr.strip().splitlines() or [f"exit code {r.exit_code}"])[-1]
                    figures.append(_missing(name, f"{mode} in the guest failed: {why}"))
                    continue
                fig = json.loads(out.read_text())["figures"][0]
                detail = {**fig["detail"], "kernel": g.kernel.release, "boot_s": round(g.boot_s or 0, 1),
                          "accel": "tcg", "vcpus": 1}
                interval = tuple(fig["interval"]) if fig.get("interval") else None
                figures.append(Figure(name, f"guest ({g.kernel.release}, TCG) {fig['label']}, {mode}",
                                      fig["value"], "x", ("<=", 1.02), fig.get("note", ""), detail,
                                      interval))
    except Exception as e:  # the harness raises its own errors (boot, timeout): a figure we could not get
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        done = {f.name for f in figures}
        figures += [_missing(n, f"guest failed: {first}") for n in NAMES if n not in done]
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench_guest", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: checks the machinery, not the figures")
    p.add_argument("--pool-pages", type=int, metavar="N",
                   help=f"pages per grow/shrink (default {FULL.pool_pages})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure, with details, as JSON")
    args = p.parse_args(argv)
    pages = args.pool_pages or (QUICK if args.quick else FULL).pool_pages
    if not 1 <= pages <= 100_000:
        p.error(f"bad --pool-pages {pages}: expected 1 to 100000")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    t0 = time.monotonic()
    figures = guest_figures(args.quick, pages)
    report = {"version": __version__, "started": started, "seconds": round(time.monotonic() - t0, 1),
              "quick": args.quick, "pool_pages": pages, "machine": machine(),
              "loadavg": {"before": load_before, "after": os.getloadavg()},
              "figures": [f.to_json() for f in figures]}
    print(table(figures, report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(f.value is None for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
