"""Memory blocks (/sys/devices/system/memory) and which node each belongs to.

The kernel's vmemmap with nothing optimized is one ``struct page`` per base page of every online
memory section, so the online blocks give the baseline against which HVO savings are measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_text, under

MEMORY = "/sys/devices/system/memory"
NODES = "/sys/devices/system/node"
_BLOCK = re.compile(r"^memory(\d+)$")
_NODE = re.compile(r"^node(\d+)$")


@dataclass(frozen=True)
class MemoryBlock:
    index: int
    online: bool
    node: int | None


@dataclass(frozen=True)
class MemoryLayout:
    block_size_bytes: int
    blocks: list[MemoryBlock] = field(default_factory=list)

    @property
    def online_bytes(self) -> int:
        return self.block_size_bytes * sum(1 for b in self.blocks if b.online)

    def node_of_pfn(self, pfn: int, page_size: int = 4096) -> int | None:
        index = pfn * page_size // self.block_size_bytes
        return self._node_by_index().get(index)

    def _node_by_index(self) -> dict[int, int | None]:
        cache = self.__dict__.get("_nodes")
        if cache is None:
            cache = {b.index: b.node for b in self.blocks}
            object.__setattr__(self, "_nodes", cache)
        return cache


def read_memory_layout(root: Path = ROOT) -> MemoryLayout:
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
    return MemoryLayout(block_size, blocks)


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
