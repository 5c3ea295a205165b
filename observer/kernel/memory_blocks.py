"""Memory layout: memory blocks (/sys/devices/system/memory), their nodes, and the present sections.

The kernel populates one ``struct page`` per base page of every *present* memory section, whether
the section's block is online or offline, and counts that memmap in ``nr_memmap_boot_pages``
(sections present at boot) or ``nr_memmap_pages`` (hot-added sections), both in /proc/vmstat (6.11+).
A memory block may be only partly present: with 2 GiB blocks the end of the RAM below the PCI hole
usually falls inside one. So "vmemmap with nothing optimized" is counted in present sections, not
in blocks: a section is present when it overlaps a System RAM range and lies in a memory block the
kernel created.

System RAM ranges come from /proc/iomem (all of them: boot, hot-added, driver-managed, e.g.
"System RAM (kmem)"), which shows addresses only with CAP_SYS_ADMIN; without it from
/sys/firmware/memmap, the firmware's map plus ACPI hot-added ranges (it misses driver-managed
memory and ranges a ``memmap=`` parameter turned into something else: the memory-block check and
the empty-pool calibration in observer/vmemmap_truth.py catch those). Device memory (ZONE_DEVICE,
counted by the kernel from 6.11) has no block and is not counted here: ``device_key`` (iomem
entries, nvdimm/dax devices) only lets a change of it be noticed.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_int, read_text, under

MEMORY = "/sys/devices/system/memory"
NODES = "/sys/devices/system/node"
IOMEM = "/proc/iomem"
FIRMWARE_MEMMAP = "/sys/firmware/memmap"
DEVICE_BUSES = ("/sys/bus/nd/devices", "/sys/bus/dax/devices")  # pmem namespaces, pfn and dax devices
_BLOCK = re.compile(r"^memory(\d+)$")
_NODE = re.compile(r"^node(\d+)$")
_IOMEM_LINE = re.compile(r"^(\s*)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")
_DEVICE = re.compile(r"^(Persistent Memory|Soft Reserved|namespace\d|dax\d|pfn\d|device-dax)")

# SECTION_SIZE_BITS of the architectures with HVO (arch/*/include/asm/sparsemem.h).
SECTION_SIZE_BITS = {"x86_64": 27, "aarch64": 27, "riscv64": 27, "loongarch64": 29, "s390x": 28}

Range = tuple[int, int]  # [start, end] physical addresses, end inclusive (as the kernel prints them)


@dataclass(frozen=True)
class MemoryBlock:
    index: int
    online: bool
    node: int | None


@dataclass(frozen=True)
class MemoryLayout:
    block_size_bytes: int
    blocks: list[MemoryBlock] = field(default_factory=list)
    section_size_bytes: int = 128 << 20
    ram_ranges: tuple[Range, ...] = ()  # System RAM; empty: unknown (then every block counts as present)
    ram_source: str = ""  # the file the ranges come from
    device_ranges: tuple[tuple[Range, str], ...] = ()  # iomem device memory entries (change detection)
    devices: tuple[str, ...] = ()  # nvdimm and dax devices in sysfs (change detection without iomem)

    @property
    def online_bytes(self) -> int:
        return self.block_size_bytes * sum(1 for b in self.blocks if b.online)

    @property
    def present_sections(self) -> int:
        """Memory sections the kernel populated a memmap for (online and offline blocks alike)."""
        cache = self.__dict__.get("_present")
        if cache is None:
            cache = len(self._present_set())
            object.__setattr__(self, "_present", cache)
        return cache

    def _present_set(self) -> set[int]:
        sec = self.section_size_bytes
        per_block = max(self.block_size_bytes // sec, 1) if self.block_size_bytes else 1
        in_blocks: set[int] = set()
        for b in self.blocks:
            in_blocks.update(range(b.index * per_block, (b.index + 1) * per_block))
        if not self.ram_ranges:
            return in_blocks
        sections: set[int] = set()
        for start, end in self.ram_ranges:
            sections.update(range(start // sec, end // sec + 1))
        return sections & in_blocks if self.blocks else sections

    def change_key(self) -> tuple[object, ...]:
        """What changes when memory is hot-added, removed or re-assigned (not on/offlining, which
        keeps the memmap)."""
        return (self.block_size_bytes, tuple((b.index, b.node) for b in self.blocks), self.ram_ranges,
                self.device_key)

    @property
    def device_key(self) -> tuple[object, ...]:
        """What is known of device memory (ZONE_DEVICE candidates); empty when there is none."""
        return (self.device_ranges, self.devices) if self.device_ranges or self.devices else ()

    def node_of_pfn(self, pfn: int, page_size: int = 4096) -> int | None:
        index = pfn * page_size // self.block_size_bytes if self.block_size_bytes else -1
        return self._node_by_index().get(index)

    def _node_by_index(self) -> dict[int, int | None]:
        cache = self.__dict__.get("_nodes")
        if cache is None:
            cache = {b.index: b.node for b in self.blocks}
            object.__setattr__(self, "_nodes", cache)
        return cache


def read_memory_layout(root: Path = ROOT, machine: str | None = None) -> MemoryLayout:
    base = under(root, MEMORY)
    block_size = _read_hex(base / "block_size_bytes") if (base / "block_size_bytes").exists() else 0
    node_of = _block_nodes(root)
    blocks = []
    if base.is_dir():
        for entry in base.iterdir():
            m = _BLOCK.match(entry.name)
            if not m:
                continue
            state = read_text(entry / "state").strip() if (entry / "state").exists() else "online"
            index = int(m[1])
            blocks.append(MemoryBlock(index, state == "online", node_of.get(index)))
    blocks.sort(key=lambda b: b.index)
    bits = SECTION_SIZE_BITS.get(machine or os.uname().machine)
    section = 1 << bits if bits else (block_size or 128 << 20)
    ram, device, source = read_ram_ranges(root)
    return MemoryLayout(block_size, blocks, section, ram, source, device, _device_names(root))


def _device_names(root: Path) -> tuple[str, ...]:
    names: list[str] = []
    for bus in DEVICE_BUSES:
        with contextlib.suppress(OSError):
            names += [f"{bus}/{n}" for n in os.listdir(under(root, bus))]
    return tuple(sorted(names))


def layout_probe(root: Path = ROOT) -> tuple[object, ...]:
    """A cheap fingerprint that changes when memory is hot-added or removed (two reads, no per-block
    files): the memory-block names and the RAM map."""
    base = under(root, MEMORY)
    try:
        names = tuple(sorted(os.listdir(base)))
    except OSError:
        names = ()
    try:
        text = under(root, IOMEM).read_text()
    except OSError:
        text = ""
    if not any(c not in "0-: \n" for line in text.splitlines() for c in line.split(" : ", 1)[0]):
        fw = under(root, FIRMWARE_MEMMAP)
        text = " ".join(sorted(os.listdir(fw))) if fw.is_dir() else ""
    return names, text, _device_names(root)


class LayoutFollower:
    """The current layout, re-read only when ``layout_probe`` says memory was hot-added or removed
    (or on ``refresh()``); ``generation`` counts the changes seen."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.layout: MemoryLayout | None = None
        self.generation = 0
        self._probe: object = None

    def refresh(self) -> MemoryLayout:
        self._probe = layout_probe(self.root)
        layout = read_memory_layout(self.root)
        if self.layout is None or layout.change_key() != self.layout.change_key():
            self.generation += 1
        self.layout = layout
        return layout

    def current(self) -> MemoryLayout:
        if self.layout is None or layout_probe(self.root) != self._probe:
            return self.refresh()
        return self.layout


def read_ram_ranges(root: Path = ROOT) -> tuple[tuple[Range, ...], tuple[tuple[Range, str], ...], str]:
    """(System RAM ranges, device memory entries, source file); empty when neither file can tell."""
    iomem = under(root, IOMEM)
    if iomem.exists():
        try:
            text = read_text(iomem)
        except KernelFactError:  # unreadable here (a sandbox): the firmware map tells
            text = ""
        ram, device = parse_iomem(text, str(iomem))
        if ram and any(end for _, end in ram):  # all zeros: no CAP_SYS_ADMIN
            return ram, device, IOMEM
    fw = under(root, FIRMWARE_MEMMAP)
    if fw.is_dir():
        return read_firmware_memmap(fw), (), FIRMWARE_MEMMAP
    return (), (), ""


def parse_iomem(text: str, source: str = IOMEM) -> tuple[tuple[Range, ...], tuple[tuple[Range, str], ...]]:
    """Top-level System RAM ranges (every "System RAM*" name) and device memory entries at any depth."""
    ram: list[Range] = []
    device: list[tuple[Range, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _IOMEM_LINE.match(line)
        if not m:
            raise KernelFactError(f"malformed {source} line {n}: {line[:60]!r}")
        indent, start, end, name = m[1], int(m[2], 16), int(m[3], 16), m[4].strip()
        if not indent and name.startswith("System RAM"):
            ram.append((start, end))
        elif _DEVICE.match(name):
            device.append(((start, end), name))
    return tuple(sorted(ram)), tuple(sorted(device))


def read_firmware_memmap(base: Path) -> tuple[Range, ...]:
    ram: list[Range] = []
    for entry in base.iterdir():
        if not (entry / "type").exists():
            continue
        if read_text(entry / "type").strip() != "System RAM":
            continue
        ram.append((read_int(entry / "start"), read_int(entry / "end")))
    return tuple(sorted(ram))


def _read_hex(path: Path) -> int:
    """sysfs prints block_size_bytes in hex without a 0x prefix."""
    text = read_text(path).strip()
    try:
        return int(text, 16)
    except ValueError:
        raise KernelFactError(f"malformed {path}: expected hex, got {text[:40]!r}") from None


def _block_nodes(root: Path) -> dict[int, int]:
    nodes: dict[int, int] = {}
    base = under(root, NODES)
    if not base.is_dir():
        return nodes
    for node_dir in base.iterdir():
        nm = _NODE.match(node_dir.name)
        if not nm:
            continue
        for entry in node_dir.iterdir():
            bm = _BLOCK.match(entry.name)
            if bm:
                nodes[int(bm[1])] = int(nm[1])
    return nodes
