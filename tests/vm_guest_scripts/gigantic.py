"""Growing the 1 GiB pool at runtime inside a test guest: one helper for every guest script.

A runtime 1 GiB page needs an aligned GiB that alloc_contig_range can empty. It fails now and then
on pages it cannot migrate at once (fresh page cache, per-CPU lists) and, on kernels that leak bad
pages (Debian 6.12 when optimized pages are restored or demoted), on GiBs those leaks poisoned.
Compaction, then dropping caches, usually frees another one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from observer.kernel import hugepages

H1G = "1048576kB"
ATTEMPTS = 4


def grow_1g(target: int, root: Path = Path("/")) -> dict[str, Any]:
    """Ask for TARGET 1 GiB pages, compacting (and from the second miss dropping caches) between
    attempts: {"attempts", "got"}, plus "impossible": True when the kernel never gave them all."""
    got = 0
    for attempt in range(1, ATTEMPTS + 1):
        got = hugepages.set_nr_hugepages(H1G, target, root)
        if got >= target:
            return {"attempts": attempt, "got": got}
        Path("/proc/sys/vm/compact_memory").write_text("1\n")
        if attempt >= 2:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return {"attempts": ATTEMPTS, "got": got, "impossible": True}
