"""Boot parameters that decide HVO before any daemon runs: ``hugepages=``, ``hugepagesz=``,
``default_hugepagesz=``, ``hugetlb_free_vmemmap=`` and ``memory_hotplug.memmap_on_memory=``."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from observer.kernel.files import ROOT, read_text, under

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """memparse-style: ``2M`` -> 2097152, ``1G`` -> 1073741824."""
    text = text.strip().lower()
    mult = 1
    if text and text[-1] in _UNITS:
        mult, text = _UNITS[text[-1]], text[:-1]
    try:
        return int(text, 0) * mult
    except ValueError:
        return None


@dataclass(frozen=True)
class BootParams:
    # (size the count applies to, count): hugepages= applies to the preceding hugepagesz=, else the
    # default size (None here).
    hugepages: list[tuple[int | None, int]] = field(default_factory=list)
    default_hugepagesz: int | None = None
    hugetlb_free_vmemmap: str | None = None
    memmap_on_memory: str | None = None
    raw: str = ""


def parse_cmdline(text: str) -> BootParams:
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    if "--" in words:
        words = words[: words.index("--")]  # the rest goes to init, not the kernel
    size: int | None = None
    pages: list[tuple[int | None, int]] = []
    default = free_vmemmap = on_memory = None
    for word in words:
        key, _, value = word.partition("=")
        if key == "hugepagesz":
            size = parse_size(value)
        elif key == "hugepages":
            count = parse_size(value.split(":")[-1]) if ":" in value else parse_size(value)
            if count is not None:
                pages.append((size, count))
        elif key == "default_hugepagesz":
            default = parse_size(value)
        elif key == "hugetlb_free_vmemmap":
            free_vmemmap = value
        elif key == "memory_hotplug.memmap_on_memory":
            on_memory = value
    return BootParams(pages, default, free_vmemmap, on_memory, text.strip())


def read_boot_params(root: Path = ROOT) -> BootParams:
    return parse_cmdline(read_text(under(root, "/proc/cmdline")))


def memmap_on_memory_enabled(root: Path = ROOT) -> bool:
    """The module parameter reflects the boot option and the kernel's own refusal of it."""
    path = under(root, "/sys/module/memory_hotplug/parameters/memmap_on_memory")
    if not path.exists():
        return False
    return read_text(path).strip().lower() in ("y", "1", "force")
