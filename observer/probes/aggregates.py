"""The in-kernel aggregates (``counts`` and ``hist`` of bpf/hvo_common.h): their layout and their
decoding into totals.

The maps are indexed by what exists, not by what an index could hold: the kernel's hstates (plus one
slot for a page of an order no hstate has), the event types and results, and for the latency
histogram only the operations that have a duration. They are shared arrays with atomic adds, not
per-CPU arrays, so neither their kernel memory nor a read grows with the possible CPUs
(bpf/hvo_common.h says why). Keep in sync with bpf/hvo_event.h (tests/test_aggregates.py compiles
the programs and compares).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from observer.probes.events import HIST_BUCKETS, NR_EVENTS, NR_RESULTS, TIMED_EVENTS, EventType, Result

MAX_HSTATES = 8  # HVO_MAX_HSTATES: hvo_hstate_idx() compares at most this many orders
OTHER_ORDER = -1  # the order reported for the slot of pages whose order is no hstate's

CountKey = tuple[EventType, int, Result]
HistKey = tuple[EventType, int]


@dataclass(frozen=True)
class Aggregates:
    """Totals since the session started: the kernel's arrays + events user space made or accepted."""

    counts: dict[CountKey, int] = field(default_factory=dict)
    hist: dict[HistKey, list[int]] = field(default_factory=dict)  # HIST_BUCKETS log2(ns) buckets
    lost: int = 0


@dataclass(frozen=True)
class AggregateLayout:
    """Slots of the aggregate maps for one kernel's hstate orders (ascending, as the -D defines)."""

    orders: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.orders) > MAX_HSTATES:
            raise ValueError(f"{len(self.orders)} hstates: the aggregates tell at most {MAX_HSTATES} apart")

    @property
    def hstate_slots(self) -> int:
        return len(self.orders) + 1

    @property
    def count_slots(self) -> int:
        return self.hstate_slots * NR_EVENTS * NR_RESULTS

    @property
    def hist_slots(self) -> int:
        return self.hstate_slots * len(TIMED_EVENTS) * HIST_BUCKETS

    def cflags(self) -> list[str]:
        return [f"-DHVO_NR_HSTATES={len(self.orders)}",
                *(f"-DHVO_HSTATE_ORDER_{i}={o}" for i, o in enumerate(self.orders))]

    def order_of(self, hstate: int) -> int:
        return self.orders[hstate] if hstate < len(self.orders) else OTHER_ORDER

    def count_index(self, event: EventType, order: int, result: Result) -> int:
        """HVO_COUNT_IDX of hvo_event.h."""
        return (self._hstate(order) * NR_EVENTS + int(event)) * NR_RESULTS + int(result)

    def hist_index(self, event: EventType, order: int, bucket: int) -> int:
        """HVO_HIST_IDX of hvo_event.h."""
        return (self._hstate(order) * len(TIMED_EVENTS) + TIMED_EVENTS.index(event)) * HIST_BUCKETS + bucket

    def _hstate(self, order: int) -> int:
        return self.orders.index(order) if order in self.orders else len(self.orders)

    def decode_counts(self, summed: list[int]) -> dict[CountKey, int]:
        """The `counts` map, summed over CPUs, as {(event, order, result): n} (non-zero slots only)."""
        out: dict[CountKey, int] = {}
        for idx, n in enumerate(summed):
            if n:
                hs, rest = divmod(idx, NR_EVENTS * NR_RESULTS)
                ev, res = divmod(rest, NR_RESULTS)
                if 0 < ev < NR_EVENTS:
                    out[(EventType(ev), self.order_of(hs), Result(res))] = n
        return out

    def decode_hist(self, summed: list[int]) -> dict[HistKey, list[int]]:
        """The `hist` map, summed over CPUs, as {(event, order): buckets} (series with observations)."""
        out: dict[HistKey, list[int]] = {}
        for idx in (i for i, n in enumerate(summed) if n):
            hs, rest = divmod(idx, len(TIMED_EVENTS) * HIST_BUCKETS)
            op, bucket = divmod(rest, HIST_BUCKETS)
            key = (TIMED_EVENTS[op], self.order_of(hs))
            out.setdefault(key, [0] * HIST_BUCKETS)[bucket] += summed[idx]
        return out
