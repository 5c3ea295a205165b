"""The BTF reader on a hand-built blob (exact expectations) and on the running kernel's BTF."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from observer.errors import KernelFactError
from observer.kernel import btf as B


def _blob() -> bytes:
    """int; struct page {flags@0, union {private@40}} size 64; struct hstate {order@40} size 128;
    const struct hstate *; struct page *; int f(const struct hstate *h, struct page *head)."""
    strings = b"\0int\0page\0flags\0private\0hstate\0order\0h\0head\0f\0"
    off = {s: strings.index(s.encode() + b"\0") for s in ("int", "page", "flags", "private", "hstate",
                                                          "order", "h", "head", "f")}
    t = b""
    t += struct.pack("<IIII", off["int"], B.INT << 24, 4, 32)  # 1 int
    t += struct.pack("<III", 0, (B.UNION << 24) | 1, 8) + struct.pack("<III", off["private"], 1, 0)  # 2
    t += struct.pack("<III", off["page"], (B.STRUCT << 24) | 2, 64)  # 3 struct page
    t += struct.pack("<III", off["flags"], 1, 0) + struct.pack("<III", 0, 2, 40 * 8)
    t += struct.pack("<III", off["hstate"], (B.STRUCT << 24) | 1, 128)  # 4 struct hstate
    t += struct.pack("<III", off["order"], 1, 40 * 8)
    t += struct.pack("<III", 0, B.CONST << 24, 4)  # 5 const struct hstate
    t += struct.pack("<III", 0, B.PTR << 24, 5)  # 6 const struct hstate *
    t += struct.pack("<III", 0, B.PTR << 24, 3)  # 7 struct page *
    t += struct.pack("<III", 0, (B.FUNC_PROTO << 24) | 2, 1)  # 8 int (h, head)
    t += struct.pack("<II", off["h"], 6) + struct.pack("<II", off["head"], 7)
    t += struct.pack("<III", off["f"], B.FUNC << 24, 8)  # 9 func f
    hdr = struct.pack("<HBBIIIII", B.BTF_MAGIC, 1, 0, 24, 0, len(t), len(t), len(strings))
    return hdr + t + strings


def test_synthetic_blob() -> None:
    b = B.Btf(_blob())
    assert b.struct_size("page") == 64 and b.struct_size("hstate") == 128
    assert b.member_offset("page", "private") == 40  # found inside the anonymous union
    assert b.member_offset("hstate", "order") == 40
    assert b.member_offset("page", "nope") is None and b.struct_size("folio") is None
    assert b.func_id("f") == 9
    assert b.func_params("f") == [("h", "const struct hstate *"), ("head", "struct page *")]
    assert b.func_return("f") == "int" and b.func_params("g") is None


def test_bad_blobs_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(KernelFactError, match="bad BTF magic"):
        B.Btf(b"\0" * 64, "x.btf")
    with pytest.raises(KernelFactError, match="too short"):
        B.Btf(b"\x9f\xeb")
    with pytest.raises(KernelFactError, match=r"cannot read .*vmlinux: no such file"):
        B.Btf.load(tmp_path)


@pytest.mark.live
def test_running_kernel_btf() -> None:
    b = B.Btf.load()
    assert b.struct_size("page") == 64
    assert b.member_offset("page", "private") == b.member_offset("folio", "private")
    params = b.func_params("hugetlb_vmemmap_restore_folio")
    assert params is not None and params[0][1] == "const struct hstate *"
    assert b.func_return("hugetlb_vmemmap_restore_folio") == "int"
