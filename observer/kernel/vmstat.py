"""/proc/vmstat, in particular the vmemmap counters (6.11+).

``nr_memmap_boot_pages`` counts vmemmap pages allocated at boot (memblock), ``nr_memmap_pages``
those allocated later; HVO frees from either and adds restored pages to ``nr_memmap_pages``, so
their sum is the live vmemmap size in pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_text, under


@dataclass(frozen=True)
class MemmapCounters:
    memmap_pages: int
    memmap_boot_pages: int

    @property
    def total(self) -> int:
        return self.memmap_pages + self.memmap_boot_pages


def parse_vmstat(text: str, source: str = "/proc/vmstat") -> dict[str, int]:
    values: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KernelFactError(f"malformed {source} line {n}: {line[:60]!r}")
        try:
            values[parts[0]] = int(parts[1])
        except ValueError:
            raise KernelFactError(f"malformed {source} line {n}: {line[:60]!r}") from None
    return values


def read_vmstat(root: Path = ROOT) -> dict[str, int]:
    path = under(root, "/proc/vmstat")
    return parse_vmstat(read_text(path), str(path))


def memmap_counters(vmstat: dict[str, int]) -> MemmapCounters | None:
    if "nr_memmap_pages" not in vmstat or "nr_memmap_boot_pages" not in vmstat:
        return None  # kernels before 6.11
    return MemmapCounters(vmstat["nr_memmap_pages"], vmstat["nr_memmap_boot_pages"])


def read_memmap_counters(root: Path = ROOT) -> MemmapCounters | None:
    return memmap_counters(read_vmstat(root))
