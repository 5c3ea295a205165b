"""Kernel fact readers on fixture trees captured from this project's machines (tests/fixtures/capture.py),
on malformed input, and live against the running kernel."""

from __future__ import annotations

import fcntl
import gzip
import os
from pathlib import Path

import pytest

from observer.errors import KernelFactError
from observer.kernel import cmdline, hugepages, kconfig, lockdown, memory_blocks, sysctl, tracefs, vmstat
from observer.kernel.kallsyms import Kallsyms
from observer.kernel.release import KernelVersion, running_release

FIXTURES = Path(__file__).parent / "fixtures"
HOST = FIXTURES / "host-6.18"  # 6.18 host, empty pools, sysctl 0
HOST_HVO = FIXTURES / "host-6.18-hvo"  # same host: sysctl 1, 4 x 2 MiB + 1 x 1 GiB optimized


def test_release_parsing() -> None:
    assert running_release(HOST) == "6.18.44-fc-v782"
    assert KernelVersion.parse("6.18.44-fc-v782") == (6, 18, 44)
    assert KernelVersion.parse("7.2-rc1") == (7, 2, 0)
    assert KernelVersion.parse("6.1.0-50-amd64") < KernelVersion.parse("6.12.1")
    with pytest.raises(KernelFactError, match="'banana'"):
        KernelVersion.parse("banana")


def test_kallsyms_resolves_exact_symbols_and_compiler_clones() -> None:
    ks = Kallsyms.read(HOST)
    assert ks.resolve("hugetlb_vmemmap_optimize_folio") == "hugetlb_vmemmap_optimize_folio"
    assert ks.resolve("__hugetlb_vmemmap_restore_folio") == "__hugetlb_vmemmap_restore_folio"
    # only a clone exists on this kernel; .cold fragments and __pfx_ padding are never entry points
    assert ks.resolve("only_alloc_fresh_hugetlb_folio") == "only_alloc_fresh_hugetlb_folio.isra.0"
    assert not ks.has("__pfx_hugetlb_vmemmap_optimize_folio")
    assert ks.resolve("hugetlb_vmemmap_optimize") is None  # the 6.0-6.6 name
    assert ks.address("hugetlb_vmemmap_optimize_folio") and ks.addresses_visible


def test_kallsyms_for_some_symbols_only_finds_exactly_those() -> None:
    text = ("0000000000000000 A fixed_percpu_data\n"
            "ffffffff82a1c0e8 D vmemmap_base_shadow\n"
            "ffffffff82a1c0f0 D vmemmap_base\n"
            "ffffffffc0a01000 t helper\t[some_module]\n"
            "ffffffff82a1c0f8 d vmemmap_base\n")  # a second entry of one name: the first counts
    ks = Kallsyms.parse(text, only=("vmemmap_base", "helper", "absent"))
    assert ks.symbols == {"vmemmap_base": (0xFFFFFFFF82A1C0F0, "D"), "helper": (0xFFFFFFFFC0A01000, "t")}
    assert ks.addresses_visible
    hidden = Kallsyms.parse("0000000000000000 A fixed_percpu_data\n0000000000000000 D vmemmap_base\n",
                            only=("vmemmap_base",))
    assert hidden.address("vmemmap_base") == 0 and not hidden.addresses_visible
    full = Kallsyms.read(HOST)
    assert Kallsyms.read(HOST, only=("hugetlb_vmemmap_optimize_folio",)).symbols == {
        "hugetlb_vmemmap_optimize_folio": full.symbols["hugetlb_vmemmap_optimize_folio"]}


def test_kallsyms_parse_skips_garbage() -> None:
    ks = Kallsyms.parse("zzzz T broken\nffffffff81000000 t f.constprop.0\nshort\n")
    assert ks.resolve("f") == "f.constprop.0" and not ks.has("broken")


def test_vmstat_memmap_counters() -> None:
    plain = vmstat.memmap_counters(vmstat.read_vmstat(HOST))
    hvo = vmstat.memmap_counters(vmstat.read_vmstat(HOST_HVO))
    assert plain == vmstat.MemmapCounters(0, 98304)
    # 4 x 2 MiB (8 boot pages freed, 1 new head each) + 1 x 1 GiB (4096 freed, 1 new head)
    assert hvo is not None and plain.total - hvo.total == 4 * 7 + 4095
    assert vmstat.memmap_counters({"nr_free_pages": 1}) is None  # kernels before 6.11


def test_vmstat_malformed_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/vmstat").write_text("nr_free_pages 12\nnr_memmap_pages twelve\n")
    with pytest.raises(KernelFactError, match=r"malformed .*proc/vmstat line 2"):
        vmstat.read_vmstat(tmp_path)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(KernelFactError, match=r"cannot read .*proc/vmstat: no such file"):
        vmstat.read_vmstat(tmp_path)


def test_hstates_and_nodes() -> None:
    hs = hugepages.read_hstates(HOST_HVO)
    assert [(h.name, h.size_bytes, h.order, h.nr_hugepages) for h in hs] == [
        ("2048kB", 2 << 20, 9, 4), ("1048576kB", 1 << 30, 18, 1)]
    assert hs[0].nodes[0].nr_hugepages == 4 and hs[1].nodes[0].free_hugepages == 1
    assert hugepages.by_name(hs, "2048kB") is hs[0]
    with pytest.raises(KernelFactError, match="no hstate '64kB'"):
        hugepages.by_name(hs, "64kB")
    assert hugepages.read_hstates(Path("/nonexistent")) == []


def test_hstate_malformed_count(tmp_path: Path) -> None:
    d = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    d.mkdir(parents=True)
    for f in ("nr_hugepages", "free_hugepages", "surplus_hugepages", "resv_hugepages"):
        (d / f).write_text("0\n")
    (d / "nr_hugepages").write_text("lots\n")
    with pytest.raises(KernelFactError, match=r"malformed .*hugepages-2048kB/nr_hugepages.*'lots'"):
        hugepages.read_hstates(tmp_path)


def test_sysctl() -> None:
    assert sysctl.read_hvo_sysctl(HOST) is False
    assert sysctl.read_hvo_sysctl(HOST_HVO) is True
    assert sysctl.read_hvo_sysctl(Path("/nonexistent")) is None  # before 5.19


def test_cmdline_parameters() -> None:
    p = cmdline.parse_cmdline(
        "ro hugepagesz=1G hugepages=2 hugepagesz=2M hugepages=0:16,1:8 default_hugepagesz=2M "
        "hugetlb_free_vmemmap=on memory_hotplug.memmap_on_memory=1 -- hugepages=99")
    assert p.hugepages == [(1 << 30, 2), (2 << 20, 8)]
    assert p.default_hugepagesz == 2 << 20
    assert p.hugetlb_free_vmemmap == "on" and p.memmap_on_memory == "1"
    host = cmdline.read_boot_params(HOST)
    assert host.hugepages == [] and host.hugetlb_free_vmemmap is None
    assert cmdline.parse_size("1G") == 1 << 30 and cmdline.parse_size("x") is None


def test_lockdown() -> None:
    assert lockdown.parse_lockdown("none [integrity] confidentiality\n") == "integrity"
    assert lockdown.read_lockdown(HOST) in ("none", "integrity", "confidentiality")
    assert lockdown.read_lockdown(Path("/nonexistent")) is None


def test_kconfig(tmp_path: Path) -> None:
    cfg = kconfig.read_kconfig(HOST)
    assert cfg is not None and kconfig.enabled(cfg, "CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP")
    assert kconfig.enabled(cfg, "CONFIG_KPROBES") is False
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/config-6.1.0").write_text("CONFIG_KPROBES=y\n# CONFIG_FOO is not set\n")
    assert kconfig.read_kconfig(tmp_path, "6.1.0") == {"CONFIG_KPROBES": "y", "CONFIG_FOO": "n"}
    assert kconfig.enabled(None, "CONFIG_KPROBES") is None
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/config.gz").write_bytes(b"not gzip")
    with pytest.raises(KernelFactError, match=r"cannot read .*config.gz"):
        kconfig.read_kconfig(tmp_path)
    (tmp_path / "proc/config.gz").write_bytes(gzip.compress(b"CONFIG_X=m\n"))
    assert kconfig.enabled(kconfig.read_kconfig(tmp_path), "CONFIG_X")


def test_memory_layout() -> None:
    layout = memory_blocks.read_memory_layout(HOST)
    assert layout.block_size_bytes == 128 << 20
    assert sum(b.online for b in layout.blocks) == 192 and layout.online_bytes == 24 << 30
    assert layout.node_of_pfn(0) == 0 and layout.node_of_pfn(10**12) is None


def test_gfp_flags_from_both_format_styles() -> None:
    flags = tracefs.gfp_flags(tracefs.event_format("kmem", "mm_page_alloc", HOST))
    assert flags["__GFP_COMP"] == 1 << 18 and flags["__GFP_NOMEMALLOC"] == 1 << 19
    assert flags["__GFP_THISNODE"] == 1 << 21 and flags["__GFP_RETRY_MAYFAIL"] == 1 << 14
    old = ('{(unsigned long)((__force gfp_t)0x4000u), "__GFP_COMP"}, '
           '{(unsigned long)((__force gfp_t)0x80000u), "__GFP_NOMEMALLOC"}')
    assert tracefs.gfp_flags(old) == {"__GFP_COMP": 0x4000, "__GFP_NOMEMALLOC": 0x80000}


@pytest.mark.live
def test_live_readers_agree_with_the_running_kernel() -> None:
    root = Path("/")
    assert KernelVersion.parse(running_release(root)) >= (5, 0, 0)
    hs = hugepages.read_hstates(root)
    assert {"2048kB", "1048576kB"} <= {h.name for h in hs}
    assert vmstat.read_memmap_counters(root) is not None  # this host runs 6.18
    assert tracefs.event_exists("kmem", "mm_page_alloc") or tracefs.ensure_tracefs()
    assert Kallsyms.read(root).resolve("hugetlb_vmemmap_restore_folio")


def test_pools_lock_is_held_across_roots_that_share_sysfs(tmp_path: Path) -> None:
    """Two roots (a chroot, a container) see the same sysfs directory, so the lock taken in one
    makes the other wait; a lock file under each root's own /run would not."""
    (tmp_path / "sys/kernel/mm").mkdir(parents=True)
    (tmp_path / "sys/kernel/mm/hugepages").mkdir()
    other_root = tmp_path / "chroot"
    (other_root / "sys/kernel/mm").mkdir(parents=True)
    (other_root / "sys/kernel/mm/hugepages").symlink_to(tmp_path / "sys/kernel/mm/hugepages")
    with hugepages.pools_lock(tmp_path):
        fd = os.open(other_root / "sys/kernel/mm/hugepages", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(other_root / "sys/kernel/mm/hugepages", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)
