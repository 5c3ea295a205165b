"""The vmemmap with nothing optimized ("full vmemmap"), against which the kernel's saving is measured.

``nr_memmap_pages + nr_memmap_boot_pages`` (6.11+) is the live vmemmap; HVO's saving is the full
vmemmap minus that. The full vmemmap is predicted from the memory layout (present sections,
observer/kernel/memory_blocks.py) and *calibrated*: whenever every hugetlb pool has been empty and
the counters unchanged for a settle window, the kernel holds no optimized page, so the counters are
the whole vmemmap. The calibration is what counts:

- layout unchanged since the calibration: full = the calibrated value;
- RAM hot-added or removed since, device memory unchanged: full = the new prediction plus what the
  calibration found beyond the prediction (the memmap of device memory, ZONE_DEVICE, which the
  kernel counts from 6.11 in ways that depend on the driver, its mode and the kernel version);
- device memory changed since (or present before any calibration), or a calibration without device
  memory disagreed with the prediction (a kernel accounting its memmap differently from this
  module's model; logged once per layout): unknown (None) until the pools are empty again, rather
  than a figure that may be wrong.
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

    @property
    def device_key(self) -> object:
        return self.layout_key[-1]  # MemoryLayout.change_key() ends with the device key


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
        """The memmap of the layout's RAM (device memory not included); None without a layout."""
        if not layout.blocks and not layout.ram_ranges:
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
        if predicted is None:
            return None
        if cal is None:
            return None if layout.device_key else predicted
        if cal.device_key != layout.device_key or cal.predicted_pages is None:
            return None
        if not cal.device_key and not cal.agrees:
            return None  # the RAM model is wrong for this kernel: no figure rather than a wrong one
        return predicted + cal.full_pages - cal.predicted_pages

    def _calibrate(self, live: int, predicted: int | None, key: tuple[object, ...], now_ns: int) -> None:
        cal = self.calibration
        if cal is not None and cal.full_pages == live and cal.layout_key == key:
            return
        self.calibration = Calibration(live, predicted, key, now_ns)
        if predicted != live and key not in self._logged:
            self._logged.add(key)
            why = ("the difference is taken as the memmap of device memory" if key[-1] else
                   "no byte truth after the next layout change until the pools are empty again")
            log.warning("vmemmap with nothing optimized: the kernel counts %d pages, the memory layout's "
                        "RAM %s; trusting the kernel (%s)", live, predicted, why)


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
