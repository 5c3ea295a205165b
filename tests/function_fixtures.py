"""Kernel facts of the guest kernels, captured with tests/vm_guest_scripts/capture_function_facts.py
(HVO-related /proc/kallsyms lines; from BTF the prototypes of those functions and the struct layout),
served through the attributes of KernelFacts that observer.probes.functions uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from observer.kernel.kallsyms import Kallsyms
from observer.kernel.release import KernelVersion

FIXTURES = Path(__file__).parent / "fixtures" / "functions"
RELEASES = {"6.1": "6.1.0-50-amd64", "6.12": "6.12.117+deb13-amd64", "sid": "7.2.13+deb14-amd64"}


class FixtureBtf:
    """The subset of observer.kernel.btf.Btf the function probes use, from a captured btf.json."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def func_id(self, name: str) -> int | None:
        return 1 if name in self.data["funcs"] else None

    def func_params(self, name: str) -> list[tuple[str, str]] | None:
        f = self.data["funcs"].get(name)
        return None if f is None else [tuple(p) for p in f["params"]]  # type: ignore[misc]

    def func_return(self, name: str) -> str | None:
        f = self.data["funcs"].get(name)
        return None if f is None else f["ret"]

    def struct_size(self, name: str) -> int | None:
        s = self.data["structs"].get(name)
        return None if s is None else s["size"]

    def member_offset(self, struct: str, member: str) -> int | None:
        s = self.data["structs"].get(struct)
        return None if s is None else s["members"].get(member)

    def enum_value(self, enum: str | None, member: str) -> int | None:
        return self.data["enums"].get(f"{enum}.{member}")


@dataclass
class FixtureFacts:
    release: str
    kallsyms: Kallsyms
    btf: FixtureBtf | None
    page_size: int = 4096
    root: Path = Path("/nonexistent")

    @property
    def version(self) -> KernelVersion:
        return KernelVersion.parse(self.release)

    def kernel_address(self, name: str) -> int | None:  # KernelFacts's, with kallsyms loaded
        return self.kallsyms.address(name)


def load(kernel: str, kallsyms_text: str | None = None) -> FixtureFacts:
    d = FIXTURES / RELEASES[kernel]
    text = kallsyms_text if kallsyms_text is not None else (d / "kallsyms").read_text()
    btf = FixtureBtf(json.loads((d / "btf.json").read_text()))
    return FixtureFacts(RELEASES[kernel], Kallsyms.parse(text), btf)
