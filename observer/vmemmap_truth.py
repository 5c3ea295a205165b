"""The vmemmap with nothing optimized ("full vmemmap"), against which the kernel's saving is measured.

``nr_memmap_pages + nr_memmap_boot_pages`` (6.11+) is the live vmemmap; HVO's saving is the full
vmemmap minus that. The full vmemmap is predicted from the memory layout (present sections,
observer/kernel/memory_blocks.py) and *calibrated*: whenever every hugetlb pool has been empty and
the counters unchanged for a settle window, the kernel holds no optimized page, so the counters are
the whole vmemmap. The calibration is what counts:

- layout unchanged since the calibration: full = the calibrated value;
- layout changed and the calibration agreed with the prediction: full = the new prediction;
- layout changed after a calibration that disagreed (memory the prediction cannot see, e.g. device
  memory or a kernel accounting it differently): unknown (None) until the pools are empty again,
  rather than a figure known to be wrong. The disagreement is logged once per layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from observer.errors import ObserverError
from observer.geometry import baseline_memmap_pages
from observer.kernel.memory_blocks import LayoutFollower, MemoryLayout
from observer.kernel.vmstat import MemmapCounters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    full_pages: int  # the counters with nothing optimized
    predicted_pages: int | None  # the layout's prediction at that moment
    layout_key: tuple[object, ...]
    taken_ns: int

    @property
    def agrees(self) -> bool:
        return self.predicted_pages == self.full_pages


class FullVmemmap:
    """Keeps the calibration; ``full_pages()`` answers for each snapshot."""

    def __init__(self, struct_page_size: int = 64, page_size: int = 4096,
                 settle_ns: int = 1_000_000_000) -> None:
        self.struct_page_size = struct_page_size
        self.page_size = page_size
        self.settle_ns = settle_ns
        self.calibration: Calibration | None = None
        self._empty: tuple[int, tuple[object, ...]] | None = None  # (counters, layout) while pools empty
        self._empty_since = 0
        self._logged: set[tuple[object, ...]] = set()

    def predicted(self, layout: MemoryLayout) -> int | None:
        """The layout's prediction; None when it cannot tell (no layout, or device memory, whose
        memmap the kernel counts from 6.11 in ways that depend on the driver and the version)."""
        if (not layout.blocks and not layout.ram_ranges) or layout.device_ranges:
            return None
        return baseline_memmap_pages(layout, self.struct_page_size, self.page_size)

    def full_pages(self, layout: MemoryLayout, live_pages: int | None, pools_empty: bool,
                   now_ns: int) -> int | None:
        """The full vmemmap for a snapshot whose live vmemmap is ``live_pages`` (None before 6.11)."""
        key = layout.change_key()
        predicted = self.predicted(layout)
        if live_pages is not None and pools_empty:
            if self._empty != (live_pages, key):
                self._empty, self._empty_since = (live_pages, key), now_ns
            elif now_ns - self._empty_since >= self.settle_ns:
                self._calibrate(live_pages, predicted, key, now_ns)
        else:
            self._empty = None
        cal = self.calibration
        if cal is not None and cal.layout_key == key:
            return cal.full_pages
        if cal is not None and not cal.agrees:
            return None
        return predicted

    def _calibrate(self, live: int, predicted: int | None, key: tuple[object, ...], now_ns: int) -> None:
        cal = self.calibration
        if cal is not None and cal.full_pages == live and cal.layout_key == key:
            return
        self.calibration = Calibration(live, predicted, key, now_ns)
        if predicted != live and key not in self._logged:
            self._logged.add(key)
            log.warning("vmemmap with nothing optimized: the kernel counts %d pages, the memory layout "
                        "predicts %s; trusting the kernel (byte truth unavailable after the next layout "
                        "change until the pools are empty again)", live, predicted)


def hotplug_neutral_counters(read_counters: Callable[[], MemmapCounters | None], root: Path,
                             struct_page_size: int, page_size: int) -> Callable[[], MemmapCounters | None]:
    """``read_counters`` with the memmap of memory hot-added (or removed) since this call taken out,
    so that code reading HVO from counter deltas never reads a hot-add as restores (or a removal as
    optimizations). The layout is re-read only when its cheap probe changes."""
    follower = LayoutFollower(root)
    truth = FullVmemmap(struct_page_size, page_size)

    def predicted() -> int | None:
        try:
            return truth.predicted(follower.current())
        except ObserverError:
            return None

    start = predicted()

    def read() -> MemmapCounters | None:
        counters = read_counters()
        now = predicted()
        if counters is None or start is None or now is None or now == start:
            return counters
        return MemmapCounters(counters.memmap_pages - (now - start), counters.memmap_boot_pages)

    return read
