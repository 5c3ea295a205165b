"""HVO geometry: the seed's numbers, later generations, and what this kernel really frees."""

from __future__ import annotations

from pathlib import Path

import pytest

from observer import geometry
from observer.kernel import hugepages, sysctl, vmstat
from observer.kernel.facts import KernelFacts
from observer.kernel.release import KernelVersion as V
from tests.kernel_state import restored_kernel_state

FIXTURES = Path(__file__).parent / "fixtures"
TWO_MB, ONE_GB = 9, 18


def test_seed_numbers_5_14() -> None:
    # The seed (v4 04/21): 512 struct pages = 8 vmemmap pages per 2 MiB page, RESERVE_VMEMMAP_NR 2
    assert geometry.vmemmap_pages(TWO_MB, 64, 4096) == 8
    assert geometry.freeable_vmemmap_pages(TWO_MB, 64, 4096, V(5, 14)) == 6
    assert geometry.vmemmap_pages(ONE_GB, 64, 4096) == 4096
    assert geometry.freeable_vmemmap_pages(ONE_GB, 64, 4096, V(5, 17)) == 4094


@pytest.mark.parametrize("version", [V(5, 18), V(5, 19), V(6, 1), V(6, 12), V(6, 18), V(7, 2)])
def test_one_reserved_page_from_5_18(version: V) -> None:
    assert geometry.freeable_vmemmap_pages(TWO_MB, 64, 4096, version) == 7
    assert geometry.freeable_vmemmap_pages(ONE_GB, 64, 4096, version) == 4095


def test_no_hvo_cases() -> None:
    assert geometry.freeable_vmemmap_pages(TWO_MB, 64, 4096, V(5, 13)) == 0  # predates HVO
    assert geometry.freeable_vmemmap_pages(TWO_MB, 56, 4096, V(6, 1)) == 0  # struct page not 2^n
    # arm64 64 KiB pages, 2 MiB hstate: 32 struct pages = 2 KiB: less than one vmemmap page
    assert geometry.freeable_vmemmap_pages(5, 64, 65536, V(6, 1)) == 0
    assert geometry.generation(V(5, 10)) is None
    assert geometry.generation(V(5, 19)).field_name == "h->optimize_vmemmap_pages"


def test_geometry_for_fixture_host() -> None:
    facts = KernelFacts(root=FIXTURES / "host-6.18", page_size=4096, machine="x86_64")
    geo = geometry.geometry_for(facts)  # fixture trees carry no BTF: 64 bytes assumed, and said so
    g2, g1 = geo["2048kB"], geo["1048576kB"]
    assert (g2.vmemmap_pages, g2.freeable_vmemmap_pages, g2.freeable_bytes) == (8, 7, 7 * 4096)
    assert (g1.vmemmap_pages, g1.freeable_vmemmap_pages) == (4096, 4095)
    assert not g2.eligible and "vm.hugetlb_optimize_vmemmap is 0" in g2.reason
    assert "assumed to be 64 bytes" in g2.notes[0]
    hvo = KernelFacts(root=FIXTURES / "host-6.18-hvo", page_size=4096, machine="x86_64")
    assert geometry.geometry_for(hvo)["2048kB"].eligible
    assert geometry.baseline_memmap_pages(facts.memory_layout(), 64, 4096) == 98304


def test_hvo_support_reasons(tmp_path: Path) -> None:
    old = KernelFacts(root=tmp_path, page_size=4096, machine="x86_64")
    old.__dict__["version"] = V(5, 10)
    assert "predates HVO" in geometry.hvo_support(old).reason
    arm = KernelFacts(root=tmp_path, page_size=4096, machine="aarch64")
    arm.__dict__.update(version=V(6, 12), kconfig=None)
    assert "does not support HVO" in geometry.hvo_support(arm).reason
    boot_off = KernelFacts(root=tmp_path, page_size=4096, machine="x86_64")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("ro quiet\n")
    boot_off.__dict__.update(version=V(5, 15), kconfig={"CONFIG_HUGETLB_PAGE_FREE_VMEMMAP": "y"},
                             struct_page_size=64)
    assert "hugetlb_free_vmemmap=on" in geometry.hvo_support(boot_off).reason
    (tmp_path / "proc/cmdline").write_text("hugetlb_free_vmemmap=on\n")
    boot_off.__dict__.pop("boot_params", None)
    assert geometry.hvo_support(boot_off).enabled
    odd = KernelFacts(root=tmp_path, page_size=4096, machine="x86_64")
    odd.__dict__.update(version=V(6, 6), kconfig={"CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP": "y"},
                        struct_page_size=56)
    assert "not a power of two" in geometry.hvo_support(odd).reason


@pytest.mark.live
@pytest.mark.parametrize("name", ["2048kB", "1048576kB"])
def test_kernel_really_frees_what_the_geometry_says(name: str) -> None:
    """Grow a pool by one page with HVO on; the vmemmap counters drop by exactly the freeable count."""
    with restored_kernel_state():
        _grow_one_and_measure(name)


def _grow_one_and_measure(name: str) -> None:
    facts = KernelFacts()
    expected = geometry.geometry_for(facts)[name].freeable_vmemmap_pages
    assert expected == {"2048kB": 7, "1048576kB": 4095}[name]
    sysctl.write_hvo_sysctl(True)
    start = hugepages.by_name(hugepages.read_hstates(), name).nr_hugepages
    before = vmstat.read_memmap_counters()
    got = hugepages.set_nr_hugepages(name, start + 1)
    assert got == start + 1, f"the kernel could not allocate one more {name} page"
    after = vmstat.read_memmap_counters()
    assert before is not None and after is not None
    assert before.total - after.total == expected
    hugepages.set_nr_hugepages(name, start)
    assert vmstat.read_memmap_counters().total == before.total  # restore gives every page back
