"""vm.hugetlb_optimize_vmemmap (5.19+): whether pages allocated from now on get HVO."""

from __future__ import annotations

from pathlib import Path

from observer.kernel.files import ROOT, read_int, under, write_text

HVO_SYSCTL = "/proc/sys/vm/hugetlb_optimize_vmemmap"


def read_hvo_sysctl(root: Path = ROOT) -> bool | None:
    path = under(root, HVO_SYSCTL)
    if not path.exists():
        return None  # before 5.19, or a kernel built without HVO
    return read_int(path) != 0


def write_hvo_sysctl(on: bool, root: Path = ROOT) -> None:
    write_text(under(root, HVO_SYSCTL), "1\n" if on else "0\n")
