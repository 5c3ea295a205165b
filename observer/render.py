"""Small formatting helpers shared by the on-call commands (status, events, top, explain)."""

from __future__ import annotations

import time
from typing import Any

MIB = 1 << 20
# Offset to turn CLOCK_MONOTONIC (the BPF events' clock) into wall-clock time, taken once.
_MONO_TO_WALL_NS = time.time_ns() - time.monotonic_ns()


def mib(nbytes: int | float | None) -> str:
    """Bytes as MiB with two decimals (28 KiB -> '0.03'); signed when negative."""
    if nbytes is None:
        return "-"
    return f"{nbytes / MIB:.2f}"


def signed_mib(nbytes: int | float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / MIB:+.2f}"


def duration(ns: int | float | None) -> str:
    """'-' for none, else ns/us/ms/s with three significant digits."""
    if not ns:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{int(ns)}ns"


def clock(ts_ns: int | None = None, wall: float | None = None) -> str:
    """HH:MM:SS.mmm local time of a CLOCK_MONOTONIC event time, or of a wall-clock time in seconds."""
    if wall is None:
        wall = ((ts_ns or time.monotonic_ns()) + _MONO_TO_WALL_NS) / 1e9
    ms = round(wall * 1000)  # milliseconds are exact in a double for any realistic date
    secs, ms = divmod(ms, 1000)
    return time.strftime("%H:%M:%S", time.localtime(secs)) + f".{ms:03d}"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(seconds, 0)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


EVENT_HEADER = (f"{'TIME':<12} {'EVENT':<11} {'HSTATE':<10} {'NODE':>4} {'PFN':>12}  {'TASK':<24} "
                f"{'DURATION':>8}  RESULT")


def event_line(r: dict[str, Any]) -> str:
    """One event record of the daemon's API as a human line under EVENT_HEADER."""
    wall = r.get("unix_time")
    when = clock(wall=wall) if wall is not None else clock(r.get("ts_ns"))
    node = "-" if r.get("node") is None else str(r["node"])
    pfn = f"{r['pfn']:#x}" if r.get("pfn") else "-"
    task = f"{r.get('comm') or '?'}[{r['tgid']}]" if r.get("tgid") else "-"
    result = r.get("result", "?")
    if result == "error" and r.get("errno"):
        result += f" (errno {r['errno']})"
    if r.get("inferred"):
        result += " inferred"
    return (f"{when:<12} {r.get('event', '?'):<11} {r.get('hstate', '?'):<10} {node:>4} {pfn:>12}  "
            f"{task:<24} {duration(r.get('duration_ns')):>8}  {result}")
