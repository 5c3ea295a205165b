"""Can a process with the systemd unit's privileges (root, only CAP_BPF and CAP_PERFMON,
no_new_privs) attach what kprobe mode (a perf event) and tracepoint mode (a raw tracepoint, no perf
event) need, and with the README's drop-in (CAP_SYS_ADMIN added) for kernels whose
perf_event_paranoid=3 refuses perf events?

    python tests/vm_guest_scripts/matrix_privileges.py            # JSON on stdout
    python tests/vm_guest_scripts/matrix_privileges.py --child    # (itself, under setpriv)

The product's own trials (observer/kernel/bpf_trial.py: one kprobe through the kprobe PMU, a raw
tracepoint program on mm_page_alloc) are run as root and under the unit's privileges; nothing is
compiled, so this takes a second where finding out through the daemon takes a bcc compile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel import bpf_trial
from observer.kernel.files import read_int

KPROBE_TYPE = Path("/sys/bus/event_source/devices/kprobe/type")


def child() -> dict[str, str]:
    """Per mode: "" when the kernel lets us attach what it needs, else the product's reason."""
    out = {"tracepoint": bpf_trial.try_raw_tracepoint("mm_page_alloc")[1]}
    if KPROBE_TYPE.exists():
        out["kprobe"] = bpf_trial.try_kprobe_event(read_int(KPROBE_TYPE))[1]
    return out


def check() -> dict[str, object]:
    """Reasons per event kind as root and with the unit's privileges, and perf_event_paranoid."""
    from tests.daemon_proc import UNIT_PRIVILEGES  # not in the child: heavy imports over 9p

    def as_unit(*extra_caps: str) -> dict[str, str]:
        prefix = [a + "".join(f",+{c}" for c in extra_caps) if a.startswith("--bounding-set=") else a
                  for a in UNIT_PRIVILEGES]
        r = subprocess.run([*prefix, sys.executable, __file__, "--child"],  # runs: setpriv
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout)

    return {
        "perf_event_paranoid": int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()),
        "root": child(),
        "unit": as_unit(),
        # The README's drop-in for such kernels: the unit plus CAP_SYS_ADMIN.
        "unit_sys_admin": as_unit("sys_admin"),
    }


if __name__ == "__main__":
    print(json.dumps(child() if sys.argv[1:2] == ["--child"] else check()))
