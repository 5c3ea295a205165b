"""The systemd notification protocol (sd_notify(3)) without libsystemd: one datagram per message to
$NOTIFY_SOCKET. Outside systemd (no NOTIFY_SOCKET) every call is a no-op."""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr  # "@name": abstract namespace


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ... in one datagram; True when sent."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(assignments).encode())
        return True
    except OSError:
        return False  # the manager went away: nothing useful to do about it


def watchdog_seconds() -> float | None:
    """The watchdog timeout systemd expects us to beat (WatchdogSec=), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
