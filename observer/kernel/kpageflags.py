"""Find hugetlb pages by frame number in /proc/kpageflags (one native-endian u64 of KPF_* bits per pfn).

Only hstate-aligned pfns can be hugetlb heads, so only those entries are read: one pread per
2 MiB on x86-64. The kernel computes every entry it returns, so reading the whole file is what
costs (about a second for the 6.5 M entries of 24 GiB, against milliseconds for the aligned
entries one pread each). ``read_chunked`` keeps the big-chunk path for callers that want a
contiguous range.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, open_readonly, under

KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_NOPAGE = 20

_HEAD = 1 << KPF_COMPOUND_HEAD
_TAIL = 1 << KPF_COMPOUND_TAIL
_HUGE = 1 << KPF_HUGE
_ENTRY = 8


def kpageflags_path(root: Path = ROOT) -> Path:
    return under(root, "/proc/kpageflags")


def _open(path: Path) -> int:
    if not path.exists():
        raise KernelFactError(f"cannot read {path}: no such file (CONFIG_PROC_PAGE_MONITOR off?)")
    return open_readonly(path)


def _pread(fd: int, path: Path, pfn: int, count: int = 1) -> bytes:
    try:
        return os.pread(fd, _ENTRY * count, pfn * _ENTRY)
    except OSError as e:
        raise KernelFactError(f"cannot read {path} at pfn {pfn:#x}: {e.strerror or e}") from None


def page_flags(pfn: int, root: Path = ROOT) -> int | None:
    """KPF_* bits of one pfn, or None beyond the last pfn."""
    path = kpageflags_path(root)
    fd = _open(path)
    try:
        data = _pread(fd, path, pfn)
    finally:
        os.close(fd)
    return int.from_bytes(data, sys.byteorder) if len(data) == _ENTRY else None


def is_huge_head(flags: int | None) -> bool:
    return flags is not None and flags & (_HUGE | _HEAD) == (_HUGE | _HEAD)


def huge_head_at(pfn: int, order: int, smallest: int, root: Path = ROOT) -> bool:
    """Whether ``pfn`` looks like the head of a hugetlb page of ``order`` (``smallest``: the smallest
    hstate order). See ``scan_huge_heads`` for what kpageflags can and cannot tell apart: for a
    gigantic order this accepts an HVO-optimized page and a run of smaller pages alike."""
    path = kpageflags_path(root)
    fd = _open(path)
    try:
        if not is_huge_head(_flags_at(fd, path, pfn)) or pfn & ((1 << order) - 1):
            return False
        nxt = _flags_at(fd, path, pfn + (1 << smallest))
        inside = nxt is not None and nxt & (_HUGE | _TAIL) == (_HUGE | _TAIL)
        if order == smallest:
            return not inside  # a real tail there: part of a bigger, unoptimized page
        return nxt is not None and bool(nxt & _HUGE)
    finally:
        os.close(fd)


def _flags_at(fd: int, path: Path, pfn: int) -> int | None:
    data = _pread(fd, path, pfn)
    return int.from_bytes(data, sys.byteorder) if len(data) == _ENTRY else None


def scan_huge_heads(orders: Iterable[int], root: Path = ROOT, max_pfn: int | None = None,
                    expected: dict[int, int] | None = None) -> dict[int, int]:
    """Every hugetlb head page: {pfn: order}. Reads one entry per smallest-hstate-aligned pfn.

    HVO makes this harder: the tail struct pages of an optimized page are remapped onto its first
    vmemmap page, so every (PAGE_SIZE / sizeof(struct page))-th pfn of it reads as a compound *head*
    (a "fake head"; seen on 6.18: every 64th pfn of an optimized 1 GiB page). A gigantic-aligned
    head whose smallest-hstate-aligned entries are all heads is therefore either one optimized
    gigantic page or a run of optimized smaller pages filling exactly that range (a run of
    unoptimized ones has real tails between its heads): the flags are identical. Such ranges are
    settled with ``expected`` (hstate order -> nr_hugepages): as many of them as the gigantic pool
    still lacks are gigantic pages (first ones first), the rest runs of small pages. Without
    ``expected`` they are taken as gigantic pages. An unoptimized gigantic page (real tails) and
    pages of the smallest hstate are unambiguous.
    """
    order_list = sorted(set(orders))
    if not order_list:
        return {}
    smallest = order_list[0]
    stride = 1 << smallest
    path = kpageflags_path(root)
    fd = _open(path)
    try:
        flags = _strided(fd, path, stride, max_pfn)
        heads: dict[int, int] = {}
        claimed = bytearray(len(flags))  # entries that belong to a gigantic page already found
        ambiguous: dict[int, list[int]] = {}  # gigantic order -> indices of ambiguous ranges
        for order in reversed(order_list[1:]):
            span = 1 << (order - smallest)
            for i in range(0, len(flags) - span + 1, span):
                if claimed[i] or not is_huge_head(flags[i]):
                    continue
                rest = flags[i + 1:i + span]
                if all(_real_tail(f) for f in rest):
                    heads[i * stride] = order
                    claimed[i:i + span] = b"\1" * span
                elif all(is_huge_head(f) for f in rest) and _optimized(fd, path, i * stride, smallest):
                    ambiguous.setdefault(order, []).append(i)
    finally:
        os.close(fd)
    for order, starts in ambiguous.items():
        span = 1 << (order - smallest)
        found = sum(1 for o in heads.values() if o == order)
        want = len(starts) if expected is None else max(0, expected.get(order, 0) - found)
        for i in starts[:want]:
            heads[i * stride] = order
            claimed[i:i + span] = b"\1" * span
    for i, f in enumerate(flags):
        if not claimed[i] and is_huge_head(f) and not (i + 1 < len(flags) and _real_tail(flags[i + 1])):
            heads[i * stride] = smallest  # (a real tail next: a bigger page of an hstate not asked for)
    return dict(sorted(heads.items()))


def _real_tail(flags: int) -> bool:
    return flags & (_HUGE | _TAIL) == (_HUGE | _TAIL)


def _optimized(fd: int, path: Path, head: int, smallest: int) -> bool:
    """Fake heads inside the first smallest-hstate page: HVO optimized it (an unoptimized page has
    real tails there). Checks pfns head + 2, 4, ... 2**(smallest-1): covers any struct page size."""
    return any(is_huge_head(_flags_at(fd, path, head + (1 << k))) for k in range(1, smallest))


def _strided(fd: int, path: Path, stride: int, max_pfn: int | None) -> list[int]:
    """Flags of pfns 0, stride, 2*stride, ... up to the last pfn (or ``max_pfn``)."""
    out: list[int] = []
    pfn = 0
    while max_pfn is None or pfn < max_pfn:
        f = _flags_at(fd, path, pfn)
        if f is None:
            break
        out.append(f)
        pfn += stride
    return out


def read_chunked(root: Path = ROOT, start_pfn: int = 0, count: int | None = None,
                 chunk_entries: int = 1 << 20) -> list[int]:
    """Flags of a contiguous pfn range, read in big chunks (for tools and tests, not the hot path)."""
    path = kpageflags_path(root)
    fd = _open(path)
    out: list[int] = []
    try:
        pfn = start_pfn
        while count is None or len(out) < count:
            want = chunk_entries if count is None else min(chunk_entries, count - len(out))
            data = _pread(fd, path, pfn, want)
            if not data:
                break
            out.extend(memoryview(data)[: len(data) // _ENTRY * _ENTRY].cast("Q"))
            pfn += len(data) // _ENTRY
    finally:
        os.close(fd)
    return out
