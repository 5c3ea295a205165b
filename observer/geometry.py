"""HVO geometry: how many vmemmap pages describe a huge page and how many HVO frees.

A huge page of order ``o`` is described by ``2**o`` struct pages, i.e.
``vmemmap_pages = 2**o * sizeof(struct page) / PAGE_SIZE`` pages of vmemmap (8 for 2 MiB and 4,096
for 1 GiB with a 64-byte struct page). All tail struct pages hold the same ``compound_head``, so HVO
remaps the tail vmemmap pages onto one page and frees the rest to the buddy allocator; what it must
keep ("reserved") depends on the kernel generation:

    5.14-5.17  RESERVE_VMEMMAP_NR 2: head page + first tail page kept      -> 6 / 4,094 freed
    5.18+      1 page kept (the "fake head" work lets tails share the head) -> 7 / 4,095 freed
    6.0+       hugetlb_vmemmap_optimizable_size() = vmemmap size - PAGE_SIZE, and 0 when
               sizeof(struct page) is not a power of two (tails would straddle pages)
    7.1+       all original vmemmap pages freed, a new head page allocated  -> net 7 / 4,095

The seed patch calls the freed count ``nr_free_vmemmap_pages``; we keep that name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from observer.kernel.facts import KernelFacts
from observer.kernel.kconfig import enabled
from observer.kernel.memory_blocks import MemoryLayout
from observer.kernel.release import KernelVersion


@dataclass(frozen=True)
class Generation:
    first: KernelVersion
    reserved_vmemmap_pages: int
    field_name: str  # how the kernel names the freeable count (for humans reading source)


# Oldest first; the last whose ``first`` <= the running version applies.
GENERATIONS: tuple[Generation, ...] = (
    Generation(KernelVersion(5, 14), 2, "h->nr_free_vmemmap_pages"),
    Generation(KernelVersion(5, 18), 1, "h->nr_free_vmemmap_pages"),
    Generation(KernelVersion(5, 19), 1, "h->optimize_vmemmap_pages"),
    Generation(KernelVersion(6, 0), 1, "hugetlb_vmemmap_optimizable_size(h)"),
)

# Architectures that select ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP, by version (used only when the
# kernel publishes no config to ask). arm64 was disabled again in 6.2 (and in 6.1.y).
_ARCHES: tuple[tuple[str, KernelVersion, KernelVersion | None], ...] = (
    ("x86_64", KernelVersion(5, 14), None),
    ("aarch64", KernelVersion(5, 19), KernelVersion(6, 1)),
    ("loongarch64", KernelVersion(6, 2), None),
    ("s390x", KernelVersion(6, 2), KernelVersion(6, 18)),
    ("riscv64", KernelVersion(6, 3), None),
)


def generation(version: KernelVersion) -> Generation | None:
    """The HVO generation of a kernel, None before HVO existed (5.14)."""
    found = None
    for gen in GENERATIONS:
        if version[:2] >= gen.first[:2]:
            found = gen
    return found


def vmemmap_pages(order: int, struct_page_size: int, page_size: int) -> int:
    return (1 << order) * struct_page_size // page_size


def freeable_vmemmap_pages(order: int, struct_page_size: int, page_size: int,
                           version: KernelVersion) -> int:
    """The seed's ``nr_free_vmemmap_pages`` for a huge page of ``order`` on this kernel."""
    gen = generation(version)
    if gen is None or struct_page_size & (struct_page_size - 1):
        return 0  # no HVO, or struct pages straddling page boundaries cannot share a page
    total = vmemmap_pages(order, struct_page_size, page_size)
    return total - gen.reserved_vmemmap_pages if total > gen.reserved_vmemmap_pages else 0


def memmap_pages_per_section(layout: MemoryLayout, struct_page_size: int, page_size: int) -> int:
    """The kernel's DIV_ROUND_UP(PAGES_PER_SECTION * sizeof(struct page), PAGE_SIZE) (mm/sparse.c)."""
    return -(-(layout.section_size_bytes // page_size) * struct_page_size // page_size)


def baseline_memmap_pages(layout: MemoryLayout, struct_page_size: int, page_size: int) -> int:
    """vmemmap pages with nothing optimized, as the kernel counts them: the memmap of every present
    section of RAM, online or offline (observer/kernel/memory_blocks.py). Device memory is not
    included; observer/vmemmap_truth.py calibrates against the kernel's counters."""
    return layout.present_sections * memmap_pages_per_section(layout, struct_page_size, page_size)


@dataclass(frozen=True)
class HstateGeometry:
    name: str
    size_bytes: int
    order: int
    struct_pages: int
    vmemmap_pages: int
    reserved_vmemmap_pages: int
    freeable_vmemmap_pages: int
    eligible: bool  # a page allocated now would be optimized
    reason: str  # why not, or "" when eligible
    notes: tuple[str, ...] = field(default_factory=tuple)

    page_size: int = 4096

    @property
    def freeable_bytes(self) -> int:
        return self.freeable_vmemmap_pages * self.page_size


@dataclass(frozen=True)
class HvoSupport:
    built: bool | None  # None: cannot tell
    enabled: bool | None  # pages allocated now get HVO
    reason: str  # why HVO does not apply now, "" when it does


def hvo_support(facts: KernelFacts) -> HvoSupport:
    """Whether this kernel applies HVO to pages allocated now, and if not, why."""
    if generation(facts.version) is None:
        return HvoSupport(False, False, f"kernel {facts.version} predates HVO (5.14)")
    config_key = ("CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP" if facts.version >= KernelVersion(5, 19)
                  else "CONFIG_HUGETLB_PAGE_FREE_VMEMMAP")
    built = enabled(facts.kconfig, config_key)
    if built is None:
        built = _arch_supported(facts.machine, facts.version)
    if not built:
        return HvoSupport(False, False, f"kernel built without {config_key} "
                                        f"(or {facts.machine} does not support HVO in {facts.version})")
    if facts.struct_page_size is not None and facts.struct_page_size & (facts.struct_page_size - 1):
        return HvoSupport(True, False, f"sizeof(struct page) is {facts.struct_page_size}, not a power of "
                                       "two: nothing can be freed (a debug config?)")
    sysctl = facts.hvo_sysctl()
    if sysctl is not None:
        if not sysctl:
            return HvoSupport(True, False, "vm.hugetlb_optimize_vmemmap is 0: pages allocated now are not "
                                           "optimized (set it to 1; pages already in the pool stay as "
                                           "they are)")
        return HvoSupport(True, True, "")
    param = facts.boot_params.hugetlb_free_vmemmap
    default_on = enabled(facts.kconfig, "CONFIG_HUGETLB_PAGE_FREE_VMEMMAP_DEFAULT_ON")
    on = param in ("on", "1", "y") if param is not None else bool(default_on)
    if not on:
        return HvoSupport(True, False, "HVO is off at boot: add hugetlb_free_vmemmap=on to the kernel "
                                       "command line")
    if facts.memmap_on_memory and facts.version < KernelVersion(5, 19):
        return HvoSupport(True, False,
                          "memory_hotplug.memmap_on_memory is on: this kernel refuses HVO with it")
    return HvoSupport(True, True, "")


def _arch_supported(machine: str, version: KernelVersion) -> bool:
    for arch, first, last in _ARCHES:
        if machine == arch and version[:2] >= first[:2] and (last is None or version[:2] <= last[:2]):
            return True
    return False


def geometry_for(facts: KernelFacts) -> dict[str, HstateGeometry]:
    """Per hstate (keyed by its sysfs name): the geometry and whether HVO applies now."""
    page_size = facts.page_size
    struct_page = facts.struct_page_size or 64  # without BTF assume the common 64 bytes (see notes)
    gen = generation(facts.version)
    support = hvo_support(facts)
    result: dict[str, HstateGeometry] = {}
    for h in facts.hstates():
        total = vmemmap_pages(h.order, struct_page, page_size)
        freeable = freeable_vmemmap_pages(h.order, struct_page, page_size, facts.version)
        notes: list[str] = []
        if facts.struct_page_size is None:
            notes.append("no BTF: sizeof(struct page) assumed to be 64 bytes")
        if facts.memmap_on_memory and facts.version >= KernelVersion(6, 0):
            notes.append("memmap_on_memory: huge pages on hotplugged memory whose vmemmap lives on that "
                         "memory are skipped")
        reason = support.reason
        if not reason and freeable == 0:
            reason = f"its {total} vmemmap pages leave nothing to free after the reserved ones"
        result[h.name] = HstateGeometry(
            name=h.name, size_bytes=h.size_bytes, order=h.order, struct_pages=1 << h.order,
            vmemmap_pages=total, reserved_vmemmap_pages=gen.reserved_vmemmap_pages if gen else total,
            freeable_vmemmap_pages=freeable, eligible=not reason, reason=reason, notes=tuple(notes),
            page_size=page_size)
    return result
