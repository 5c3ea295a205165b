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
# x86-64 start of the vmemmap without KASLR (4-level paging), for kernels without vmemmap_base.
DEFAULT_VMEMMAP_BASE = 0xFFFFEA0000000000


def page_pfn_cflags(facts: KernelFacts, struct_page_size: int) -> list[str]:
    """-D defines that enable hvo_page_pfn(): sizeof(struct page) and where the vmemmap starts."""
    flags = [f"-DHVO_SPAGE={struct_page_size}"]
    base_addr = facts.kernel_address(VMEMMAP_BASE)
    if base_addr:
        flags.append(f"-DHVO_VMEMMAP_BASE_ADDR={base_addr:#x}ULL")
    else:
        # e.g. kernels without CONFIG_KALLSYMS_ALL (no data symbols): right unless KASLR moved it
        log.warning("no vmemmap_base in kallsyms: pfns assume the vmemmap starts at %#x (wrong if "
                    "KASLR randomized the memory layout)", DEFAULT_VMEMMAP_BASE)
        flags.append(f"-DHVO_VMEMMAP_BASE={DEFAULT_VMEMMAP_BASE:#x}ULL")
    return flags
