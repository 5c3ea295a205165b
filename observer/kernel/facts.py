"""One bundle of kernel facts for one root, each read once on first use (slow ones such as BTF
and kallsyms are big). Pool counts and counters change all the time and are re-read per call."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from observer.kernel import cmdline, hugepages, kconfig, lockdown, memory_blocks, sysctl, tracefs, vmstat
from observer.kernel.btf import Btf
from observer.kernel.files import ROOT, under
from observer.kernel.kallsyms import Kallsyms, load_kallsyms
from observer.kernel.release import KernelVersion, running_release


@dataclass
class KernelFacts:
    root: Path = ROOT
    page_size: int = field(default_factory=lambda: os.sysconf("SC_PAGE_SIZE"))
    machine: str = field(default_factory=lambda: os.uname().machine)
    _addresses: dict[str, int | None] = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def release(self) -> str:
        return running_release(self.root)

    @cached_property
    def version(self) -> KernelVersion:
        return KernelVersion.parse(self.release)

    @cached_property
    def kallsyms(self) -> Kallsyms:
        # hidden addresses (no CAP_SYSLOG) filled from the unit's start-up record of this boot
        return load_kallsyms(self.root)

    def kernel_address(self, name: str) -> int | None:
        """One kernel address: from ``kallsyms`` when it is loaded (function modes), else from a scan
        for that symbol alone (tracepoint mode needs a few addresses, not 200,000 parsed symbols),
        each name scanned for once."""
        if "kallsyms" in self.__dict__:
            return self.kallsyms.address(name)
        if name not in self._addresses:
            self._addresses[name] = load_kallsyms(self.root, only=(name,)).address(name)
        return self._addresses[name]

    @cached_property
    def btf(self) -> Btf | None:
        """None when the kernel has no BTF (CONFIG_DEBUG_INFO_BTF off)."""
        if not under(self.root, "/sys/kernel/btf/vmlinux").exists():
            return None
        return Btf.load(self.root)

    @cached_property
    def kconfig(self) -> dict[str, str] | None:
        return kconfig.read_kconfig(self.root, self.release)

    @cached_property
    def lockdown(self) -> str | None:
        return lockdown.read_lockdown(self.root)

    @cached_property
    def boot_params(self) -> cmdline.BootParams:
        return cmdline.read_boot_params(self.root)

    @cached_property
    def memmap_on_memory(self) -> bool:
        return cmdline.memmap_on_memory_enabled(self.root)

    @cached_property
    def struct_page_size(self) -> int | None:
        """sizeof(struct page) from BTF; None without BTF."""
        return self.btf.struct_size("page") if self.btf else None

    # Changing facts: read anew on every call.
    def hstates(self) -> list[hugepages.Hstate]:
        return hugepages.read_hstates(self.root, self.page_size)

    def memory_layout(self) -> memory_blocks.MemoryLayout:
        return memory_blocks.read_memory_layout(self.root)

    def vmstat(self) -> dict[str, int]:
        return vmstat.read_vmstat(self.root)

    def memmap_counters(self) -> vmstat.MemmapCounters | None:
        return vmstat.memmap_counters(self.vmstat())

    def hvo_sysctl(self) -> bool | None:
        return sysctl.read_hvo_sysctl(self.root)

    def tracefs(self) -> Path:
        return tracefs.ensure_tracefs(self.root)


def gather(root: Path = ROOT) -> KernelFacts:
    return KernelFacts(root=root)
