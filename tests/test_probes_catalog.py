"""The probe catalog, resolution and the tracepoint set's build inputs, on fixture trees of the 6.18 host."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from observer.errors import ObserverError
from observer.kernel import tracefs
from observer.kernel.facts import KernelFacts
from observer.probes.catalog import CATALOG, specs_for
from observer.probes.events import EventType
from observer.probes.page_pfn import DEFAULT_VMEMMAP_BASE
from observer.probes.resolve import resolve
from observer.probes.session import ProbeSession
from observer.probes.tracepoint import HUGETLB_GFP, TracepointProbeSet, max_page_order

FIXTURES = Path(__file__).parent / "fixtures"
HOST = FIXTURES / "host-6.18"


def test_catalog_entries_are_well_formed() -> None:
    for spec in CATALOG:
        assert spec.targets and spec.handler and spec.modes, spec
        assert spec.modes <= {"fentry", "kprobe", "tracepoint"}, spec
        if spec.kind == "tracepoint":
            assert all(t.count(":") == 1 for t in spec.targets), spec
    tp = specs_for("tracepoint")
    assert {s.event for s in tp} >= {EventType.POOL_ALLOC, EventType.POOL_FREE, EventType.OPTIMIZE,
                                      EventType.RESTORE}


def test_tracepoint_mode_resolves_on_the_6_18_fixture() -> None:
    res = resolve(CATALOG, KernelFacts(root=HOST), "tracepoint")
    assert res and all(r.ok for r in res), [(r.spec.handler, r.reason) for r in res if not r.ok]
    targets = {r.target for r in res}
    assert {"kmem:mm_page_alloc", "kmem:mm_page_free", "page_isolation:test_pages_isolated"} <= targets


def _copy_host(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(HOST, root)
    return root


def test_missing_tracepoint_and_counters_are_explained(tmp_path: Path) -> None:
    root = _copy_host(tmp_path)
    shutil.rmtree(root / "sys/kernel/tracing/events/page_isolation")
    (root / "proc/vmstat").write_text("nr_free_pages 1\n")  # a kernel before 6.11
    res = {r.spec.handler: r for r in resolve(CATALOG, KernelFacts(root=root), "tracepoint")}
    assert not res["tp_pages_isolated"].ok
    assert "page_isolation:test_pages_isolated" in res["tp_pages_isolated"].reason
    assert not res["infer_optimize"].ok and "6.11" in res["infer_optimize"].reason
    assert res["tp_page_alloc"].ok and res["tp_page_free"].ok


def test_cflags_come_from_the_format_file_and_the_hstates(caplog: pytest.LogCaptureFixture) -> None:
    flags = TracepointProbeSet(KernelFacts(root=HOST)).cflags()
    # 2 MiB (order 9) from the buddy allocator, 1 GiB (order 18) from alloc_contig_range
    assert f"-DHVO_TP_BUDDY_ORDERS={1 << 9:#x}ULL" in flags
    assert f"-DHVO_TP_CONTIG_ORDERS={1 << 18:#x}ULL" in flags
    comp, hardwall, nomemalloc = 1 << 18, 1 << 20, 1 << 19
    assert f"-DHVO_GFP_ALL={comp | hardwall:#x}ULL" in flags
    assert f"-DHVO_GFP_NONE={nomemalloc:#x}ULL" in flags
    # struct page pointer -> pfn: the fixture has neither BTF nor vmemmap_base (the log says what is assumed)
    assert f"-DHVO_VMEMMAP_BASE={DEFAULT_VMEMMAP_BASE:#x}ULL" in flags and "-DHVO_SPAGE=64" in flags
    assert "no BTF: pfns assume sizeof(struct page) is 64" in caplog.text
    assert "no vmemmap_base in kallsyms" in caplog.text


def test_a_format_without_a_needed_gfp_flag_names_the_file(tmp_path: Path) -> None:
    root = _copy_host(tmp_path)
    fmt = root / "sys/kernel/tracing/events/kmem/mm_page_alloc/format"
    fmt.write_text(fmt.read_text().replace("__GFP_HARDWALL", "__GFP_SOMETHING"))
    with pytest.raises(ObserverError, match=r"kmem/mm_page_alloc/format does not print __GFP_HARDWALL"):
        TracepointProbeSet(KernelFacts(root=root)).cflags()


def _gfp(names: str, bits: dict[str, int]) -> int:
    composite = {
        "GFP_USER": "__GFP_DIRECT_RECLAIM|__GFP_KSWAPD_RECLAIM|__GFP_IO|__GFP_FS|__GFP_HARDWALL",
        "GFP_KERNEL": "__GFP_DIRECT_RECLAIM|__GFP_KSWAPD_RECLAIM|__GFP_IO|__GFP_FS",
    }
    composite["GFP_HIGHUSER"] = composite["GFP_USER"] + "|__GFP_HIGHMEM"
    composite["GFP_HIGHUSER_MOVABLE"] = composite["GFP_HIGHUSER"] + "|__GFP_MOVABLE"
    value = 0
    for name in names.split("|"):
        value |= _gfp(composite[name], bits) if name in composite else bits[name]
    return value


@pytest.mark.parametrize(("mask", "hugetlb"), [
    # hugetlb, as seen on 6.18 (pool growth) and per the sources of 6.1/6.12/6.18
    ("GFP_HIGHUSER_MOVABLE|__GFP_NOWARN|__GFP_RETRY_MAYFAIL|__GFP_COMP|__GFP_THISNODE", True),
    ("GFP_HIGHUSER_MOVABLE|__GFP_NOWARN|__GFP_COMP|__GFP_THISNODE", True),  # node_alloc_noretry set
    ("GFP_HIGHUSER_MOVABLE|__GFP_NOWARN|__GFP_RETRY_MAYFAIL|__GFP_COMP", True),  # surplus / migration
    ("GFP_HIGHUSER|__GFP_NOWARN|__GFP_RETRY_MAYFAIL|__GFP_COMP|__GFP_THISNODE", True),  # non-movable hstate
    # THP: GFP_TRANSHUGE_LIGHT / GFP_TRANSHUGE (+ __GFP_THISNODE|__GFP_NORETRY from mempolicy, khugepaged)
    ("__GFP_HIGHMEM|__GFP_MOVABLE|__GFP_IO|__GFP_FS|__GFP_HARDWALL|__GFP_COMP|__GFP_NOMEMALLOC|__GFP_NOWARN",
     False),
    ("GFP_HIGHUSER_MOVABLE|__GFP_COMP|__GFP_NOMEMALLOC|__GFP_NOWARN|__GFP_THISNODE|__GFP_NORETRY", False),
    # page-cache large folio (readahead), kvmalloc of 2 MiB trying hard (no __GFP_HARDWALL)
    ("GFP_HIGHUSER_MOVABLE|__GFP_NORETRY|__GFP_NOWARN|__GFP_COMP", False),
    ("GFP_KERNEL|__GFP_COMP|__GFP_NOWARN|__GFP_RETRY_MAYFAIL", False),
])
def test_hugetlb_gfp_signature(mask: str, hugetlb: bool) -> None:
    bits = tracefs.gfp_flags(tracefs.event_format("kmem", "mm_page_alloc", HOST))
    assert HUGETLB_GFP.matches(_gfp(mask, bits), bits) is hugetlb


def test_max_page_order_from_buddyinfo(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/buddyinfo").write_text(
        "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1   3\n")
    assert max_page_order(tmp_path) == 10
    assert max_page_order(tmp_path / "nowhere") == 10  # default when unreadable


@pytest.mark.parametrize("size", [0, 1000, 3 * 4096])
def test_bad_ring_buffer_size_is_refused_with_the_value(size: int) -> None:
    with pytest.raises(ObserverError, match=rf"ring buffer size {size} "):
        ProbeSession("tracepoint", KernelFacts(root=HOST), ringbuf_bytes=size)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ObserverError, match="unknown probe mode 'magic'"):
        ProbeSession("magic", KernelFacts(root=HOST))
