"""Decoding of ``struct hvo_event`` (bpf/hvo_event.h); the aggregates' slots are in aggregates.py."""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass


class EventType(enum.IntEnum):
    POOL_ALLOC = 1
    POOL_FREE = 2
    OPTIMIZE = 3
    RESTORE = 4
    DEMOTE = 5
    REMAP_FREE = 6
    REMAP_ALLOC = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class Result(enum.IntEnum):
    OK = 0
    ERROR = 1
    SKIPPED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


FLAG_INFERRED = 1
FLAG_UNCOUNTED = 2  # a candidate record the BPF program did not add to the in-kernel counts
NO_NODE = 0xFFFFFFFF
NR_RESULTS = 3
NR_EVENTS = 8
HIST_BUCKETS = 40  # log2(ns); the last bucket also holds longer durations
# Operations with a duration, in the order of the latency histogram's slots (HVO_TIMED_OP)
TIMED_EVENTS = (EventType.OPTIMIZE, EventType.RESTORE, EventType.DEMOTE, EventType.REMAP_FREE,
                EventType.REMAP_ALLOC)

# struct hvo_event: 4 x u64, u32 tgid, u32 tid, s32 err, u32 node, 4 x u8, char comm[16]
_LAYOUT = struct.Struct("<QQQQIIiIBBBB16s")
EVENT_SIZE = _LAYOUT.size  # 72


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, which made
# decoding 5x slower. Treat events as immutable (use dataclasses.replace).
@dataclass(slots=True)
class Event:
    ts_ns: int
    pfn: int
    cgroup_id: int
    duration_ns: int
    tgid: int
    tid: int
    err: int
    node: int | None
    event: EventType
    result: Result
    order: int
    inferred: bool
    comm: str
    # In the kernel's per-CPU counts already (records of the BPF programs); False for events user
    # space makes or accepts (inferred events, confirmed candidates): the session counts those.
    kernel_counted: bool = False

    def to_json(self, hstate: str | None = None) -> dict[str, object]:
        """The event record of the JSON API and ``events --json``; ``hstate`` is the sysfs name of the
        order's hstate, ``unix_time`` the wall-clock time of the monotonic timestamp."""
        return {
            "ts_ns": self.ts_ns,
            "unix_time": round(time.time() - (time.monotonic_ns() - self.ts_ns) / 1e9, 6),
            "hstate": hstate,
            "event": self.event.label,
            "order": self.order,
            "node": self.node,
            "pfn": self.pfn,
            "tgid": self.tgid,
            "tid": self.tid,
            "comm": self.comm,
            "cgroup_id": self.cgroup_id,
            "duration_ns": self.duration_ns,
            "result": self.result.label,
            "errno": self.err,
            "inferred": self.inferred,
        }


# Plain dict look-ups: calling the enum classes is the slowest part of a decode.
_EVENT_TYPES = {int(t): t for t in EventType}
_RESULTS = {int(r): r for r in Result}
_unpack = _LAYOUT.unpack_from


def decode(data: bytes | memoryview) -> Event:
    """One record; hot path (hundreds of thousands per second), so positional and lean."""
    (ts, pfn, cg, dur, tgid, tid, err, node, ev, res, order, flags, comm) = _unpack(data)
    return Event(ts, pfn, cg, dur, tgid, tid, err, None if node == NO_NODE else node, _EVENT_TYPES[ev],
                 _RESULTS[res], order, bool(flags & FLAG_INFERRED),
                 comm.split(b"\0", 1)[0].decode("utf-8", "replace"), not flags & FLAG_UNCOUNTED)


def encode(e: Event) -> bytes:
    """The inverse of decode: for replay benchmarks and user-space-made (inferred) events."""
    return _LAYOUT.pack(
        e.ts_ns, e.pfn, e.cgroup_id, e.duration_ns, e.tgid, e.tid, e.err,
        NO_NODE if e.node is None else e.node, int(e.event), int(e.result), e.order,
        (FLAG_INFERRED if e.inferred else 0) | (0 if e.kernel_counted else FLAG_UNCOUNTED),
        e.comm.encode()[:15],
    )
