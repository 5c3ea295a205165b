"""Kernel build configuration from /proc/config.gz or /boot/config-<release>."""

from __future__ import annotations

import gzip
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_text, under


def parse_kconfig(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value.strip().strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-11]] = "n"
    return config


def read_kconfig(root: Path = ROOT, release: str | None = None) -> dict[str, str] | None:
    """The config, or None when the kernel publishes none (no IKCONFIG_PROC, no /boot file)."""
    proc = under(root, "/proc/config.gz")
    if proc.exists():
        try:
            return parse_kconfig(gzip.decompress(proc.read_bytes()).decode())
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise KernelFactError(f"cannot read {proc}: {e}") from None
    if release:
        boot = under(root, f"/boot/config-{release}")
        if boot.exists():
            return parse_kconfig(read_text(boot))
    return None


def enabled(config: dict[str, str] | None, key: str) -> bool | None:
    """True/False when the config says, None when there is no config to ask."""
    if config is None:
        return None
    return config.get(key, "n") in ("y", "m")
