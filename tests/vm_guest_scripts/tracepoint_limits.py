"""Tracepoint mode on a kernel without the nr_memmap_* counters (before 6.11): what the kernel has,
and what the daemon (``run --mode tracepoint``, the unit's privileges), ``doctor`` and ``explain``
say about it.

    python tests/vm_guest_scripts/tracepoint_limits.py OUT.json

Nothing here judges: tests/test_vm_tracepoint_limits.py, on the host, reads the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import tracefs
from tests.daemon_proc import daemon
from tests.vm_guest_scripts.matrix_common import bring_up_loopback, write_json

READY_S = 600.0  # bcc compiles for minutes under TCG


def main() -> int:
    out = Path(sys.argv[1])
    bring_up_loopback()
    tracefs.ensure_tracefs()
    vmstat = Path("/proc/vmstat").read_text()
    result: dict[str, object] = {
        "release": Path("/proc/sys/kernel/osrelease").read_text().strip(),
        "vmstat_has_memmap": any(line.startswith("nr_memmap") for line in vmstat.splitlines()),
    }
    doctor = subprocess.run([sys.executable, "-m", "observer", "doctor", "--json"], capture_output=True,
                            text=True, check=False)
    result["doctor"] = json.loads(doctor.stdout) if doctor.returncode in (0, 1) and doctor.stdout else \
        {"error": doctor.stderr[-2000:]}
    logdir = Path(tempfile.mkdtemp())
    with daemon(logdir, mode="tracepoint", ready_timeout=READY_S) as d:
        status, body = d.get("/metrics")
        result["metrics_status"] = status
        result["mode_degraded"] = [line for line in body.splitlines() if line.startswith("hvo_mode_degraded")]
        result["status"] = {k: v for k, v in d.status().items()
                            if k in ("mode", "degraded", "degraded_reasons")}
        explain = subprocess.run([sys.executable, "-m", "observer", "explain", "--json",
                                  "--daemon", str(d.api_socket)], capture_output=True, text=True, check=False)
        result["explain"] = json.loads(explain.stdout) if explain.stdout.strip().startswith("{") else \
            {"error": (explain.stdout + explain.stderr)[-2000:]}
        result["stop_code"] = d.stop()
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
