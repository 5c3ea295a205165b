"""struct page pointer -> pfn in BPF programs (``hvo_page_pfn()`` of bpf/hvo_common.h).

With SPARSEMEM_VMEMMAP (every kernel with HVO) the struct pages form one virtually contiguous array
starting at the vmemmap, so pfn = (page - vmemmap) / sizeof(struct page). The start is the kernel
variable ``vmemmap_base`` where KASLR randomizes it (x86-64): its address comes from kallsyms (or,
for the sandboxed unit, from ``hvo-observer kernel-addresses``) and the program reads its value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

VMEMMAP_BASE = "vmemmap_base"  # randomized by KASLR
KERNEL_TEXT = "_text"  # tells whether this boot randomized the layout (layout_randomized)
# x86-64 start of the vmemmap without KASLR (4-level paging), for kernels without vmemmap_base.
DEFAULT_VMEMMAP_BASE = 0xFFFFEA0000000000
# x86-64 kernel text without KASLR (__START_KERNEL_map + LOAD_PHYSICAL_ADDR): the decompressor that
# randomizes the text also sets the flag that randomizes the memory layout (kaslr_enabled()).
DEFAULT_TEXT = 0xFFFFFFFF81000000


def layout_randomized(facts: KernelFacts) -> bool | None:
    """Whether this boot randomized the kernel's memory layout (x86-64 CONFIG_RANDOMIZE_MEMORY with
    KASLR in effect); None when nothing tells. A kernel booted without the decompressor (a direct
    vmlinux boot, as some hypervisors do) or with ``nokaslr`` keeps the fixed layout."""
    from observer.kernel.kconfig import enabled

    if enabled(facts.kconfig, "CONFIG_RANDOMIZE_MEMORY") is False:
        return False
    if "nokaslr" in facts.boot_params.raw.split():
        return False
    text = facts.kernel_address(KERNEL_TEXT)
    if text:
        return text != DEFAULT_TEXT
    return None


def vmemmap_base_problem(facts: KernelFacts) -> str | None:
    """Why pfns (and so NUMA nodes) of struct page pointers are unknown on this boot, or None: the
    address of vmemmap_base is unknown (no CONFIG_KALLSYMS_ALL, no kernel-addresses file) and the
    layout is or may be randomized, so the fixed x86-64 base would be a guess."""
    if facts.kernel_address(VMEMMAP_BASE):
        return None
    randomized = layout_randomized(facts)
    if randomized is False:
        return None
    why = "the kernel randomizes its memory layout (KASLR)" if randomized else \
        "the kernel may randomize its memory layout (KASLR; its text address is not visible)"
    return (f"vmemmap_base is unknown (not in /proc/kallsyms: CONFIG_KALLSYMS_ALL off, and no "
            f"kernel-addresses file) and {why}: pfns and NUMA nodes of events are unknown")


def page_pfn_cflags(facts: KernelFacts, struct_page_size: int) -> list[str]:
    """-D defines that enable hvo_page_pfn(): sizeof(struct page) and where the vmemmap starts."""
    flags = [f"-DHVO_SPAGE={struct_page_size}"]
    base_addr = facts.kernel_address(VMEMMAP_BASE)
    if base_addr:
        flags.append(f"-DHVO_VMEMMAP_BASE_ADDR={base_addr:#x}ULL")
    else:
        # e.g. kernels without CONFIG_KALLSYMS_ALL (no data symbols): the fixed base, right when the
        # layout is not randomized; vmemmap_base_problem() says when it may be wrong (mode degraded)
        log.warning("no vmemmap_base in kallsyms: pfns assume the vmemmap starts at %#x (wrong if "
                    "KASLR randomized the memory layout)", DEFAULT_VMEMMAP_BASE)
        flags.append(f"-DHVO_VMEMMAP_BASE={DEFAULT_VMEMMAP_BASE:#x}ULL")
    return flags
