"""/proc/kpageflags scanning on synthetic files, and live against the running kernel."""

from __future__ import annotations

import array
from pathlib import Path

import pytest

from observer.errors import KernelFactError
from observer.kernel import kpageflags as kpf

HEAD = 1 << kpf.KPF_COMPOUND_HEAD
TAIL = 1 << kpf.KPF_COMPOUND_TAIL
HUGE = 1 << kpf.KPF_HUGE
THP = 1 << 22  # KPF_THP: a compound page that is not hugetlb
ORDERS = (9, 18)


def write_kpageflags(root: Path, nr_pfns: int, compound: list[tuple[int, int, int]],
                     optimized: tuple[int, ...] = ()) -> Path:
    """A fake /proc/kpageflags: ``compound`` lists (head pfn, order, extra flag bits) of compound
    pages; heads in ``optimized`` get HVO's fake heads (every 64th pfn reads as a head, as on 6.18)."""
    flags = array.array("Q", bytes(8 * nr_pfns))
    for head, order, extra in compound:
        end = head + (1 << order)
        flags[head] = HEAD | extra
        flags[head + 1:end] = array.array("Q", [TAIL | extra]) * (end - head - 1)
        if head in optimized:
            fakes = range(head + 64, end, 64)
            flags[head + 64:end:64] = array.array("Q", [HEAD | extra]) * len(fakes)
    path = root / "proc/kpageflags"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flags.tobytes())  # native-endian, like the kernel's
    return path


GIG = 1 << 18


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    write_kpageflags(tmp_path, 2 * GIG + 4096, [
        (512, 9, HUGE),            # a 2 MiB hugetlb page
        (GIG, 18, HUGE),           # a 1 GiB hugetlb page (its 2 MiB-aligned tails must not count)
        (GIG + GIG, 9, HUGE),      # a 2 MiB hugetlb page right after it, 1 GiB-aligned itself
        (1536, 9, THP),            # a THP: compound, not huge
        (2048 + 512, 9, HUGE),     # another 2 MiB hugetlb page
    ])
    return tmp_path


def test_scan_finds_hugetlb_heads_and_tells_1g_from_2m(fake_root: Path) -> None:
    assert kpf.scan_huge_heads(ORDERS, fake_root) == {512: 9, 2560: 9, GIG: 18, 2 * GIG: 9}


def test_scan_with_only_the_2m_hstate_does_not_see_a_1g_page(fake_root: Path) -> None:
    heads = kpf.scan_huge_heads((9,), fake_root)
    assert GIG not in heads and heads[512] == 9


def test_scan_stops_at_max_pfn(fake_root: Path) -> None:
    assert kpf.scan_huge_heads(ORDERS, fake_root, max_pfn=1024) == {512: 9}


def test_optimized_pages_fake_heads_are_not_taken_for_2m_pages(tmp_path: Path) -> None:
    """An HVO-optimized 1 GiB page reads as a head at every 2 MiB: one page, not 512."""
    write_kpageflags(tmp_path, 3 * GIG, [(GIG, 18, HUGE), (512, 9, HUGE)], optimized=(GIG, 512))
    assert kpf.scan_huge_heads(ORDERS, tmp_path, expected={9: 1, 18: 1}) == {512: 9, GIG: 18}
    assert kpf.scan_huge_heads(ORDERS, tmp_path) == {512: 9, GIG: 18}


def test_a_1g_range_of_optimized_2m_pages_is_settled_by_the_pool_sizes(tmp_path: Path) -> None:
    """512 optimized 2 MiB pages filling a 1 GiB range read like one optimized 1 GiB page."""
    run = [(GIG + i * 512, 9, HUGE) for i in range(512)]
    write_kpageflags(tmp_path, 3 * GIG, [*run, (2 * GIG, 18, HUGE)],
                     optimized=(*(p for p, _, _ in run), 2 * GIG))
    heads = kpf.scan_huge_heads(ORDERS, tmp_path, expected={9: 512, 18: 1})
    # which of the two ranges is the 1 GiB page cannot be known: the first is taken
    assert sorted(heads.values()).count(18) == 1 and sorted(heads.values()).count(9) == 512
    write_kpageflags(tmp_path, 3 * GIG, run, optimized=tuple(p for p, _, _ in run))
    assert kpf.scan_huge_heads(ORDERS, tmp_path, expected={9: 512, 18: 0}) == {p: 9 for p, _, _ in run}


def test_a_1g_range_of_unoptimized_2m_pages_is_unambiguous(tmp_path: Path) -> None:
    run = [(GIG + i * 512, 9, HUGE) for i in range(512)]
    write_kpageflags(tmp_path, 2 * GIG, run)
    assert kpf.scan_huge_heads(ORDERS, tmp_path) == {p: 9 for p, _, _ in run}


def test_head_checks_of_single_pfns(fake_root: Path, tmp_path: Path) -> None:
    assert kpf.huge_head_at(GIG, 18, 9, fake_root)
    assert not kpf.huge_head_at(GIG, 9, 9, fake_root)  # real tails follow: a bigger page
    assert kpf.huge_head_at(2 * GIG, 9, 9, fake_root)
    assert not kpf.huge_head_at(2 * GIG, 18, 9, fake_root)  # a 2 MiB page at a 1 GiB boundary
    assert not kpf.huge_head_at(GIG + 512, 9, 9, fake_root)  # a tail
    assert not kpf.huge_head_at(1536, 9, 9, fake_root)  # THP head
    assert kpf.page_flags(512, fake_root) == HEAD | HUGE
    assert kpf.page_flags(1 << 40, fake_root) is None  # beyond the last pfn
    optimized = tmp_path / "opt"
    write_kpageflags(optimized, 2 * GIG, [(GIG, 18, HUGE)], optimized=(GIG,))
    assert kpf.huge_head_at(GIG, 18, 9, optimized)


def test_read_chunked_reads_a_range_across_chunks(fake_root: Path) -> None:
    flags = kpf.read_chunked(fake_root, start_pfn=510, count=5, chunk_entries=2)
    assert flags == [0, 0, HEAD | HUGE, TAIL | HUGE, TAIL | HUGE]


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(KernelFactError, match=r"proc/kpageflags: no such file"):
        kpf.scan_huge_heads(ORDERS, tmp_path)


@pytest.mark.live
def test_live_scan_matches_the_pool_sizes() -> None:
    """Every hugetlb page the kernel reports is found, of the right size (pools as they are now)."""
    from observer.kernel import hugepages

    if not Path("/proc/kpageflags").exists():
        pytest.skip("no /proc/kpageflags (CONFIG_PROC_PAGE_MONITOR off)")
    hstates = hugepages.read_hstates()
    before = {h.order: h.nr_hugepages for h in hstates}
    heads = kpf.scan_huge_heads([h.order for h in hstates], expected=before)
    after = {h.order: h.nr_hugepages for h in hugepages.read_hstates()}
    if before != after:
        pytest.skip(f"pools changed during the scan ({before} -> {after}): another process is resizing them")
    found = {o: sum(1 for v in heads.values() if v == o) for o in before}
    assert found == before
