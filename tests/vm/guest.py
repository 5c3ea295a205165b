"""A QEMU (TCG, never KVM) guest running a stock Debian kernel over the host's own root filesystem.

The guest boots the initramfs of initramfs.py, mounts the host root read-only over 9p and a per-guest
writable share (``<workdir>/share``, ``/run/hvo`` in the guest), and runs loop.sh: scripts put into
the share and announced on a second serial port run one after another in the same booted guest.
A boot that shows a kernel error or no ready marker in time is retried (a sid kernel oopses now and
then under TCG).
QEMU processes never outlive their Guest: ``close()`` (also on exceptions and KeyboardInterrupt via
``with``), an atexit hook, and PR_SET_PDEATHSIG should the test process die without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .initramfs import build_initramfs
from .kernels import GuestKernel, prepare_kernel

REPO = Path(__file__).resolve().parents[2]  # the checkout whose code and .venv guests run

QEMU = "qemu-system-x86_64"
LOOP = Path(__file__).with_name("loop.sh")
CONSOLE_TAIL_LINES = 60
BOOT_TIMEOUT_S = 240.0
SYSTEMD_BOOT_TIMEOUT_S = 600.0
RUN_TIMEOUT_S = 300.0
POLL_S = 0.05
# panic=-1: a panic reboots at once, and -no-reboot turns that into a QEMU exit we notice.
BASE_CMDLINE = "console=ttyS0 panic=-1 rdinit=/init"
# Console lines that mean the kernel is broken: during boot they make us retry.
KERNEL_ERROR = re.compile(
    r"Kernel panic - not syncing|\bOops: |\bBUG: |general protection fault|WARNING: CPU: \d+ PID: \d+ at "
)
# init.sh's own failures are deterministic: retrying them only wastes minutes.
INIT_FAILED = "hvo-init: FAILED"
# Host uids and modes as they are (we are root); inode numbers remapped across host filesystems.
VIRTFS = "security_model=none,multidevs=remap"
# Units that only slow a systemd guest down (postgresql alone delays multi-user by ~40 s under
# TCG); masked unless Guest(mask=...) says otherwise. Names the host lacks are harmless.
DEFAULT_MASK = (
    "postgresql.service", "postgresql@15-main.service", "prometheus.service",
    "prometheus-node-exporter.service", "prometheus-node-exporter-apt.service",
    "prometheus-node-exporter-apt.timer", "openipmi.service", "nvmf-autoconnect.service",
    "e2scrub_reap.service", "e2scrub_all.timer", "apt-daily.timer", "apt-daily-upgrade.timer",
    "man-db.timer", "dpkg-db-backup.timer",
    # Login prompts: the serial getty waits ~70 s for its device under TCG; ttyS1 is the command port.
    "getty.target", "getty@tty1.service", "serial-getty@ttyS0.service", "serial-getty@ttyS1.service",
)  # fmt: skip
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestError(RuntimeError):
    """The guest failed (boot, crash, timeout, command failure); the message ends with its console."""

    def __init__(self, message: str, console_tail: str) -> None:
        super().__init__(f"{message}\n--- guest console, last lines ---\n{console_tail}")
        self.console_tail = console_tail


class GuestBootError(GuestError):
    def __init__(self, message: str, console_tail: str, *, retryable: bool = True) -> None:
        super().__init__(message, console_tail)
        self.retryable = retryable  # False for failures that would repeat: our init, QEMU's arguments


class GuestTimeout(GuestError):
    pass


class GuestCommandError(GuestError):
    pass


@dataclass
class GuestResult:
    exit_code: int
    stdout: str
    stderr: str
    console_tail: str
    outdir: Path  # host path of the command's directory in the share ($HVO_OUT in the guest)
    duration_s: float
    kernel_errors: list[str]  # console lines matching KERNEL_ERROR while the command ran

    def describe(self, lines: int = 40) -> str:
        """Everything needed to understand a failure, for assertion messages."""
        return "\n".join(
            [
                f"exit code {self.exit_code} after {self.duration_s:.1f} s (outdir {self.outdir})",
                "--- stdout (last lines) ---",
                _tail(self.stdout, lines),
                "--- stderr (last lines) ---",
                _tail(self.stderr, lines),
                "--- guest console, last lines ---",
                self.console_tail,
            ]
        )

    def check(self) -> GuestResult:
        """This result, or GuestCommandError when the command failed."""
        if self.exit_code != 0:
            raise GuestCommandError(f"guest command failed:\n{self.describe()}", self.console_tail)
        return self

    def output_json(self, name: str) -> Any:
        """The JSON the command wrote to $HVO_OUT/NAME; GuestCommandError (with describe()) when the
        command failed or wrote none."""
        out = self.check().outdir / name
        if not out.is_file():
            raise GuestCommandError(f"guest command wrote no {name}:\n{self.describe()}", self.console_tail)
        return json.loads(out.read_text())

    def daemon_script_output(self) -> tuple[dict[str, Any], str]:
        """What a guest script that runs the daemon left: its $HVO_OUT/out.json and, for assertion
        messages, describe() plus the tail of its last daemon log. AssertionError when it failed."""
        out = self.outdir / "out.json"
        res = json.loads(out.read_text()) if out.is_file() else {}
        logs = sorted(self.outdir.glob("daemon-*.log"))
        log = logs[-1].read_text(errors="replace")[-6000:] if logs else "(none)"
        context = f"{self.describe()}\n--- daemon log (tail) ---\n{log}"
        assert self.exit_code == 0 and res and "error" not in res, f"the guest script failed:\n{context}"
        return res, context


class Guest:
    """One QEMU guest; ``with Guest("6.1") as g: g.run("uname -r")``.

    kernel: a name of kernels.KERNELS or a prepared GuestKernel. cmdline: extra kernel parameters.
    systemd: boot /lib/systemd/systemd on an overlay root (tmpfs upper layer) and accept commands once
    multi-user.target is reached. overlay: the same writable overlay root without systemd. files:
    guest path -> content, put into the upper layer before boot (implies overlay); enable: unit names
    to add to multi-user.target.wants; mask: units masked in the upper layer (DEFAULT_MASK: slow host
    services; pass () to keep them). env: variables for every command. workdir: where the share,
    console log and QEMU log go (default: a temporary directory removed by close()). root_cache: 9p
    cache mode of the read-only host root; "loose" halves Python/bcc start-up times but may show
    host files changed while the guest runs late: pass data through the share, or use "none".
    root: the tree shared as the guest's root (default the host's /; another tree, such as a pristine
    Debian root, gets neither the host's kernel modules nor the checkout).
    memory: the ``-m`` option when more than a size is needed (e.g. "72320M,slots=2,maxmem=80G");
    machine: the ``-machine`` option (e.g. "pc,max-ram-below-4g=2688M"); qemu_args: more QEMU options
    (memory backends, -numa); qmp: a QMP socket for ``qmp()`` (memory hot-add).
    """

    def __init__(
        self,
        kernel: str | GuestKernel = "6.1",
        *,
        mem_mb: int = 2048,
        cpus: int = 2,
        cmdline: str = "",
        systemd: bool = False,
        overlay: bool = False,
        files: Mapping[str, str | bytes] | None = None,
        enable: Iterable[str] = (),
        mask: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        boot_timeout: float | None = None,
        retries: int = 2,
        root_cache: str = "loose",
        root: Path = Path("/"),
        memory: str | None = None,
        machine: str | None = None,
        qemu_args: Iterable[str] = (),
        qmp: bool = False,
    ) -> None:
        self.kernel = kernel if isinstance(kernel, GuestKernel) else prepare_kernel(kernel)
        self.mem_mb, self.cpus, self.cmdline = mem_mb, cpus, cmdline
        self.systemd = systemd
        self.mode = "systemd" if systemd else "overlay" if overlay or files or enable else "plain"
        self.files = dict(files or {})
        self.enable = tuple(enable)
        self.mask = tuple(DEFAULT_MASK if mask is None else mask)
        self.env = dict(env or {})
        self.boot_timeout = boot_timeout or (SYSTEMD_BOOT_TIMEOUT_S if systemd else BOOT_TIMEOUT_S)
        self.retries = retries
        self.root_cache = root_cache
        self.memory, self.machine, self.qemu_args = memory, machine, tuple(qemu_args)
        self.root = Path(root)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hvo-guest-"))
        self.qmp_path = self.workdir / "qmp.sock" if qmp else None
        self.share = self.workdir / "share"
        self.console_path = self.workdir / "console.log"
        self._ctl = self.workdir / "ctl"  # ctl.in: FIFO to the guest's ttyS1; ctl.out: what it writes back
        self._ctl_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: _Console | None = None
        self._n = 0
        self.boot_s: float | None = None  # wall time of the successful boot
        self.attempts = 0

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The QEMU process id while it runs."""
        return self._proc.pid if self.alive and self._proc else None

    def start(self) -> Guest:
        """Boot, retrying a failed boot up to ``retries`` times; GuestBootError when all fail."""
        initramfs = build_initramfs(self.kernel)
        errors = []
        for attempt in range(1, self.retries + 2):
            self.attempts = attempt
            try:
                self._boot(initramfs)
                return self
            except GuestBootError as e:
                self._stop()
                if self.console_path.is_file():
                    shutil.copyfile(self.console_path, self.workdir / f"console.attempt{attempt}.log")
                errors.append(e)
                if not e.retryable:
                    break
            except BaseException:
                self._stop()
                raise
        summary = "; ".join(str(e).split("\n", 1)[0] for e in errors)
        raise GuestBootError(
            f"{self.kernel.name} guest ({self.kernel.release}) did not boot in {len(errors)} attempt(s): "
            f"{summary} (logs in {self.workdir})",
            errors[-1].console_tail,
        )

    def close(self) -> None:
        self._stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _boot(self, initramfs: Path) -> None:
        self._write_share()
        self.console_path.unlink(missing_ok=True)
        for suffix, make in ((".in", os.mkfifo), (".out", Path.touch)):
            path = self._ctl.with_suffix(suffix)
            path.unlink(missing_ok=True)
            make(path)  # type: ignore[operator]
        self._console = _Console(self.console_path)
        began = time.monotonic()
        self._proc = _spawn(self._qemu_argv(initramfs), self.workdir / "qemu.log")
        ready = self.share / "ready"
        while not ready.is_file():
            for line in self._console.new_lines():
                if INIT_FAILED in line:
                    raise GuestBootError(line.strip(), self.console_tail(), retryable=False)
                if KERNEL_ERROR.search(line):
                    raise GuestBootError(f"kernel error during boot: {line.strip()}", self.console_tail())
            if self._proc.poll() is not None:
                # A guest that panics or powers off makes QEMU exit with 0; 1 is QEMU refusing to start.
                raise GuestBootError(
                    f"QEMU exited with code {self._proc.returncode} before the guest was ready"
                    f"{_qemu_log_hint(self.workdir / 'qemu.log')}",
                    self.console_tail(),
                    retryable=self._proc.returncode == 0,
                )
            if time.monotonic() - began > self.boot_timeout:
                raise GuestBootError(f"not ready within {self.boot_timeout:.0f} s", self.console_tail())
            time.sleep(POLL_S)
        self.boot_s = time.monotonic() - began
        release = ready.read_text().strip()
        if release != self.kernel.release:
            raise GuestBootError(f"guest runs {release}, expected {self.kernel.release}", self.console_tail())

    def _stop(self) -> None:
        if self._ctl_fd is not None:
            os.close(self._ctl_fd)
            self._ctl_fd = None
        if self._proc is not None:
            _terminate(self._proc)
            self._proc = None

    # --- commands ---------------------------------------------------------------------------------

    def run(
        self, script: str, *, timeout: float = RUN_TIMEOUT_S, env: Mapping[str, str] | None = None
    ) -> GuestResult:
        """Run ``script`` (sh, or its own #! interpreter) in the guest and wait for it to end.

        A timeout or a guest that dies meanwhile raises GuestError and leaves the guest stopped.
        """
        if not self.alive or self._console is None:
            raise GuestError("the guest is not running", self.console_tail())
        self._n += 1
        d = self.share / "cmd" / str(self._n)
        d.mkdir(parents=True)
        (d / "env").write_text(_exports(env or {}))
        (d / "script").write_text(script)
        (d / "script").chmod(0o755)
        self._console.new_lines()  # errors before this command are not its errors
        kernel_errors: list[str] = []
        began = time.monotonic()
        self._send(f"{self._n}\n")
        rc = d / "rc"
        while not rc.is_file():
            kernel_errors += [ln.strip() for ln in self._console.new_lines() if KERNEL_ERROR.search(ln)]
            if not self.alive:
                self._stop()
                message = f"the guest died while running command {self._n}:\n{_partial(d)}"
                raise GuestError(message, self.console_tail())
            if time.monotonic() - began > timeout:
                self._stop()
                message = f"command {self._n} still running after {timeout:.0f} s:\n{_partial(d)}"
                raise GuestTimeout(message, self.console_tail())
            time.sleep(POLL_S)
        duration = time.monotonic() - began
        kernel_errors += [ln.strip() for ln in self._console.new_lines() if KERNEL_ERROR.search(ln)]
        return GuestResult(
            exit_code=int(rc.read_text().strip()),
            stdout=(d / "stdout").read_text(errors="replace"),
            stderr=(d / "stderr").read_text(errors="replace"),
            console_tail=self.console_tail(),
            outdir=d,
            duration_s=duration,
            kernel_errors=kernel_errors,
        )

    def _send(self, line: str) -> None:
        try:
            if self._ctl_fd is None:
                # QEMU holds the FIFO open read-write, so this open neither blocks nor fails.
                self._ctl_fd = os.open(self._ctl.with_suffix(".in"), os.O_WRONLY | os.O_NONBLOCK)
            os.write(self._ctl_fd, line.encode())
        except OSError as e:
            self._stop()
            message = f"cannot hand command {self._n} to the guest: {e}"
            raise GuestError(message, self.console_tail()) from None

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command (the guest must have been made with qmp=True): its "return" value, or
        GuestCommandError with QEMU's error."""
        if self.qmp_path is None or not self.alive:
            raise GuestError("no QMP socket (Guest(qmp=True)) or the guest is not running",
                             self.console_tail())
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(self.qmp_path))
            f = sock.makefile("rw")

            def reply() -> dict[str, Any]:
                while True:
                    msg = json.loads(f.readline())
                    if "event" not in msg:
                        return msg

            reply()  # the greeting
            msg: dict[str, Any] = {}
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
                f.flush()
                msg = reply()
                if "error" in msg:
                    raise GuestCommandError(f"QMP {cmd}: {msg['error']}", self.console_tail())
            return msg.get("return")

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        try:
            text = self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return _tail(text, lines)

    # --- setup ------------------------------------------------------------------------------------

    def _qemu_argv(self, initramfs: Path) -> list[str]:
        cmdline = [BASE_CMDLINE]
        if self.systemd:
            cmdline.append("systemd.unit=multi-user.target")
        cmdline.append(self.cmdline)
        return [
            QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", str(self.cpus), "-m", self.memory or str(self.mem_mb),
            *(("-machine", self.machine) if self.machine else ()),
            *(("-qmp", f"unix:{_qemu_opt(self.qmp_path)},server=on,wait=off") if self.qmp_path else ()),
            *self.qemu_args,
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(initramfs),
            "-append", " ".join(c for c in cmdline if c),
            "-chardev", f"file,id=con,path={_qemu_opt(self.console_path)}", "-serial", "chardev:con",
            "-monitor", "none",
            "-chardev", f"pipe,id=ctl,path={_qemu_opt(self._ctl)}", "-serial", "chardev:ctl",
            "-virtfs", f"local,path={_qemu_opt(self.root)},mount_tag=host,{VIRTFS},readonly=on",
            "-virtfs", f"local,path={_qemu_opt(self.share)},mount_tag=hvo,{VIRTFS}",
        ]  # fmt: skip

    def _write_share(self) -> None:
        """A fresh share: boot settings, environment, the loop and the upper-layer files."""
        shutil.rmtree(self.share, ignore_errors=True)
        (self.share / "cmd").mkdir(parents=True)
        self._n = 0
        (self.share / "boot.env").write_text(
            f"HVO_MODE={self.mode}\nHVO_ROOT_CACHE={shlex.quote(self.root_cache)}\n"
            # The checkout (code and .venv) must stay visible even when it lives under a directory the
            # guest replaces with an empty tmpfs (a CI clone in /tmp, say).
            f"HVO_KEEP={shlex.quote(str(REPO) if self.root == Path('/') else '')}\n"
        )
        base = {
            "PATH": GUEST_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            "BCC_KERNEL_SOURCE": str(self.kernel.headers),
            "HVO_GUEST_KERNEL": self.kernel.name,
            "HVO_GUEST_RELEASE": self.kernel.release,
        }
        (self.share / "guest.env").write_text(_exports({**base, **self.env}))
        shutil.copyfile(LOOP, self.share / "loop.sh")
        if self.mode != "plain":
            self._write_upper()

    def _write_upper(self) -> None:
        upper = self.share / "upper"
        # modprobe in the guest finds the kernel's modules in the cache (seen through the 9p root).
        if self.root == Path("/"):
            _symlink(upper / "usr/lib/modules" / self.kernel.release, self.kernel.modules)
        units = list(self.enable)
        if self.systemd:
            _write(upper / "etc/systemd/system/hvo-loop.service", LOOP_UNIT)
            units.append("hvo-loop.service")
        for path, content in self.files.items():
            _write(upper / path.lstrip("/"), content)
        for unit in self.mask if self.systemd else ():
            _symlink(upper / "etc/systemd/system" / unit, Path("/dev/null"))
        for unit in units:
            wants = upper / "etc/systemd/system/multi-user.target.wants"
            _symlink(wants / unit, Path("/etc/systemd/system") / unit)


# Runs the command loop once multi-user.target is reached.
LOOP_UNIT = """\
[Unit]
Description=hvo-observer test command loop
After=multi-user.target

[Service]
Type=simple
ExecStart=/bin/sh /run/hvo/loop.sh
"""


def run_in_guest(
    kernel: str | GuestKernel, script: str, *, timeout: float = RUN_TIMEOUT_S, **guest_args: object
) -> GuestResult:
    """Boot a guest, run one script, stop the guest (keyword arguments as for Guest)."""
    with Guest(kernel, **guest_args) as g:  # type: ignore[arg-type]
        return g.run(script, timeout=timeout)


# --- helpers --------------------------------------------------------------------------------------


class _Console:
    """Reads the console log as it grows, line by line."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._partial = path, 0, b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [ln.decode(errors="replace") for ln in lines]


_live: set[subprocess.Popen[bytes]] = set()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL this QEMU when the test process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    if not shutil.which(argv[0]):  # runs: qemu-system-x86_64
        raise GuestError(f"{argv[0]} not found: apt-get install qemu-system-x86", "(not started)")
    with log.open("wb") as out:
        # A session of its own: the terminal's Ctrl-C reaches pytest, which then stops QEMU.
        proc = subprocess.Popen(  # runs: qemu-system-x86_64
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    _live.add(proc)
    return proc


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop QEMU: the guest is disposable, so no shutdown inside it is awaited."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        _live.discard(proc)


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            _terminate(proc)


def _exports(env: Mapping[str, str]) -> str:
    for name in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"bad environment variable name {name!r}")
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    path.chmod(0o755 if data.startswith(b"#!") else 0o644)


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    os.symlink(target, link)


def _qemu_opt(path: Path) -> str:
    return str(path).replace(",", ",,")  # QEMU option values escape commas by doubling them


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _partial(d: Path) -> str:
    parts = []
    for name in ("stdout", "stderr"):
        with contextlib.suppress(OSError):
            parts.append(f"--- {name} so far ---\n{_tail((d / name).read_text(errors='replace'), 20)}")
    return "\n".join(parts)


def _qemu_log_hint(log: Path) -> str:
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace").strip()
        if text:
            return f" (QEMU: {_tail(text, 3)})"
    return ""
