"""Reading whole BPF arrays from user space: one BPF_MAP_LOOKUP_BATCH (kernel 5.6+) instead of one
lookup syscall per slot, which costs seconds for a map of a million slots."""

from __future__ import annotations

import ctypes
import errno
from typing import Any


def _lookup_batch(table: Any, slot_bytes: int) -> memoryview | None:
    """Every value of an array map, ``slot_bytes`` per key, or None when the kernel has no batch lookup."""
    from bcc.libbcc import lib

    n = table.max_entries
    keys = (ctypes.c_uint32 * n)()
    values = (ctypes.c_uint8 * (n * slot_bytes))()
    count = ctypes.c_uint32(n)
    out_batch = ctypes.c_uint32(0)
    ctypes.set_errno(0)
    ret = lib.bpf_lookup_batch(table.map_fd, None, ctypes.byref(out_batch), keys, values, ctypes.byref(count))
    if (ret == 0 or ctypes.get_errno() == errno.ENOENT) and count.value == n:  # ENOENT: reached the end
        return memoryview(values).cast("B")
    return None


def u64_values(table: Any) -> list[int]:
    """A plain array of u64 (the aggregates: shared by all CPUs, so one value per slot)."""
    raw = _lookup_batch(table, 8)
    if raw is None:
        return [table[table.Key(i)].value for i in range(table.max_entries)]
    return raw.cast("Q").tolist()


def u8_values(table: Any) -> bytes:
    """A plain array of u8, one byte per slot."""
    raw = _lookup_batch(table, 1)
    if raw is None:
        return bytes(table[table.Key(i)].value for i in range(table.max_entries))
    return raw.tobytes()
