"""/proc/kallsyms: which functions the running kernel really has.

Static functions may be inlined away, or emitted as compiler clones (``name.isra.0``,
``name.constprop.0``, ``name.part.0``) whose arguments the compiler may have changed; ``.cold``
fragments are never entry points.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from observer.kernel.files import ROOT, read_text, under

_CLONE = re.compile(r"^(?P<base>[^.]+)(?P<suffix>(?:\.(?:isra|constprop|part|lto_priv)\.\d+)+)$")


@dataclass
class Kallsyms:
    # symbol -> (address, type letter); text symbols only matter for probes but data symbols
    # (e.g. vmemmap_base) are kept for address look-ups.
    symbols: dict[str, tuple[int, str]] = field(default_factory=dict)
    clones_of: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: Path = ROOT) -> Kallsyms:
        return cls.parse(read_text(under(root, "/proc/kallsyms")))

    @classmethod
    def parse(cls, text: str) -> Kallsyms:
        ks = cls()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[2].startswith("__pfx_"):
                continue  # padding symbols before functions (CONFIG_FUNCTION_PADDING)
            name = parts[2]
            try:
                ks.symbols.setdefault(name, (int(parts[0], 16), parts[1]))
            except ValueError:
                continue
            m = _CLONE.match(name)
            if m:
                ks.clones_of.setdefault(m["base"], []).append(name)
        return ks

    def has(self, name: str) -> bool:
        return name in self.symbols

    def clones(self, name: str) -> list[str]:
        return sorted(self.clones_of.get(name, []))

    def resolve(self, name: str) -> str | None:
        """The exact symbol, else its first compiler clone, else None (inlined or absent)."""
        if name in self.symbols:
            return name
        clones = self.clones(name)
        return clones[0] if clones else None

    def address(self, name: str) -> int | None:
        entry = self.symbols.get(name)
        return entry[0] if entry else None

    @property
    def addresses_visible(self) -> bool:
        """False when kptr_restrict hides addresses (all zero) from this reader."""
        return any(addr for addr, _ in self.symbols.values())
