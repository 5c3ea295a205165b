"""Run in a big-host guest (tests/test_vm_bighost.py): ``hvo-observer run`` in one function mode
(fentry or kprobe) through the memory events of a production-shaped host, recording the kernel's and
the daemon's figures at a quiet moment after every step, as JSON for the host to judge.

    python tests/vm_guest_scripts/bighost.py MODE OUT.json --modules DIR [--pages N]

The guest (2 NUMA nodes, 2 GiB memory blocks, RAM below 4 GiB ending inside a block, ZONE_MOVABLE,
legacy pmem from ``memmap=``) starts with empty pools. Steps:
  calibrate   nothing changed: the first quiet moment
  fsdax       the pmem namespace becomes fsdax with its memmap in RAM (device memory, ZONE_DEVICE)
  offline     a ZONE_MOVABLE memory block is offlined (its memmap stays)
  grow        the 2 MiB pool + N (spread over both nodes) and the 1 GiB pool + 2, at runtime
  online      the block is onlined again
  hotadd      a 2 GiB DIMM is hot-added (by the host, over QMP, asked for through OUT's directory)
              while the 2 MiB pool grows by N more
  shrink      both pools back to 0
  hotremove   the DIMM's blocks offlined and the DIMM unplugged (QMP device_del, by the host)
Per step the kernel side is what /proc and sysfs say (pools per hstate and node, vmemmap counters,
the memory layout as files, for the host to compute its truth from); the daemon side is one
/metrics scrape at a quiet moment that matches the kernel's pools and counters. The daemon runs with
the unit's privileges, or as root in kprobe mode where those cannot open a kprobe perf event
(matrix_daemon.choose_privileges, recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, tracefs, vmstat
from tests.daemon_proc import H1G, H2M, Daemon, Samples, daemon, parse_metrics
from tests.vm_guest_scripts.matrix_common import (
    bring_up_loopback,
    dump_events,
    kernel_errors_since,
    mark,
    recorded,
    write_json,
)
from tests.vm_guest_scripts.matrix_daemon import choose_privileges

READY_S = 900.0
SETTLE_WAIT_S = 300.0
HSTATES = (H2M, H1G)
MEMORY = Path("/sys/devices/system/memory")
ND = Path("/sys/bus/nd/devices")


def kernel_view() -> dict[str, Any]:
    pools: dict[str, dict[str, int]] = {}
    for h in hugepages.read_hstates():
        if h.name in HSTATES:
            pools[h.name] = {str(n): p.nr_hugepages for n, p in sorted(h.nodes.items())}
            pools[h.name]["surplus"] = h.surplus_hugepages
    c = vmstat.read_memmap_counters()
    assert c is not None, "a 6.11+ kernel has nr_memmap_pages"
    return {"pools": pools, "memmap": [c.memmap_pages, c.memmap_boot_pages]}


def layout_files() -> dict[str, Any]:
    """The memory layout as the kernel shows it (for the host's independent figures and as fixtures)."""
    blocks = {}
    for b in sorted(MEMORY.glob("memory[0-9]*"), key=lambda p: int(p.name[6:])):
        nodes = [n.name for n in b.iterdir() if n.name.startswith("node")]
        blocks[b.name] = {"state": (b / "state").read_text().strip(), "node": nodes[0] if nodes else None}
    return {"block_size_bytes": (MEMORY / "block_size_bytes").read_text().strip(), "blocks": blocks,
            "iomem": Path("/proc/iomem").read_text()}


def daemon_view(m: Samples) -> dict[str, Any]:
    def series(name: str) -> dict[str, float]:
        return {"/".join(f"{k}={v}" for k, v in labels): val for labels, val in m.get(name, {}).items()}

    def one(name: str, **labels: str) -> float | None:
        return m.get(name, {}).get(tuple(sorted(labels.items())))

    events = {}
    for labels, v in m.get("hvo_events_total", {}).items():
        d = dict(labels)
        events[f"{d['event']}/{d['hstate']}/{d['result']}"] = int(v)
    return {
        "pages": series("hvo_hugepages"), "optimized": series("hvo_optimized_hugepages"),
        "saved_bytes": {"kernel": one("hvo_vmemmap_saved_bytes", source="kernel"),
                        "expected": one("hvo_vmemmap_saved_bytes", source="expected")},
        "memmap": [one("hvo_memmap_pages", counter="nr_memmap_pages"),
                   one("hvo_memmap_pages", counter="nr_memmap_boot_pages")],
        "drift_bytes": one("hvo_reconcile_drift_bytes"), "settled": one("hvo_reconcile_settled"),
        "byte_truth": one("hvo_reconcile_byte_truth"), "inconsistent": one("hvo_reconcile_inconsistent"),
        "resyncs": one("hvo_resyncs_total"), "lost": one("hvo_events_lost_total"),
        "mode": next((dict(k).get("mode") for k in m.get("hvo_build_info", {})), None),
        "probes": {f"{dict(k)['event']}={dict(k)['probe']}": int(v)
                   for k, v in m.get("hvo_probe_attached", {}).items()},
        "events": events,
    }


def _pages_of(v: dict[str, Any], h: str) -> dict[str, int]:
    return {key.split("node=")[1]: int(n) for key, n in v["pages"].items() if f"hstate={h}" in key}


def _matches(k: dict[str, Any], v: dict[str, Any]) -> bool:
    pools = all({n: c for n, c in k["pools"][h].items() if n != "surplus" and c}
                == {n: c for n, c in _pages_of(v, h).items() if c} for h in HSTATES)
    return v["settled"] == 1 and pools and v["memmap"] == k["memmap"]


def settle(d: Daemon) -> tuple[dict[str, Any], dict[str, Any]]:
    deadline = time.monotonic() + SETTLE_WAIT_S
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        k = kernel_view()
        v = daemon_view(parse_metrics(d.get("/metrics")[1]))
        # byte truth comes back once the daemon has recalibrated (device memory changed): wait for it
        if _matches(k, v) and v["byte_truth"] == 1:
            time.sleep(1.5)  # longer than the settle window: a figure that is about to change shows it
            again = daemon_view(parse_metrics(d.get("/metrics")[1]))
            if again == v and kernel_view() == k:
                return k, v
        last = {"kernel": k, "daemon": v}
        time.sleep(0.3)
    raise RuntimeError(f"no quiet moment matching the kernel in {SETTLE_WAIT_S:.0f} s: {json.dumps(last)}")


def step(d: Daemon, result: dict[str, Any], out: Path, name: str, action: Any) -> None:
    before = kernel_view()
    marker = mark(f"bighost {name} begins")
    t0 = time.monotonic()
    detail = action()
    done = time.monotonic()
    k, v = settle(d)
    result["steps"].append({"name": name, "before": before, "kernel": k, "daemon": v, "detail": detail,
                            "layout": layout_files(), "action_s": round(done - t0, 2),
                            "settle_s": round(time.monotonic() - done, 2),
                            "kernel_errors": kernel_errors_since(marker)})
    print(f"{name}: {k}, {time.monotonic() - t0:.1f} s", flush=True)
    write_json(out, result)


def modprobe(modules: Path, *names: str) -> None:
    base = modules.parent.parent.parent  # <base>/lib/modules/<release> (base may end in /usr)
    for name in names:
        subprocess.run(["modprobe", "-d", str(base), "-S", modules.name, name], check=True)


def fsdax(modules: Path) -> dict[str, Any]:
    """Legacy pmem (memmap=) -> namespace0.0 in fsdax mode with its memmap in RAM ("map=mem")."""
    modprobe(modules, "nd_e820", "nd_pmem")
    ns = ND / "namespace0.0"
    for _ in range(100):
        if ns.is_dir() and (ND / "region0/pfn_seed").exists():
            break
        time.sleep(0.1)
    drv = ns / "driver"
    if drv.exists():
        (drv / "unbind").write_text("namespace0.0")
    pfn = (ND / "region0/pfn_seed").read_text().strip()
    (ND / pfn / "mode").write_text("ram")
    (ND / pfn / "align").write_text(str(2 << 20))
    (ND / pfn / "uuid").write_text(str(uuid.uuid4()))  # an unconfigured pfn device does not probe
    (ND / pfn / "namespace").write_text("namespace0.0")
    Path("/sys/bus/nd/drivers/nd_pmem/bind").write_text(pfn)
    return {"pfn": pfn, "resource": (ND / pfn / "resource").read_text().strip(),
            "size": (ND / pfn / "size").read_text().strip(), "mode": (ND / pfn / "mode").read_text().strip()}


def movable_blocks() -> list[int]:
    """The online blocks of ZONE_MOVABLE (movablecore=), lowest first (the top of a node holds
    memblock allocations made at boot, which cannot be migrated)."""
    found = [int(b.name[6:]) for b in MEMORY.glob("memory[0-9]*")
             if (b / "state").read_text().strip() == "online"
             and (b / "valid_zones").read_text().split() == ["Movable"]]
    assert found, "no online ZONE_MOVABLE block (movablecore= on the kernel command line?)"
    return sorted(found)


def offline(blocks: list[int]) -> dict[str, Any]:
    """Offline the first of BLOCKS that can be; its number goes to blocks[0] for online()."""
    refused = []
    for block in list(blocks):
        try:
            (MEMORY / f"memory{block}/state").write_text("offline")
        except OSError as e:
            refused.append(f"memory{block}: {e.strerror}")
            continue
        blocks[:] = [block]
        return {"block": block, "state": (MEMORY / f"memory{block}/state").read_text().strip(),
                "refused": refused}
    raise RuntimeError(f"no ZONE_MOVABLE block could be offlined: {refused}")


def online(block: int) -> dict[str, Any]:
    (MEMORY / f"memory{block}/state").write_text("online")
    return {"block": block, "state": (MEMORY / f"memory{block}/state").read_text().strip()}


def grow(pages: int, gig: int) -> dict[str, Any]:
    now = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
    return {H2M: hugepages.set_nr_hugepages(H2M, now[H2M] + pages),
            H1G: hugepages.set_nr_hugepages(H1G, now[H1G] + gig)}


def hotadd_during_grow(out_dir: Path, pages: int) -> dict[str, Any]:
    """Ask the host for the DIMM (a file in the share), grow the 2 MiB pool meanwhile, and wait for
    the new memory to be online."""
    blocks = {p.name for p in MEMORY.glob("memory[0-9]*")}
    # ZONE_MOVABLE, so that the DIMM can be offlined and removed again (hotremove)
    (MEMORY / "auto_online_blocks").write_text("online_movable")
    (out_dir / "hotadd.request").write_text("1\n")
    grown: dict[str, int] = {}
    t = threading.Thread(target=lambda: grown.update(grow(pages, 0)))
    t.start()
    deadline = time.monotonic() + 300
    while not (out_dir / "hotadd.done").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    t.join()
    new: set[str] = set()
    while time.monotonic() < deadline:
        new = {p.name for p in MEMORY.glob("memory[0-9]*")} - blocks
        if new and all((MEMORY / b / "state").read_text().strip() == "online" for b in new):
            break
        time.sleep(0.1)
    for b in new:  # a kernel that leaves hot-added memory offline (memhp_default_state=offline)
        if (MEMORY / b / "state").read_text().strip() != "online":
            (MEMORY / b / "state").write_text("online")
    host = (out_dir / "hotadd.done").read_text() if (out_dir / "hotadd.done").exists() else "no answer"
    return {"new_blocks": sorted(new), "grown": grown, "host": host}


def hotremove(out_dir: Path, added: list[str]) -> dict[str, Any]:
    """Offline the DIMM's blocks, ask the host to unplug it (QMP device_del), wait for them to go."""
    for b in added:
        (MEMORY / b / "state").write_text("offline")
    (out_dir / "hotremove.request").write_text("1\n")
    deadline = time.monotonic() + 300
    while any((MEMORY / b).exists() for b in added) and time.monotonic() < deadline:
        time.sleep(0.1)
    host = (out_dir / "hotremove.done").read_text() if (out_dir / "hotremove.done").exists() else "no answer"
    return {"removed": [b for b in added if not (MEMORY / b).exists()], "host": host}


def shrink() -> dict[str, Any]:
    return {h: hugepages.set_nr_hugepages(h, 0) for h in (H1G, H2M)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fentry", "kprobe"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--modules", type=Path, required=True, help="the guest kernel's lib/modules/<release>")
    ap.add_argument("--pages", type=int, default=64)
    args = ap.parse_args()
    bring_up_loopback()
    tracefs.ensure_tracefs()
    sysctl.write_hvo_sysctl(True)
    result: dict[str, Any] = {"mode": args.mode,
                              "release": Path("/proc/sys/kernel/osrelease").read_text().strip(),
                              "cmdline": Path("/proc/cmdline").read_text().strip(), "steps": [],
                              "boot_layout": layout_files()}
    result["privileges"] = choose_privileges(args.mode)
    logdir = args.out.parent if args.out.parent.is_dir() else Path(tempfile.mkdtemp())
    # what the unit's ExecStartPre=+ does: vmemmap_base for the sandboxed daemon (pfn -> node)
    Path("/run/hvo-observer").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "observer", "kernel-addresses", "--write",
                    "/run/hvo-observer/kernel-addresses"], check=True, cwd=Path(__file__).parents[2])
    with recorded(args.out, result) as t0, daemon(logdir, mode=args.mode, ready_timeout=READY_S) as d:
        result["ready_s"] = round(time.monotonic() - t0, 1)
        try:
            step(d, result, args.out, "calibrate", lambda: None)
            step(d, result, args.out, "fsdax", lambda: fsdax(args.modules))
            blocks = movable_blocks()
            step(d, result, args.out, "offline", lambda: offline(blocks))
            step(d, result, args.out, "grow", lambda: grow(args.pages, 2))
            step(d, result, args.out, "online", lambda: online(blocks[0]))
            step(d, result, args.out, "hotadd", lambda: hotadd_during_grow(args.out.parent, args.pages))
            step(d, result, args.out, "shrink", shrink)
            added = next(s["detail"]["new_blocks"] for s in result["steps"] if s["name"] == "hotadd")
            step(d, result, args.out, "hotremove", lambda: hotremove(args.out.parent, added))
        finally:
            dump_events(d, args.out.with_name("events.json"))
        result["stop_code"] = d.stop()
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
