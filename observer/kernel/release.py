"""Kernel release: parsing ``6.18.44-fc-v782`` into an ordered version."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_text, under

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


class KernelVersion(NamedTuple):
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, release: str) -> KernelVersion:
        m = _VERSION.match(release.strip())
        if not m:
            raise KernelFactError(f"kernel release {release.strip()[:40]!r} is not of the form X.Y[.Z]")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def running_release(root: Path = ROOT) -> str:
    return read_text(under(root, "/proc/sys/kernel/osrelease")).strip()
