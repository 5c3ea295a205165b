"""Leave the machine as found: every test that changes pools or the HVO sysctl goes through this."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from observer.kernel import hugepages, sysctl

# Live tests change the same pools: one at a time, across pytest sessions, chroots and developers too
# (hugepages.pools_lock). Re-entrant within one thread here.
_held = threading.local()


@contextmanager
def _pools_lock() -> Iterator[None]:
    """The machine-wide pools lock, re-entrant within one thread (a second flock of the same
    directory would wait for ourselves)."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    with hugepages.pools_lock():
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


@contextmanager
def restored_kernel_state() -> Iterator[None]:
    """Snapshot nr_hugepages of every hstate and vm.hugetlb_optimize_vmemmap; put them back on exit,
    whatever happened (shrinking the pool first, then the sysctl, as an operator would)."""
    with _pools_lock():
        pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
        hvo = sysctl.read_hvo_sysctl()
        try:
            yield
        finally:
            for name, count in pools.items():
                hugepages.set_nr_hugepages(name, count)
            if hvo is not None:
                sysctl.write_hvo_sysctl(hvo)
