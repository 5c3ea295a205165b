"""Real trials of what the kernel lets us load, without compiling anything.

Whether fentry works depends on BTF, the architecture's trampoline support, lockdown and LSMs; the
only reliable answer is to try: load a two-instruction fentry program (``r0 = 0; exit``) against a
function's BTF id with the raw bpf(2) syscall, attach it, and detach at once; tracepoint mode's raw
tracepoint programs are tried the same way. kprobe mode attaches through perf_event_open(2), which
kernel.perf_event_paranoid and the caller's capabilities may refuse even to root (Debian's patch adds
a level 3): that is tried by opening one such event and closing it at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "s390x": 351}
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "loongarch64": 241, "s390x": 331}
PERF_ATTR_SIZE_VER5 = 112
PERF_FLAG_FD_CLOEXEC = 8
PARANOID = "/proc/sys/kernel/perf_event_paranoid"
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
_RETURN_ZERO = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # mov64 r0, 0; exit

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no bpf syscall number known for {os.uname().machine}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _perf_event_open(ptype: int, config: int, config1: int = 0) -> None:
    """Open one system-wide perf event on CPU 0 (as bcc attaches kprobes and tracepoints), close it."""
    nr = _SYS_PERF_EVENT_OPEN.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no perf_event_open syscall number known for {os.uname().machine}")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQ", attr, 0, ptype, PERF_ATTR_SIZE_VER5, config)
    struct.pack_into("<Q", attr, 56, config1)  # kprobe_func for the kprobe PMU
    fd = _libc.syscall(nr, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(fd)


def _perf_refusal(what: str, e: OSError) -> str:
    reason = f"perf_event_open(2) refuses {what}: {e.strerror}"
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            with open(PARANOID) as f:
                level = f.read().strip()
        except OSError:
            level = "?"
        if level.isdigit() and int(level) >= 3:
            reason += (f" (kernel.perf_event_paranoid={level}: this level, a Debian/Ubuntu patch, asks "
                       "for CAP_SYS_ADMIN on older kernels; fentry and tracepoint modes need no perf event)")
        else:
            reason += f" (kernel.perf_event_paranoid={level}: it needs CAP_PERFMON)"
    return reason


def try_kprobe_event(pmu_type: int, symbol: str = "vfs_read") -> tuple[bool, str]:
    """(True, "") when a kprobe on SYMBOL opens through the kprobe PMU, else (False, reason)."""
    name = ctypes.create_string_buffer(symbol.encode())
    try:
        _perf_event_open(pmu_type, 0, ctypes.addressof(name))
    except OSError as e:
        return False, _perf_refusal(f"a kprobe event on {symbol}", e)
    return True, ""


def _load(prog_type: int, name: bytes, attach_type: int = 0, btf_id: int = 0) -> int:
    insns = ctypes.create_string_buffer(_RETURN_ZERO)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insns), ctypes.addressof(license_))
    struct.pack_into("<16s", attr, 48, name)
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    return _bpf(BPF_PROG_LOAD, attr)


def _raw_tracepoint_open(prog_fd: int, event: str | None) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: attach a raw tracepoint program to EVENT (None: a tracing program
    to the function it was loaded for)."""
    name = ctypes.create_string_buffer(event.encode()) if event else None
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, ctypes.addressof(name) if name else 0, prog_fd)
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, attr)


def try_raw_tracepoint(event: str) -> tuple[bool, str]:
    """(True, "") when a raw tracepoint program loads and attaches to EVENT, else (False, reason)."""
    try:
        prog_fd = _load(BPF_PROG_TYPE_RAW_TRACEPOINT, b"hvo_rawtp_try")
    except OSError as e:
        return False, f"the kernel refuses to load a raw tracepoint BPF program: {e.strerror}"
    try:
        os.close(_raw_tracepoint_open(prog_fd, event))
    except OSError as e:
        return False, f"a raw tracepoint program loads but cannot attach to {event}: {e.strerror}"
    finally:
        os.close(prog_fd)
    return True, ""


def try_fentry(btf_func_id: int) -> tuple[bool, str]:
    """(True, "") when an fentry program loads and attaches to the function, else (False, reason)."""
    try:
        prog_fd = _load(BPF_PROG_TYPE_TRACING, b"hvo_fentry_try", BPF_TRACE_FENTRY, btf_func_id)
    except OSError as e:
        hint = " (lockdown or an LSM forbids it)" if e.errno == errno.EPERM else ""
        return False, f"the kernel refuses to load an fentry program: {e.strerror}{hint}"
    try:
        os.close(_raw_tracepoint_open(prog_fd, None))
    except OSError as e:
        return False, f"an fentry program loads but cannot attach: {e.strerror}"
    finally:
        os.close(prog_fd)
    return True, ""
