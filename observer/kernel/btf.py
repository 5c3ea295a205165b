"""A minimal reader of the kernel's BTF (/sys/kernel/btf/vmlinux).

Kernel headers here never match the running kernel, so struct layouts (sizeof(struct page), member
offsets) and function prototypes come from BTF, the running kernel's own description of itself.
Format: Documentation/bpf/btf.rst. Types are parsed once into an index; members are decoded lazily.
"""

from __future__ import annotations

import struct
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, under

BTF_MAGIC = 0xEB9F
(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR,
 DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)

# Bytes that follow the 12-byte common header: fixed, or per vlen item.
_EXTRA_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_EXTRA_PER_ITEM = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_HDR = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")
_PARAM = struct.Struct("<II")


class Btf:
    def __init__(self, data: bytes, source: str = "BTF") -> None:
        if len(data) < _HDR.size:
            raise KernelFactError(f"malformed {source}: too short for a BTF header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(data)
        if magic != BTF_MAGIC:
            raise KernelFactError(f"malformed {source}: bad BTF magic {magic:#x}")
        self._data = data
        self._source = source
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # per type id: (kind, name_off, vlen, kind_flag, size_or_type, offset of the extra data)
        self._types: list[tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._parse(hdr_len + type_off, hdr_len + type_off + type_len)

    @classmethod
    def load(cls, root: Path = ROOT, path: Path | None = None) -> Btf:
        path = path or under(root, "/sys/kernel/btf/vmlinux")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KernelFactError(f"cannot read {path}: no such file (kernel built without "
                                  "CONFIG_DEBUG_INFO_BTF)") from None
        except OSError as e:
            raise KernelFactError(f"cannot read {path}: {e.strerror or e}") from None
        return cls(data, str(path))

    def _parse(self, pos: int, end: int) -> None:
        unpack = _TYPE.unpack_from
        data = self._data
        types = self._types
        indexed = {STRUCT, UNION, FUNC, TYPEDEF, ENUM, ENUM64}
        while pos < end:
            name_off, info, size_type = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            extra = pos + 12
            types.append((kind, name_off, vlen, info >> 31, size_type, extra))
            if kind in indexed and name_off:
                self._by_name.setdefault((kind, self._str(name_off)), len(types) - 1)
            pos = extra + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_ITEM.get(kind, 0) * vlen
        if pos != end:
            raise KernelFactError(f"malformed {self._source}: type section ends mid-record")

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _find(self, kind: int, name: str) -> int | None:
        return self._by_name.get((kind, name))

    def _skip_modifiers(self, type_id: int) -> int:
        while self._types[type_id][0] in (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG):
            type_id = self._types[type_id][4]
        return type_id

    # --- structs -----------------------------------------------------------------------------
    def struct_size(self, name: str) -> int | None:
        type_id = self._find(STRUCT, name)
        return None if type_id is None else self._types[type_id][4]

    def member_offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of ``member``, looking through anonymous unions/structs (as C does)."""
        type_id = self._find(STRUCT, struct_name)
        if type_id is None:
            return None
        bits = self._member_bits(type_id, member)
        return None if bits is None else bits // 8

    def _member_bits(self, type_id: int, member: str) -> int | None:
        _, _, vlen, kind_flag, _, extra = self._types[type_id]
        anonymous = []
        for i in range(vlen):
            name_off, mtype, offset = _MEMBER.unpack_from(self._data, extra + i * 12)
            bit_offset = offset & 0xFFFFFF if kind_flag else offset
            if name_off and self._str(name_off) == member:
                return bit_offset
            if not name_off:
                anonymous.append((bit_offset, self._skip_modifiers(mtype)))
        for bit_offset, inner in anonymous:
            if self._types[inner][0] in (STRUCT, UNION):
                found = self._member_bits(inner, member)
                if found is not None:
                    return bit_offset + found
        return None

    # --- functions ----------------------------------------------------------------------------
    def func_id(self, name: str) -> int | None:
        return self._find(FUNC, name)

    def func_params(self, name: str) -> list[tuple[str, str]] | None:
        proto = self._proto(name)
        if proto is None:
            return None
        _, _, vlen, _, _, extra = self._types[proto]
        params = []
        for i in range(vlen):
            name_off, ptype = _PARAM.unpack_from(self._data, extra + i * 8)
            params.append((self._str(name_off) if name_off else "", self.type_text(ptype)))
        return params

    def func_return(self, name: str) -> str | None:
        proto = self._proto(name)
        return None if proto is None else self.type_text(self._types[proto][4])

    def raw_tracepoint_params(self, event: str) -> list[str] | None:
        """Argument types of tracepoint ``event`` as a raw tracepoint program gets them (TP_PROTO), from
        its ``typedef void (*btf_trace_<event>)(void *, ...)``; None when BTF does not describe it."""
        typedef = self._find(TYPEDEF, f"btf_trace_{event}")
        if typedef is None:
            return None
        ptr = self._types[typedef][4]
        proto = self._types[ptr][4] if self._types[ptr][0] == PTR else 0
        if self._types[proto][0] != FUNC_PROTO:
            return None
        _, _, vlen, _, _, extra = self._types[proto]
        types = [self.type_text(_PARAM.unpack_from(self._data, extra + i * 8)[1]) for i in range(vlen)]
        return types[1:]  # the first is the probe's private data pointer

    def _proto(self, name: str) -> int | None:
        func = self.func_id(name)
        return None if func is None else self._types[func][4]

    def type_text(self, type_id: int) -> str:
        """C spelling of a type, e.g. ``const struct hstate *``."""
        kind, name_off, _, _, ref, _ = self._types[type_id]
        if type_id == 0:
            return "void"
        if kind == PTR:
            return f"{self.type_text(ref)} *".replace("* *", "**")
        if kind == CONST:
            return f"const {self.type_text(ref)}"
        if kind == VOLATILE:
            return f"volatile {self.type_text(ref)}"
        if kind in (RESTRICT, TYPE_TAG):
            return self.type_text(ref)
        if kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            word = {STRUCT: "struct", UNION: "union", FWD: "struct"}.get(kind, "enum")
            return f"{word} {self._str(name_off)}" if name_off else f"{word} <anon>"
        if kind == FUNC_PROTO:
            return "<function>"
        return self._str(name_off) if name_off else "<anon>"

    def enum_value(self, enum_name: str | None, member: str) -> int | None:
        """The value of an enumerator; ``enum_name`` None searches every enum."""
        for kind, name_off, vlen, _, _, extra in self._types:
            if kind != ENUM or (enum_name is not None and (not name_off or self._str(name_off) != enum_name)):
                continue
            for i in range(vlen):
                m_off, value = struct.unpack_from("<Ii", self._data, extra + i * 8)
                if self._str(m_off) == member:
                    return value
            if enum_name is not None:
                return None
        return None
