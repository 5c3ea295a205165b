"""The QEMU harness (tests/vm): stock Debian kernels boot under TCG and run commands over the host root.

Per kernel: uname, the HVO functions of its generation in kallsyms, BTF, a 16-page pool grow with
HVO on. Then bcc compiling a kprobe against the guest kernel's headers, systemd reaching multi-user,
an overlay root, and the failure paths (panicking boot retried and reported, timeout, interrupt)
leaving no QEMU behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.vm import KERNELS, Guest, GuestBootError, GuestTimeout, run_in_guest
from tests.vm import guest as guest_module

pytestmark = pytest.mark.vm

RELEASE_PREFIX = {"6.1": "6.1.", "6.12": "6.12.", "sid": "7."}
# Per-page HVO entry points of each generation (one call per huge page; kernel-hvo.md).
HVO_FUNCTIONS = {
    "6.1": ("hugetlb_vmemmap_optimize", "hugetlb_vmemmap_restore"),
    "6.12": ("__hugetlb_vmemmap_optimize_folio", "__hugetlb_vmemmap_restore_folio"),
    "sid": ("__hugetlb_vmemmap_optimize_folio", "__hugetlb_vmemmap_restore_folio"),
}
PAGES = 16
FREED_PER_2M_PAGE = 7  # vmemmap pages: 8 per 2 MiB page, 1 kept as the new head


@pytest.fixture(scope="module", params=KERNELS)
def booted(request: pytest.FixtureRequest, shared_guest: Callable[..., Guest]) -> Guest:
    """One guest per kernel for the read-only checks; pytest runs them grouped by kernel."""
    return shared_guest(request.param)


def qemu_processes(workdir: Path) -> list[int]:
    """QEMU processes still running on ``workdir`` (its console log path is on their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and str(workdir).encode() in b" ".join(argv):
                pids.append(int(entry.name))
    return pids


def vmstat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_uname_is_the_guest_kernel(booted: Guest) -> None:
    r = booted.run("uname -r")
    assert r.exit_code == 0, r.describe()
    assert r.stdout.strip() == booted.kernel.release, r.describe()
    assert booted.kernel.release.startswith(RELEASE_PREFIX[booted.kernel.name])


def test_kallsyms_has_the_hvo_functions_of_its_generation(booted: Guest) -> None:
    names = "|".join(HVO_FUNCTIONS[booted.kernel.name])
    r = booted.run(f"grep -E ' [tT] ({names})$' /proc/kallsyms")
    assert r.exit_code == 0, r.describe()
    found = {line.split()[2] for line in r.stdout.splitlines()}
    assert found == set(HVO_FUNCTIONS[booted.kernel.name]), r.describe()


def test_btf_is_present(booted: Guest) -> None:
    r = booted.run("test -s /sys/kernel/btf/vmlinux")
    assert r.exit_code == 0, r.describe()


def test_guest_sees_host_root_read_only_and_writes_to_the_share(booted: Guest) -> None:
    r = booted.run(
        f"test -x {sys.executable} || exit 10\n"
        "touch /etc/hvo-must-fail 2>/dev/null && exit 11\n"
        "echo scratch > /tmp/x && cat /tmp/x\n"
        'echo "$BCC_KERNEL_SOURCE" > from-guest\n'
    )
    assert r.exit_code == 0, r.describe()
    assert (r.outdir / "from-guest").read_text().strip() == str(booted.kernel.headers)
    assert Path(booted.kernel.headers, "include/generated/autoconf.h").is_file()


@pytest.mark.parametrize("kernel", KERNELS)
def test_hvo_grows_the_pool_with_optimized_pages(new_guest: Callable[..., Guest], kernel: str) -> None:
    # hugetlb_free_vmemmap=on shows the kernel command line reaches the guest (Debian's default is off).
    g = new_guest(kernel, cmdline="hugetlb_free_vmemmap=on")
    r = g.run(
        "set -e\n"
        "cat /proc/sys/vm/hugetlb_optimize_vmemmap\n"
        "echo 1 > /proc/sys/vm/hugetlb_optimize_vmemmap\n"
        "cat /proc/vmstat > before\n"
        f"echo {PAGES} > /proc/sys/vm/nr_hugepages\n"
        "cat /proc/vmstat > after\n"
        "cat /proc/sys/vm/nr_hugepages\n"
    )
    assert r.exit_code == 0, r.describe()
    assert r.stdout.split() == ["1", str(PAGES)], r.describe()
    assert not r.kernel_errors, r.describe()
    before, after = vmstat(r.outdir / "before"), vmstat(r.outdir / "after")
    if "nr_memmap_boot_pages" in before:  # 6.11+: the vmemmap size itself
        freed = (before["nr_memmap_boot_pages"] - after["nr_memmap_boot_pages"]) - (
            after["nr_memmap_pages"] - before["nr_memmap_pages"]
        )
        assert freed == PAGES * FREED_PER_2M_PAGE, f"{before=} {after=}"
    else:
        assert g.kernel.name == "6.1", f"no nr_memmap counters in {g.kernel.release}"


BCC_COUNT = """\
import ctypes, os
from bcc import BPF

b = BPF(text=r'''
BPF_ARRAY(calls, u64, 1);
int on_call(struct pt_regs *ctx) {
    int k = 0;
    u64 *v = calls.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
''')
b.attach_kprobe(event=os.environ["FN"], fn_name="on_call")
with open("/proc/sys/vm/hugetlb_optimize_vmemmap", "w") as f:
    f.write("1")
with open("/proc/sys/vm/nr_hugepages", "w") as f:
    f.write(os.environ["PAGES"])
print(b["calls"][ctypes.c_int(0)].value)
"""


def test_bcc_kprobe_counts_optimizations_in_a_guest(new_guest: Callable[..., Guest]) -> None:
    probe = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"{sys.executable} cannot import bcc (python3-bpfcc and a --system-site-packages venv)")
    g = new_guest("6.1")
    r = g.run(
        f"#!{sys.executable}\n{BCC_COUNT}",
        env={"FN": HVO_FUNCTIONS["6.1"][0], "PAGES": str(PAGES)},
        timeout=600,
    )
    assert r.exit_code == 0, r.describe()
    assert r.stdout.split() == [str(PAGES)], r.describe()
    print(f"\nbcc kprobe in a 6.1 guest: compile, load and 16-page grow in {r.duration_s:.1f} s")


ONESHOT = """\
[Unit]
Description=hvo-observer harness test oneshot

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'uname -r > /run/hvo/oneshot.out'
"""


def test_systemd_reaches_multi_user_and_runs_a_oneshot_unit(new_guest: Callable[..., Guest]) -> None:
    g = new_guest(
        "6.1",
        systemd=True,
        files={"/etc/systemd/system/hvo-harness-test.service": ONESHOT},
        enable=["hvo-harness-test.service"],
    )
    print(f"\nsystemd 6.1 guest: commands accepted after {g.boot_s:.1f} s")
    r = g.run(
        "cat /proc/1/comm\n"
        "systemctl is-active multi-user.target\n"
        "systemctl show -P Result hvo-harness-test.service\n"
    )
    assert r.exit_code == 0, r.describe()
    assert r.stdout.split() == ["systemd", "active", "success"], r.describe()
    assert (g.share / "oneshot.out").read_text().strip() == g.kernel.release


def test_a_panicking_boot_is_retried_and_reported_with_the_console(
    guest_kernel: Callable[[str], Any], tmp_path: Path
) -> None:
    # No init in the initramfs: the kernel looks for a root device, finds none and panics.
    g = Guest(guest_kernel("6.1"), workdir=tmp_path, cmdline="rdinit=/nonexistent", retries=1)
    with pytest.raises(GuestBootError) as failure:
        g.start()
    message = str(failure.value)
    assert "did not boot in 2 attempt(s)" in message
    assert "Kernel panic" in message and "guest console, last lines" in message
    assert g.attempts == 2
    assert sorted(p.name for p in tmp_path.glob("console.attempt*.log")) == [
        "console.attempt1.log",
        "console.attempt2.log",
    ]
    assert qemu_processes(tmp_path) == []


def test_a_command_timeout_stops_the_guest(new_guest: Callable[..., Guest]) -> None:
    g = new_guest("6.1")
    with pytest.raises(GuestTimeout) as failure:
        g.run("echo started; sleep 600", timeout=5)
    assert "still running after 5 s" in str(failure.value)
    assert "started" in str(failure.value)
    assert not g.alive
    assert qemu_processes(g.workdir) == []


def test_an_interrupt_during_boot_stops_qemu(
    guest_kernel: Callable[[str], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = Guest(guest_kernel("6.1"), workdir=tmp_path)
    seen: list[int] = []

    def interrupt(self: Any) -> list[str]:
        seen.extend(qemu_processes(tmp_path))  # QEMU is up when the boot loop first reads the console
        raise KeyboardInterrupt

    monkeypatch.setattr(guest_module._Console, "new_lines", interrupt)
    with pytest.raises(KeyboardInterrupt):
        g.start()
    assert seen, "QEMU was not running when the interrupt came"
    assert qemu_processes(tmp_path) == []
    assert all(not os.path.exists(f"/proc/{pid}") for pid in seen)


def test_overlay_root_is_writable_and_modprobe_finds_the_guest_modules(tmp_path: Path) -> None:
    r = run_in_guest(
        "sid",
        "set -e\n"
        "cat /etc/hvo-harness-note\n"
        "echo written > /usr/local/hvo-harness-new && cat /usr/local/hvo-harness-new\n"
        "modprobe dummy && grep -o '^dummy ' /proc/modules\n",
        files={"/etc/hvo-harness-note": "from the host\n"},
        workdir=tmp_path,
    )
    assert r.exit_code == 0, r.describe()
    assert r.stdout.split("\n")[:3] == ["from the host", "written", "dummy "], r.describe()
    assert not Path("/usr/local/hvo-harness-new").exists()  # the upper layer is the guest's tmpfs
