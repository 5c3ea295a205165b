"""tracefs: event existence and formats. gfp bit values come from mm_page_alloc's print format,
because they changed across kernel versions and no header here matches the running kernel."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from observer.errors import KernelFactError
from observer.kernel.files import ROOT, read_int, read_text, under

TRACEFS = "/sys/kernel/tracing"
_DEBUGFS_TRACING = "/sys/kernel/debug/tracing"


def tracefs_dir(root: Path = ROOT) -> Path | None:
    for candidate in (TRACEFS, _DEBUGFS_TRACING):
        path = under(root, candidate)
        try:
            if (path / "events").is_dir():
                return path
        except PermissionError:
            raise KernelFactError(f"cannot read {path}: permission denied (run as root)") from None
    return None


def ensure_tracefs(root: Path = ROOT) -> Path:
    """The tracefs directory, mounting tracefs at /sys/kernel/tracing when it is not mounted."""
    found = tracefs_dir(root)
    if found is not None:
        return found
    if root == ROOT:
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True,
                           text=True, check=False)
        found = tracefs_dir(root)
        if found is not None:
            return found
        raise KernelFactError(f"cannot mount tracefs at {TRACEFS}: {r.stderr.strip() or 'mount failed'}")
    raise KernelFactError(f"no tracefs under {root}")


def event_exists(system: str, name: str, root: Path = ROOT) -> bool:
    base = tracefs_dir(root)
    return base is not None and (base / "events" / system / name / "format").exists()


def event_id(system: str, name: str, root: Path = ROOT) -> int:
    """The tracepoint's id, as perf_event_open(2) takes it."""
    base = ensure_tracefs(root)
    return read_int(base / "events" / system / name / "id")


def event_format(system: str, name: str, root: Path = ROOT) -> str:
    base = ensure_tracefs(root)
    return read_text(base / "events" / system / name / "format")


# One flag per entry: {( unsigned long)(( gfp_t)((((1UL))) << (18))), "__GFP_COMP"}  (6.10+)
#                 or: {(unsigned long)((__force gfp_t)0x40000u), "__GFP_COMP"}       (older)
_FLAG = re.compile(r"\{\s*\(\s*unsigned long\s*\)(?P<expr>[^{}]*?),\s*\"(?P<name>__GFP_\w+)\"\s*\}")
_CAST = r"^[\s(]*(?:\(\s*(?:__force\s+)?gfp_t\s*\)\s*)?"
_SHIFT = re.compile(_CAST + r"[\s(]*1UL[\s)]*<<\s*\(?\s*(\d+)\s*\)?[\s)]*$")
_HEX = re.compile(_CAST + r"(0x[0-9a-fA-F]+|\d+)u?[\s)]*$")


def gfp_flags(format_text: str) -> dict[str, int]:
    """``{"__GFP_COMP": 1 << 18, ...}`` from a tracepoint format that prints gfp flags."""
    flags: dict[str, int] = {}
    for m in _FLAG.finditer(format_text):
        expr = m["expr"]
        if (s := _SHIFT.match(expr)) is not None:
            flags[m["name"]] = 1 << int(s[1])
        elif (h := _HEX.match(expr)) is not None:
            flags[m["name"]] = int(h[1], 0)
    return flags
