"""Bad input to ``hvo-observer run``: flags, config files, and /proc or /sys files it cannot read or
parse. Every case is one line on stderr, ``hvo-observer: <what> ...`` naming the culprit, a non-zero
exit and no traceback, whatever the daemon logged before.

Kernel files are made unreadable or malformed only for the daemon: it runs in a private mount
namespace (unshare -m) where a test file is bind-mounted over the real one, with the unit's
privileges (no CAP_DAC_OVERRIDE, so a mode-000 file is unreadable for it as for the service).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_proc import REPO, UNIT_PRIVILEGES, Daemon, skip_unless_possible


def run(*args: str, wrapper: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrapper, sys.executable, "-m", "observer", "run", *args],  # runs: setpriv unshare
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(r: subprocess.CompletedProcess[str], *, logged: bool = False) -> str:
    """The error line; ``logged``: the daemon may have logged records (one line each) before it."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, out)
    assert "Traceback" not in out, out
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("hvo-observer: "), out
    if not logged:
        assert len(lines) == 1, out
    return lines[-1]


@pytest.mark.parametrize(("flags", "message"), [
    (["--listen", "localhost"], "--listen: listen = 'localhost' is invalid: expected HOST:PORT"),
    (["--listen", "127.0.0.1:70000"], "port '70000' is not a number from 0 to 65535"),
    (["--listen", "[::1:9817"], "unbalanced brackets around the IPv6 address"),
    (["--mode", "ebpf"], "--mode: mode = 'ebpf' is invalid: expected one of auto, fentry, kprobe"),
    (["--ring-buffer-bytes", "1000"], "--ring-buffer-bytes: ring_buffer_bytes = 1000 is invalid"),
    (["--ring-buffer-bytes", "12288"], "a power-of-two multiple of the page size"),
    (["--ring-buffer-bytes", "lots"], "argument --ring-buffer-bytes: invalid int value: 'lots'"),
    (["--settle-seconds", "0"], "--settle-seconds: settle_seconds = 0.0 is invalid"),
    (["--settle-seconds", "nan"], "--settle-seconds: settle_seconds = nan is invalid"),
    (["--recent-events", "10"], "recent_events = 10 is invalid: expected an integer from 16 to 1000000"),
    (["--max-clients", "0"], "max_clients = 0 is invalid: expected an integer from 1 to 1024"),
    (["--log-level", "loud"], "log_level = 'loud' is invalid: expected one of debug, info, warning, error"),
])
def test_bad_flags(flags: list[str], message: str) -> None:
    assert message in one_line_error(run(*flags))


def test_an_unknown_flag_names_the_command_to_ask_for_help() -> None:
    msg = one_line_error(run("--bogus"))
    assert msg == "hvo-observer: unrecognized arguments: --bogus (see 'hvo-observer run --help')"


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("dir", "is a directory"),
    (b'mode = "tracepoint"\nlisten = \n', "invalid TOML: Invalid value (at line 2, column 10)"),
    (b'lissen = "127.0.0.1:1"\n', "unknown key 'lissen' = '127.0.0.1:1'; known keys: listen, mode"),
    (b"settle-seconds = 2\n", "unknown key 'settle-seconds' = 2 (did you mean 'settle_seconds'?)"),
    (b'max_clients = "many"\n', "max_clients = 'many' is invalid: expected an integer"),
    (b"ring_buffer_bytes = 4096.0\n", "ring_buffer_bytes = 4096.0 is invalid: expected an integer"),
    (b"listen = [1, 2]\n", "listen = [1, 2] is invalid"),
    (b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe", "cannot read: 'utf-8' codec can't decode"),
])
def test_bad_config_files(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    path = tmp_path / "hvo-observer.toml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    msg = one_line_error(run("--config", str(path)))
    assert msg.startswith(f"hvo-observer: config file {path}: {message}"), msg


def test_an_unreadable_config_file(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the daemon without CAP_DAC_OVERRIDE")
    path = tmp_path / "hvo-observer.toml"
    path.write_text('mode = "tracepoint"\n')
    path.chmod(0)
    msg = one_line_error(run("--config", str(path), wrapper=UNIT_PRIVILEGES))
    assert msg == f"hvo-observer: config file {path}: permission denied"


@pytest.mark.live
def test_a_busy_port(tmp_path: Path) -> None:
    skip_unless_possible()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = one_line_error(run("--mode", "tracepoint", "--listen", f"127.0.0.1:{port}"), logged=True)
    assert msg == f"hvo-observer: cannot listen on 127.0.0.1:{port}: Address already in use"


# --- kernel files --------------------------------------------------------------------------------

def mount_over(target: str, source: Path) -> tuple[str, ...]:
    """A wrapper running the rest of the command line in a private mount namespace with ``source``
    bind-mounted over ``target``."""
    return ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{source}" "{target}" && exec "$@"', "sh")


def namespaces_usable() -> None:
    skip_unless_possible()
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is missing")


HSTATE = "/sys/kernel/mm/hugepages/hugepages-2048kB"


@pytest.mark.live
@pytest.mark.parametrize(("target", "content", "message"), [
    ("/proc/vmstat", "banana\n", "malformed /proc/vmstat line 1: 'banana'"),
    ("/proc/vmstat", None, "cannot read /proc/vmstat: permission denied"),
    (f"{HSTATE}/nr_hugepages", "banana\n",
     f"malformed {HSTATE}/nr_hugepages: expected an integer, got 'banana'"),
    (f"{HSTATE}/free_hugepages", None, f"cannot read {HSTATE}/free_hugepages: permission denied"),
    ("/proc/sys/kernel/osrelease", "banana\n", "kernel release 'banana' is not of the form X.Y[.Z]"),
    ("/proc/sys/kernel/osrelease", None, "cannot read /proc/sys/kernel/osrelease: permission denied"),
    ("/sys/devices/system/memory/block_size_bytes", "banana\n",
     "malformed /sys/devices/system/memory/block_size_bytes: expected hex, got 'banana'"),
    ("/proc/kpageflags", None, "cannot read /proc/kpageflags: permission denied"),
    ("/sys/kernel/btf/vmlinux", "banana\n", "malformed /sys/kernel/btf/vmlinux: too short for a BTF header"),
    ("/sys/kernel/btf/vmlinux", None, "cannot read /sys/kernel/btf/vmlinux: "),
    ("/proc/sys/vm/hugetlb_optimize_vmemmap", "banana\n",
     "malformed /proc/sys/vm/hugetlb_optimize_vmemmap: expected an integer, got 'banana'"),
    ("/sys/kernel/tracing/events/kmem/mm_page_alloc/format", "banana\n",
     "tracepoint mode: /sys/kernel/tracing/events/kmem/mm_page_alloc/format does not print __GFP_COMP"),
    ("/sys/kernel/tracing/events/kmem/mm_page_alloc/format", None,
     "cannot read /sys/kernel/tracing/events/kmem/mm_page_alloc/format: permission denied"),
])
def test_unreadable_or_malformed_kernel_files_at_start(tmp_path: Path, target: str, content: str | None,
                                                        message: str) -> None:
    namespaces_usable()
    from observer.kernel import tracefs

    tracefs.ensure_tracefs()
    source = tmp_path / "replacement"
    source.write_text(content or "")
    if content is None:
        source.chmod(0)
    r = run("--mode", "tracepoint", "--listen", "127.0.0.1:0",
            wrapper=(*mount_over(target, source), *UNIT_PRIVILEGES))
    assert one_line_error(r, logged=True).startswith(f"hvo-observer: {message}")


@pytest.mark.live
@pytest.mark.parametrize("target", ["/proc/vmstat", f"{HSTATE}/nr_hugepages"])
def test_a_kernel_file_that_becomes_unreadable_while_running(tmp_path: Path, target: str) -> None:
    """Either the daemon keeps serving /metrics, or it exits with one line naming the file; never a
    traceback, never a silent death."""
    namespaces_usable()
    source = tmp_path / "replacement"
    source.write_text("")
    source.chmod(0)
    d = Daemon(tmp_path, wrapper=("unshare", "-m", "--propagation", "private"))
    try:
        d.wait_ready()
        subprocess.run(["nsenter", "-t", str(d.pid), "-m", "-r", "mount", "--bind", str(source), target],
                       check=True)
        deadline = time.monotonic() + 10  # the main loop reads the pools and /proc/vmstat 5 times a second
        while time.monotonic() < deadline and d.proc.poll() is None:
            time.sleep(0.2)
        if d.proc.poll() is None:
            assert d.get("/metrics")[0] == 200, "still running, but /metrics is not served"
            status, reason = d.get("/healthz")
            print(f"kept running: /healthz {status} {reason.strip()}")
        else:
            out = d.full_output()
            assert d.proc.returncode != 0 and "Traceback" not in out, out
            last = out.strip().splitlines()[-1]
            assert last.startswith(f"hvo-observer: cannot read {target}: permission denied"), out
            print(f"exited with {d.proc.returncode}: {last}")
    finally:
        if d.proc.poll() is None:
            d.kill()
    assert "Traceback" not in d.full_output()


@pytest.mark.live
@pytest.mark.parametrize(("mode", "reason"), [
    ("kprobe", "kprobe mode is not available: the kernel is built without kprobes"),
    ("fentry", "fentry mode is not available: the kernel refuses to load an fentry program"),
])
def test_a_mode_this_kernel_refuses_fails_at_once_with_the_kernels_reason(mode: str, reason: str) -> None:
    """This machine's kernel has neither kprobes nor a usable fentry: asking for them is refused
    before any compile, with the trial's reason (the same one `doctor` shows)."""
    skip_unless_possible()
    assert reason in one_line_error(run("--mode", mode, "--listen", "127.0.0.1:0"), logged=True)
