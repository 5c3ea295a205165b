"""The recent events, numbered, for the JSON API (``/api/v1/events``) and the live stream.

A bounded ring: memory does not grow with the event rate or with the number of readers. Readers
keep their own position (the sequence number) and learn how many records they missed when they
fall behind the ring. The ring keeps the decoded events; their JSON records are built when read:
most events are never read, and building one cost as much as the rest of the daemon's work on it.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass

from observer.probes.events import Event


@dataclass(frozen=True)
class Batch:
    records: list[dict[str, object]]
    next_seq: int  # pass as ``since`` next time
    missed: int  # records that left the ring before this reader got them


class EventLog:
    def __init__(self, maxlen: int = 4096) -> None:
        self._cond = threading.Condition()
        self._ring: deque[tuple[int, Event, str | None]] = deque(maxlen=maxlen)  # (seq, event, hstate)
        self._last = 0  # sequence number of the newest record (first record: 1)

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._last

    def resize(self, maxlen: int) -> None:
        with self._cond:
            if maxlen != self._ring.maxlen:
                self._ring = deque(self._ring, maxlen=maxlen)

    def append(self, event: Event, hstate: str | None) -> int:
        """Add an event of hstate ``hstate`` (sysfs name); returns its sequence number."""
        with self._cond:
            self._last += 1
            self._ring.append((self._last, event, hstate))
            self._cond.notify_all()
            return self._last

    def since(self, seq: int, limit: int) -> Batch:
        """Records with a sequence number above ``seq``, oldest first, at most ``limit``."""
        seq = max(seq, 0)
        with self._cond:
            if seq > self._last:  # a position from an earlier daemon: start over from now
                return Batch([], self._last, 0)
            if not self._ring or seq == self._last:
                return Batch([], seq, 0)
            first = self._ring[0][0]
            start = max(seq + 1, first)
            offset = start - first
            picked = list(itertools.islice(self._ring, offset, offset + max(limit, 0)))
        # built outside the lock: the daemon's event path appends under it
        records = [{**ev.to_json(hstate), "seq": n} for n, ev, hstate in picked]
        return Batch(records, start + len(picked) - 1, start - (seq + 1))

    def wait(self, seq: int, timeout: float) -> bool:
        """Block until a record newer than ``seq`` exists or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: self._last > seq, timeout)
