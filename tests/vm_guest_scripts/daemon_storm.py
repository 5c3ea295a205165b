"""Run in a test guest (as root): ``hvo-observer run`` in a function mode, then a storm of random
2 MiB pool steps, and write the daemon's books as JSON for tests/test_vm_storm.py to judge.

    python tests/vm_guest_scripts/daemon_storm.py MODE STEPS OUT.json

HVO is exercised once before the daemon starts (see function_probes.py: Debian 6.12 logs a bad page
state the first time freshly optimized vmemmap is restored), and the kernel log is marked where the
storm begins so the host can tell the storm's kernel errors from the warm-up's. Pools and sysctl are
restored at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import hugepages, sysctl, tracefs
from tests.daemon_proc import (
    FREE,
    H1G,
    H2M,
    Pool,
    check_books,
    count,
    daemon,
    kernel_saved_pages,
    one,
    seeded_rng,
    settled_books,
)
from tests.kernel_state import restored_kernel_state

MAX_PAGES = 64
READY_S = 900.0  # bcc compiles for about a minute under TCG, longer on a busy host


def main() -> int:
    mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    # The test guest's init leaves the loopback interface down; the daemon serves on 127.0.0.1.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tracefs.ensure_tracefs()
    rng = seeded_rng()
    result: dict[str, object] = {"mode": mode, "steps": steps}
    # The daemon's log goes next to OUT, in the share: the host can read it while the guest runs.
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        hugepages.set_nr_hugepages(H1G, 0)
        hugepages.set_nr_hugepages(H2M, MAX_PAGES)  # warm-up, before any probe
        hugepages.set_nr_hugepages(H2M, 0)
        with daemon(out.parent, "--recent-events", "16", mode=mode, ready_timeout=READY_S) as d:
            before, seq0 = settled_books(d)
            Path("/dev/kmsg").write_text("hvo-test: storm begins\n")
            print("storm begins", flush=True)
            pool = Pool()
            t0 = time.monotonic()
            for i in range(steps):
                pool.resize(rng.randint(0, MAX_PAGES))
                if i % 50 == 49:
                    print(f"{i + 1} steps in {time.monotonic() - t0:.1f} s", flush=True)
            result["storm_s"] = round(time.monotonic() - t0, 1)
            after, seq = settled_books(d)
            result["lost"] = check_books(before, after, seq - seq0, pool)  # asserts the pool counts
            result.update(
                pages=pool.pages, allocs=pool.allocs, frees=pool.frees, delivered=seq - seq0,
                kernel_saved_pages=kernel_saved_pages(), expected_saved_pages=pool.pages * FREE[H2M],
                optimized=one(after, "hvo_optimized_hugepages", hstate=H2M, node="0"),
                saved_bytes={src: one(after, "hvo_vmemmap_saved_bytes", source=src)
                             for src in ("kernel", "expected")},
                drift_bytes=one(after, "hvo_reconcile_drift_bytes"),
                resyncs=one(after, "hvo_resyncs_total"),
                mode_seen=next(dict(k)["mode"] for k in after["hvo_build_info"]),
                events={e: count(after, e) - count(before, e) for e in ("optimize", "restore")},
                not_ok={f"{e}/{r}": count(after, e, r) for e in ("optimize", "restore")
                        for r in ("error", "skipped")},
                probes={dict(k)["probe"]: v for k, v in after["hvo_probe_attached"].items()},
            )
            result["stop_code"] = d.stop()
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
