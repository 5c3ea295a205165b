"""/proc/kallsyms: which functions the running kernel really has.

Static functions may be inlined away, or emitted as compiler clones (``name.isra.0``,
``name.constprop.0``, ``name.part.0``) whose arguments the compiler may have changed; ``.cold``
fragments are never entry points.

Without CAP_SYSLOG (the systemd unit drops it) the kernel shows every address as 0. The few
addresses the probes need are then taken from a file a privileged start-up step wrote this boot
(``hvo-observer kernel-addresses``, the unit's ExecStartPre=+); no address is ever guessed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_error, read_text, under

log = logging.getLogger(__name__)

KALLSYMS = "/proc/kallsyms"
ADDRESSES_FILE = "/run/hvo-observer/kernel-addresses"  # the unit's RuntimeDirectory
BOOT_ID = "/proc/sys/kernel/random/boot_id"

_NONZERO_ADDRESS = re.compile(r"^0*[1-9a-f]", re.M)
_CLONE = re.compile(r"^(?P<base>[^.]+)(?P<suffix>(?:\.(?:isra|constprop|part|lto_priv)\.\d+)+)$")


@dataclass
class Kallsyms:
    # symbol -> (address, type letter); text symbols only matter for probes but data symbols
    # (e.g. vmemmap_base) are kept for address look-ups.
    symbols: dict[str, tuple[int, str]] = field(default_factory=dict)
    clones_of: dict[str, list[str]] = field(default_factory=dict)
    visible: bool | None = None  # set by a parse of some symbols only, which cannot tell from those

    @classmethod
    def read(cls, root: Path = ROOT, only: Collection[str] | None = None) -> Kallsyms:
        return cls.parse(read_text(under(root, KALLSYMS)), only)

    @classmethod
    def parse(cls, text: str, only: Collection[str] | None = None) -> Kallsyms:
        """Every symbol, or with ``only`` just those (no clones): a scan of the text instead of
        splitting its 200,000 lines, for callers that need an address or two (tracepoint mode)."""
        if only is not None:
            wanted = re.compile(rf"^([0-9a-f]+) (\S) ({'|'.join(map(re.escape, only))})(?:[ \t]|$)", re.M)
            ks = cls(visible=_NONZERO_ADDRESS.search(text) is not None)
            for m in wanted.finditer(text):
                ks.symbols.setdefault(m[3], (int(m[1], 16), m[2]))
            return ks
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
        if self.visible is not None:
            return self.visible
        return any(addr for addr, _ in self.symbols.values())

    def fill_hidden(self, addresses: dict[str, int]) -> list[str]:
        """Give hidden (zero) addresses their recorded value; returns the names filled."""
        filled = []
        for name, addr in addresses.items():
            entry = self.symbols.get(name)
            if entry is not None and entry[0] == 0 and addr:
                self.symbols[name] = (addr, entry[1])
                filled.append(name)
        return filled


@dataclass(frozen=True)
class RecordedAddresses:
    """Kernel addresses recorded by a privileged process, valid for one boot only."""

    boot_id: str
    addresses: dict[str, int]

    def format(self) -> str:
        lines = ["# hvo-observer kernel-addresses: /proc/kallsyms addresses for the sandboxed daemon",
                 f"boot_id {self.boot_id}"]
        lines += [f"{addr:016x} {name}" for name, addr in self.addresses.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, path: Path) -> RecordedAddresses:
        boot_id: str | None = None
        addresses: dict[str, int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if boot_id is None:
                if len(parts) != 2 or parts[0] != "boot_id":
                    raise KernelFactError(f"malformed {path}: line {n}: expected 'boot_id <id>' first, "
                                          f"got {line[:60]!r}")
                boot_id = parts[1]
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                addresses[parts[1]] = int(parts[0], 16)
            except ValueError:
                raise KernelFactError(f"malformed {path}: line {n}: expected '<hex address> <symbol>', "
                                      f"got {line[:60]!r}") from None
        if boot_id is None:
            raise KernelFactError(f"malformed {path}: no boot_id line")
        return cls(boot_id, addresses)


def read_boot_id(root: Path = ROOT) -> str:
    return read_text(under(root, BOOT_ID)).strip()


def record_addresses(names: Iterable[str], root: Path = ROOT) -> RecordedAddresses:
    """The addresses of ``names`` (those the kernel has) as this process sees them: needs CAP_SYSLOG."""
    ks = Kallsyms.read(root)
    if not ks.addresses_visible:
        raise KernelFactError(f"{under(root, KALLSYMS)} shows every address as 0 to this process: run as "
                              "root with CAP_SYSLOG (and kernel.kptr_restrict below 2)")
    return RecordedAddresses(read_boot_id(root), {n: a for n in names if (a := ks.address(n))})


def load_kallsyms(root: Path = ROOT, recorded: str = ADDRESSES_FILE,
                  only: Collection[str] | None = None) -> Kallsyms:
    """/proc/kallsyms (``only`` some symbols: Kallsyms.parse), with hidden addresses filled from
    ``recorded`` when it is from this boot. Logs one line saying where the addresses came from."""
    ks = Kallsyms.read(root, only)
    if ks.addresses_visible:
        log.info("kernel addresses: from %s", KALLSYMS)
        return ks
    path = under(root, recorded)
    hidden = f"kernel addresses: {KALLSYMS} shows them as 0 (no CAP_SYSLOG)"
    try:
        text = path.read_text()
    except FileNotFoundError:
        log.warning("%s and there is no %s (written by 'hvo-observer kernel-addresses', the unit's "
                    "ExecStartPre): none available", hidden, path)
        return ks
    except OSError as e:
        log.warning("%s; ignoring the recorded ones: %s", hidden, read_error(path, e))
        return ks
    try:
        rec = RecordedAddresses.parse(text, path)
        boot_id = read_boot_id(root)
    except KernelFactError as e:
        log.warning("%s; ignoring the recorded ones: %s", hidden, e)
        return ks
    if rec.boot_id != boot_id:
        log.warning("%s; ignoring %s: recorded in boot %s, this is boot %s (stale)", hidden, path,
                    rec.boot_id, boot_id)
        return ks
    filled = ks.fill_hidden(rec.addresses)
    log.info("%s; %s from %s (recorded this boot)", hidden, ", ".join(filled) or "none", path)
    return ks
