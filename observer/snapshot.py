"""One reading of the kernel facts the model reconciles against: pools, vmemmap counters, sysctl.

Cheap enough to take several times a second (a dozen sysfs files and /proc/vmstat); the memory
layout (hundreds of files) is read again only when memory hotplug may have changed it: a cheap
probe (the memory-block directory listing and the RAM map) is compared at every reading, so a
hot-add or removal is followed by the next snapshot. The full vmemmap comes from
observer/vmemmap_truth.py (layout prediction, calibrated whenever the pools are empty).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from observer.kernel.files import ROOT
from observer.kernel.hugepages import read_hstates
from observer.kernel.memory_blocks import LayoutFollower, MemoryLayout
from observer.kernel.sysctl import read_hvo_sysctl
from observer.kernel.vmstat import read_memmap_counters
from observer.vmemmap_truth import FullVmemmap

PoolKey = tuple[str, int]  # (hstate name as sysfs spells it, NUMA node)


@dataclass(frozen=True)
class PoolPages:
    pages: int  # nr_hugepages (surplus pages included)
    free: int = 0
    surplus: int = 0


@dataclass(frozen=True)
class KernelSnapshot:
    taken_ns: int  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()
    pools: dict[PoolKey, PoolPages] = field(default_factory=dict)
    memmap_pages: int | None = None  # live vmemmap: nr_memmap_pages + nr_memmap_boot_pages (6.11+)
    memmap_counters: tuple[int, int] | None = None  # (nr_memmap_pages, nr_memmap_boot_pages)
    full_memmap_pages: int | None = None  # vmemmap of the online memory with nothing optimized
    hvo_enabled: bool | None = None  # vm.hugetlb_optimize_vmemmap; None: no such sysctl

    @property
    def saved_pages(self) -> int | None:
        """The kernel's own truth: vmemmap pages HVO has freed right now (None before 6.11)."""
        if self.memmap_pages is None or self.full_memmap_pages is None:
            return None
        return self.full_memmap_pages - self.memmap_pages

    def pool_pages(self, hstate: str) -> int:
        return sum(p.pages for (h, _), p in self.pools.items() if h == hstate)

    def change_key(self) -> tuple[object, ...]:
        """What must stay unchanged for the kernel to count as quiet."""
        return (tuple(sorted((k, p.pages, p.surplus) for k, p in self.pools.items())),
                self.memmap_pages, self.full_memmap_pages, self.hvo_enabled)


class SnapshotReader:
    def __init__(self, root: Path = ROOT, page_size: int = 4096, struct_page_size: int = 64) -> None:
        self.root = root
        self.page_size = page_size
        self.struct_page_size = struct_page_size
        self.truth = FullVmemmap(struct_page_size, page_size)
        self._layout = LayoutFollower(root)

    @property
    def layout(self) -> MemoryLayout | None:
        return self._layout.layout

    @property
    def layout_generation(self) -> int:
        """Bumped whenever a re-read found a different layout (memory hot-added or removed)."""
        return self._layout.generation

    def refresh_layout(self) -> None:
        self._layout.refresh()

    def read(self) -> KernelSnapshot:
        layout = self._layout.current()
        taken = time.monotonic_ns()  # before reading: whatever finished earlier is in this snapshot
        pools: dict[PoolKey, PoolPages] = {}
        for h in read_hstates(self.root, self.page_size):
            if not h.nodes:  # no per-node sysfs (kernel without NUMA): the global figures are node 0's
                pools[(h.name, 0)] = PoolPages(h.nr_hugepages, h.free_hugepages, h.surplus_hugepages)
                continue
            for n, p in h.nodes.items():
                pools[(h.name, n)] = PoolPages(p.nr_hugepages, p.free_hugepages, p.surplus_hugepages)
        counters = read_memmap_counters(self.root)
        empty = all(p.pages == 0 for p in pools.values())
        full = self.truth.full_pages(layout, counters.total if counters else None, empty, taken)
        return KernelSnapshot(
            taken_ns=taken,
            pools=pools,
            memmap_pages=counters.total if counters else None,
            memmap_counters=(counters.memmap_pages, counters.memmap_boot_pages) if counters else None,
            full_memmap_pages=full,
            hvo_enabled=read_hvo_sysctl(self.root),
        )
