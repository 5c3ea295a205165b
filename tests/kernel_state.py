"""Leave the machine as found: every test that changes pools or the HVO sysctl goes through this."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from observer.kernel import hugepages, sysctl


@contextmanager
def restored_kernel_state() -> Iterator[None]:
    """Snapshot nr_hugepages of every hstate and vm.hugetlb_optimize_vmemmap; put them back on exit,
    whatever happened (shrinking the pool first, then the sysctl, as an operator would)."""
    pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
    hvo = sysctl.read_hvo_sysctl()
    try:
        yield
    finally:
        for name, count in pools.items():
            hugepages.set_nr_hugepages(name, count)
        if hvo is not None:
            sysctl.write_hvo_sysctl(hvo)
