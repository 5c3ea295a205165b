"""Real trials of what the kernel lets us load, without compiling anything.

Whether fentry works depends on BTF, the architecture's trampoline support, lockdown and LSMs; the
only reliable answer is to try: load a two-instruction fentry program (``r0 = 0; exit``) against a
function's BTF id with the raw bpf(2) syscall, attach it, and detach at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "s390x": 351}
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACEPOINT = 5
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


def _load(prog_type: int, name: bytes, attach_type: int = 0, btf_id: int = 0) -> int:
    insns = ctypes.create_string_buffer(_RETURN_ZERO)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insns), ctypes.addressof(license_))
    struct.pack_into("<16s", attr, 48, name)
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    return _bpf(BPF_PROG_LOAD, attr)


def try_tracepoint_program() -> tuple[bool, str]:
    """(True, "") when the kernel loads a tracepoint BPF program for us, else (False, reason)."""
    try:
        os.close(_load(BPF_PROG_TYPE_TRACEPOINT, b"hvo_tp_try"))
    except OSError as e:
        return False, f"the kernel refuses to load a tracepoint BPF program: {e.strerror}"
    return True, ""


def try_fentry(btf_func_id: int) -> tuple[bool, str]:
    """(True, "") when an fentry program loads and attaches to the function, else (False, reason)."""
    try:
        prog_fd = _load(BPF_PROG_TYPE_TRACING, b"hvo_fentry_try", BPF_TRACE_FENTRY, btf_func_id)
    except OSError as e:
        hint = " (lockdown or an LSM forbids it)" if e.errno == errno.EPERM else ""
        return False, f"the kernel refuses to load an fentry program: {e.strerror}{hint}"
    try:
        link = ctypes.create_string_buffer(16)
        struct.pack_into("<QI", link, 0, 0, prog_fd)
        try:
            os.close(_bpf(BPF_RAW_TRACEPOINT_OPEN, link))
        except OSError as e:
            return False, f"an fentry program loads but cannot attach: {e.strerror}"
    finally:
        os.close(prog_fd)
    return True, ""
