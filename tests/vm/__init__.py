"""Test harness: stock Debian kernels booted under QEMU TCG, running commands over the host's root.

from tests.vm import Guest
with Guest("sid", mem_mb=2048, cmdline="hugetlb_free_vmemmap=on") as g:
    r = g.run("uname -r").check()
"""

from .guest import (
    DEFAULT_MASK,
    Guest,
    GuestBootError,
    GuestCommandError,
    GuestError,
    GuestResult,
    GuestTimeout,
    run_in_guest,
)
from .kernels import KERNELS, GuestKernel, prepare_kernel

__all__ = [
    "DEFAULT_MASK",
    "KERNELS",
    "Guest",
    "GuestBootError",
    "GuestCommandError",
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestTimeout",
    "prepare_kernel",
    "run_in_guest",
]
