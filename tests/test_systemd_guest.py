"""systemd/hvo-observer.service under real systemd, in a QEMU guest (tests/vm, systemd mode) running
Debian's 6.1 kernel over the host's root.

The unit file and the example configuration go into the guest exactly as shipped, at the paths an
install uses (/etc/systemd/system/, /etc/hvo-observer/hvo-observer.toml); /usr/bin/hvo-observer,
which the unit runs, execs the checkout (bind-mounted at /opt/hvo) as ``python -m observer`` (so the
main PID is the daemon). The unit is not enabled: each test starts what it needs, in file order:

- it becomes active only after READY=1: while the daemon compiles and attaches (its HTTP server
  already answering /healthz with 503) systemd reports ``activating``, and the first time systemd
  reports ``active`` the daemon's /healthz says ok;
- the daemon runs with exactly CAP_BPF and CAP_PERFMON (no CAP_SYS_ADMIN) and every probe of the mode
  auto picked is attached;
- although /proc/kallsyms shows it only zeros (no CAP_SYSLOG), the daemon gets the kernel addresses its
  probes need from the unit's privileged start-up step (ExecStartPre=+ kernel-addresses): no
  "no vmemmap_base" warning, and the same function probes (remap walkers included) as root;
- ``systemctl reload`` re-reads the config (same PID, new value served; a broken file is reported and
  the running configuration kept);
- the watchdog restarts a hung daemon (SIGSTOP: NRestarts increments, a new PID becomes active, the
  hung daemon's BPF programs are gone);
- ``systemctl stop`` leaves no BPF program of the daemon loaded (bpftool in the guest);
- ``systemd-analyze security`` on the loaded unit reports an exposure of 2.5 or lower
  (tests/test_systemd_unit.py checks the same offline on the host).

Waiting loops only turn a hang into a failure message; nothing asserts on time. The guest is
stopped after the module, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import Guest, GuestResult
from tests.vm.guest import DEFAULT_MASK

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]
UNIT = "hvo-observer.service"
UNIT_FILE = REPO / "systemd" / UNIT
CONFIG = REPO / "systemd" / "hvo-observer.toml"
KERNEL = "6.1"
ENTRY_POINT = REPO / ".venv" / "bin" / "hvo-observer"
# What the unit grants: CAP_PERFMON (38) and CAP_BPF (39), nothing else.
UNIT_CAPS = (1 << 38) | (1 << 39)
CAP_SYS_ADMIN = 21
MAX_EXPOSURE = 2.5
WAIT_S = 600.0  # TCG: compiling the probes takes minutes on a loaded machine (the drop-in below)
SETTLE = "settle_seconds = 1.0\n"
# HTTP from the guest's shell: busybox (installed by scripts/setup) rather than curl (which it is not).
GET = "busybox wget -q -O - http://127.0.0.1:9817"
GET_STATUS = "busybox wget -q -S -O /dev/null http://127.0.0.1:9817"  # prints the status line
# The JSON API is on the unit's socket (/run/hvo-observer/api.sock, root's): the CLI, as root.
API_STATUS = "cd /opt/hvo && .venv/bin/python -m observer status --json"
# Types of the programs a probe mode loads (systemd's own are cgroup_skb/cgroup_device).
TRACING_TYPES = {"kprobe", "tracepoint", "raw_tracepoint", "tracing", "perf_event"}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if os.geteuid() != 0:
        pytest.skip("QEMU guests with a 9p share of / need root")
    for tool in ("qemu-system-x86_64", "bpftool", "busybox", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/setup")
    if not ENTRY_POINT.exists():
        pytest.fail(f"{ENTRY_POINT} is missing: run scripts/setup (it installs the project into the venv)")
    # The checkout is bind-mounted at /opt/hvo, as README installs it: wherever the checkout lives
    # (a CI clone under /tmp would be hidden by the unit's PrivateTmp=), the service sees it there.
    files = {
        f"/etc/systemd/system/{UNIT}": UNIT_FILE.read_text(),
        "/etc/hvo-observer/hvo-observer.toml": CONFIG.read_text(),
        "/etc/systemd/system/opt-hvo.mount":
            f"[Mount]\nWhat={REPO}\nWhere=/opt/hvo\nType=none\nOptions=bind,ro\n",
        # TimeoutStartSec: the unit's 180 s is for real hosts (a compile takes seconds); under TCG on a
        # busy 2-core machine it took up to 170 s, and a timeout there says nothing about the unit.
        f"/etc/systemd/system/{UNIT}.d/checkout.conf":
            "[Unit]\nRequiresMountsFor=/opt/hvo\n[Service]\nTimeoutStartSec=900s\n",
        # cwd first on sys.path: the code at /opt/hvo, not the editable install's path to the checkout
        "/usr/bin/hvo-observer":
            '#!/bin/sh\ncd /opt/hvo && exec /opt/hvo/.venv/bin/python -m observer "$@"\n',
    }
    # serial-getty@ttyS0 waits 90 s for a device udev never announces in these guests.
    mask = (*DEFAULT_MASK, "serial-getty@ttyS0.service")
    with Guest(KERNEL, systemd=True, files=files, mask=mask,
               workdir=tmp_path_factory.mktemp("systemd-guest")) as g:
        print(f"\n{g.kernel.release}: systemd guest ready after {g.boot_s:.1f} s")
        yield g


def sh(g: Guest, script: str, timeout: float = 300) -> str:
    r = g.run(script, timeout=timeout)
    assert r.exit_code == 0, r.describe()
    return r.stdout


def show(g: Guest, *props: str) -> dict[str, str]:
    out = sh(g, f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(g: Guest) -> str:
    return sh(g, f"journalctl -u {UNIT} --no-pager -o cat")


def wait_until(g: Guest, what: str, check: str, timeout: float = WAIT_S) -> GuestResult:
    """Run the shell test ``check`` in the guest every half second until it succeeds."""
    script = (f"end=$(( $(date +%s) + {int(timeout)} ))\n"
              f"until {check}; do [ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done\n")
    r = g.run(script, timeout=timeout + 120)
    if r.exit_code != 0:
        pytest.fail(f"{what}: not seen within {timeout:.0f} s\n{journal(g)[-4000:]}\n{r.describe()}")
    return r


def active(g: Guest) -> None:
    """The unit is active (started now if it is not)."""
    if show(g, "ActiveState")["ActiveState"] != "active":
        r = g.run(f"systemctl start {UNIT}", timeout=WAIT_S)
        assert r.exit_code == 0, f"{journal(g)[-4000:]}\n{r.describe()}"
    assert show(g, "ActiveState")["ActiveState"] == "active", journal(g)[-4000:]


def main_pid(g: Guest) -> int:
    return int(show(g, "MainPID")["MainPID"])


def metrics(g: Guest) -> str:
    return sh(g, f"{GET}/metrics")


def prog_ids_of(g: Guest, pid: int) -> set[int]:
    """BPF programs process ``pid`` holds (its fdinfo, seen from outside its /proc mount)."""
    out = sh(g, f"cat /proc/{pid}/fdinfo/* 2>/dev/null | sed -n 's/^prog_id:[[:space:]]*//p'")
    return {int(n) for n in out.split()}


def wait_freed(g: Guest, ids: set[int]) -> None:
    """Programs ``ids`` are gone (the kernel frees them after an RCU grace period: bounded wait)."""
    pattern = '"id":(' + "|".join(map(str, sorted(ids))) + "),"
    gone = f"! bpftool -j prog list | grep -Eq '{pattern}'"
    wait_until(g, f"programs {sorted(ids)} freed", gone, timeout=60)


def programs(g: Guest) -> dict[int, str]:
    """Every BPF program loaded in the guest: id -> type."""
    return {p["id"]: p["type"] for p in json.loads(sh(g, "bpftool -j prog list") or "[]")}


# --- the tests (in the order they run) ---------------------------------------------------------------


def test_unit_becomes_active_only_after_ready(guest: Guest) -> None:
    g = guest
    sh(g, f"systemctl stop {UNIT}; systemctl reset-failed {UNIT} 2>/dev/null; true")
    # Sample systemd's view and the daemon's /healthz together until systemd calls it active.
    script = f"""
systemctl start --no-block {UNIT}
end=$(( $(date +%s) + {int(WAIT_S)} ))
while :; do
    state=$(systemctl show -P ActiveState {UNIT})
    sub=$(systemctl show -P SubState {UNIT})
    pid=$(systemctl show -P MainPID {UNIT})
    code=$({GET_STATUS}/healthz 2>&1 | awk '$1 ~ /^HTTP/ {{print $2}}')
    echo "$state $pid ${{code:-000}} $sub"
    case $state/$sub in active/*|failed/*|inactive/*|*/auto-restart) break;; esac
    [ $(date +%s) -ge $end ] && break
    sleep 0.5
done
"""
    samples = [line.split() for line in sh(g, script, timeout=WAIT_S + 120).splitlines()]
    assert samples and samples[-1][0] == "active", f"{samples[-5:]}\n{journal(g)[-4000:]}"
    # Before READY: the daemon runs (a main PID) and answers /healthz 503, and systemd waits.
    assert [s for s in samples if s[0] == "activating" and s[1] != "0" and s[2] == "503"], samples
    # The first time systemd calls it active, the daemon is ready (its /healthz turns 200 just
    # before it sends READY=1; a Type=simple unit would be active with 503 or no answer here).
    assert samples[-1][2] == "200", samples[-5:]
    assert re.search(r"^hvo-observer: probes: mode \w+, (\d+)/\1 attached", journal(g), re.M)
    t = show(g, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    began, ready_at = int(t["ExecMainStartTimestampMonotonic"]), int(t["ActiveEnterTimestampMonotonic"])
    print(f"\nExecStart to active (READY=1): {(ready_at - began) / 1e6:.1f} s under TCG")


def test_daemon_runs_with_only_bpf_and_perfmon(guest: Guest) -> None:
    g = guest
    active(g)
    status = sh(g, f"cat /proc/{main_pid(g)}/status")
    caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
    assert caps == {"CapInh": UNIT_CAPS, "CapPrm": UNIT_CAPS, "CapEff": UNIT_CAPS, "CapBnd": UNIT_CAPS,
                    "CapAmb": UNIT_CAPS}, {k: hex(v) for k, v in caps.items()}
    assert not caps["CapBnd"] & (1 << CAP_SYS_ADMIN)
    doc = json.loads(sh(g, API_STATUS, timeout=600))
    assert (doc["source"], doc["daemon"]) == ("daemon", "/run/hvo-observer/api.sock"), doc.get("daemon_error")
    assert sh(g, "stat -c '%a %U %F' /run/hvo-observer /run/hvo-observer/api.sock").split() == [
        "755", "root", "directory", "660", "root", "socket"]
    print(f"\nunder the unit: mode {doc['mode']} ({doc['mode_reason']})")
    text = metrics(g)
    attached = re.findall(r"^hvo_probe_attached\{(.*)\} (\S+)$", text, re.M)
    assert attached and all(float(v) == 1 for _, v in attached), attached
    assert re.search(r"^hvo_mode_degraded 0\.0$", text, re.M), text
    loaded = programs(g)
    mine = prog_ids_of(g, main_pid(g))
    assert mine and {loaded[i] for i in mine} <= TRACING_TYPES, (mine, loaded)


def test_daemon_gets_the_kernel_addresses_root_sees(guest: Guest) -> None:
    g = guest
    active(g)
    invocation = show(g, "InvocationID")["InvocationID"]
    log = sh(g, f"journalctl _SYSTEMD_INVOCATION_ID={invocation} --no-pager -o cat")
    record = "/run/hvo-observer/kernel-addresses"
    # The privileged step ran, and the daemon (which sees only zeros) filled its addresses from it.
    assert "no vmemmap_base" not in log, log[-4000:]
    assert re.search(r"kernel addresses: /proc/kallsyms shows them as 0 \(no CAP_SYSLOG\); vmemmap_base, "
                     rf"vmemmap_remap_pte, vmemmap_restore_pte, _text from {record} \(recorded this boot\)$",
                     log, re.M), log[-4000:]
    # The record: root's and private (in a directory the API socket's group may enter), of this boot,
    # with the addresses root sees in /proc/kallsyms.
    assert sh(g, f"stat -c '%a %U' /run/hvo-observer {record}").split() == ["755", "root", "600", "root"]
    lines = [line.split() for line in sh(g, f"cat {record}").splitlines() if not line.startswith("#")]
    assert lines[0] == ["boot_id", sh(g, "cat /proc/sys/kernel/random/boot_id").strip()]
    recorded = {name: int(addr, 16) for addr, name in lines[1:]}
    names = "|".join(recorded)
    seen = {n: int(a, 16) for a, _, n in
            (line.split() for line in sh(g, f"grep -E ' ({names})$' /proc/kallsyms").splitlines())}
    assert recorded == seen
    # _text: whether this boot randomized the memory layout (the daemon is degraded when it cannot tell)
    assert set(recorded) == {"vmemmap_base", "vmemmap_remap_pte", "vmemmap_restore_pte", "_text"}
    # The same function probes as root (full privileges, addresses visible), remap walkers included.
    mode = json.loads(sh(g, API_STATUS, timeout=600))["mode"]
    script = ("import json\nfrom observer.kernel.facts import gather\n"
              "from observer.probes.functions import FunctionProbeSet\n"
              f"ps = FunctionProbeSet({mode!r}, gather())\n"
              "print(json.dumps(sorted({(p.spec.event.label, p.symbol) for p in ps.plans})))\n")
    as_root = {tuple(p) for p in json.loads(
        sh(g, f"cd /opt/hvo && .venv/bin/python - <<'EOF'\n{script}EOF", timeout=600))}
    doc = json.loads(sh(g, API_STATUS, timeout=600))
    mine = {(p["event"], p["probe"]) for p in doc["probes"] if p["attached"] and ":" not in p["probe"]}
    print(f"\nfunction probes under the unit ({mode}): {sorted(mine)}")
    assert {("remap_free", "vmemmap_remap_range"), ("remap_alloc", "vmemmap_remap_range")} <= as_root
    assert mine == as_root


def test_reload_rereads_the_config(guest: Guest) -> None:
    g = guest
    active(g)
    before = show(g, "MainPID", "NRestarts")
    text = CONFIG.read_text()
    assert text.count(SETTLE) == 1, f"{CONFIG} changed: update the test"
    conf = "/etc/hvo-observer/hvo-observer.toml"
    try:
        changed = text.replace(SETTLE, "settle_seconds = 2.5\n")
        sh(g, f"cat > {conf} <<'EOF'\n{changed}EOF\nsystemctl reload {UNIT}")
        wait_until(g, "the reloaded settle window served",
                   f"{GET}/metrics | grep -qx 'hvo_reconcile_settle_window_seconds 2.5'")
        assert show(g, "MainPID", "NRestarts") == before, "reload restarted the daemon"
        assert "reload: applied settle_seconds=2.5" in journal(g)

        # A broken file: one log line, the running configuration stays.
        sh(g, f"echo 'settle_seconds = \"soon\"' > {conf}; systemctl reload {UNIT}")
        failed = "reload failed, keeping the running configuration"
        wait_until(g, "the failed reload logged", f"journalctl -u {UNIT} -o cat | grep -q '{failed}'")
        assert show(g, "MainPID", "NRestarts", "ActiveState") == {**before, "ActiveState": "active"}
        assert "hvo_reconcile_settle_window_seconds 2.5" in metrics(g)
    finally:
        sh(g, f"cat > {conf} <<'EOF'\n{text}EOF\nsystemctl reload {UNIT} || true")


def test_watchdog_restarts_a_hung_daemon(guest: Guest) -> None:
    g = guest
    active(g)
    before = show(g, "MainPID", "NRestarts")
    pid, restarts = int(before["MainPID"]), int(before["NRestarts"])
    held = prog_ids_of(g, pid)
    assert held
    sh(g, f"kill -STOP {pid}")
    # WatchdogSec=30s: systemd aborts the silent daemon and Restart=on-failure starts a new one.
    wait_until(g, "a restart after the watchdog timeout",
               f"[ $(systemctl show -P NRestarts {UNIT}) -gt {restarts} ]")
    wait_until(g, "the restarted daemon active",
               f"[ $(systemctl show -P ActiveState {UNIT}) = active ]")
    after = show(g, "MainPID", "NRestarts")
    assert int(after["NRestarts"]) == restarts + 1 and int(after["MainPID"]) != pid, after
    log = journal(g)
    assert "Watchdog timeout" in log, log[-4000:]
    assert sh(g, f"{GET}/healthz").strip() == "ok"
    wait_freed(g, held)  # the hung daemon's programs did not outlive it


def test_stop_leaves_no_bpf_programs(guest: Guest) -> None:
    g = guest
    active(g)
    held = prog_ids_of(g, main_pid(g))
    assert held
    sh(g, f"systemctl stop {UNIT}", timeout=120)
    assert show(g, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    wait_freed(g, held)
    left = {i: t for i, t in programs(g).items() if t in TRACING_TYPES}
    assert left == {}, left
    assert sh(g, "cat /sys/kernel/tracing/kprobe_events").strip() == ""  # no legacy kprobe left either


def test_security_exposure_of_the_loaded_unit(guest: Guest) -> None:
    out = sh(guest, f"systemd-analyze security --no-pager {UNIT}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    print(f"\nsystemd-analyze security (guest, loaded unit): {m[1]}")
    assert float(m[1]) <= MAX_EXPOSURE
    assert "✗ CapabilityBoundingSet=~CAP_SYS_ADMIN" not in out
