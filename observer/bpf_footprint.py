"""What a process's BPF maps cost at a given number of possible CPUs, and what reading the
aggregates costs: the ``bench`` figures for hosts with hundreds of CPUs, measured on a small one.

A per-CPU map holds one value per *possible* CPU (not online: a host with 384 possible CPUs pays 384
copies even with fewer CPUs online), and a batch read copies all of them to user space. The kernel's
own accounting of each map (``memlock`` in /proc/<pid>/fdinfo/<fd>) is for this machine's CPUs; the
per-CPU part is recomputed from the map's value size and entries, as the kernel sizes it
(round_up(value_size, 8) per CPU per entry).
"""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from observer.errors import ObserverError

BIG_HOST_CPUS = 384
# enum bpf_map_type values of per-CPU maps (include/uapi/linux/bpf.h)
PERCPU_MAP_TYPES = {5: "percpu_hash", 6: "percpu_array", 10: "lru_percpu_hash", 21: "percpu_cgroup_storage"}


@dataclass(frozen=True)
class MapInfo:
    map_id: int
    map_type: int
    value_size: int
    max_entries: int
    memlock: int  # the kernel's accounting, for this machine's possible CPUs

    @property
    def per_cpu(self) -> bool:
        return self.map_type in PERCPU_MAP_TYPES

    def bytes_at(self, cpus: int) -> int:
        """Kernel memory of the map with ``cpus`` possible CPUs."""
        if self.per_cpu:
            return (self.value_size + 7) // 8 * 8 * self.max_entries * cpus
        return self.memlock


def parse_fdinfo(text: str) -> MapInfo | None:
    """A map's fdinfo, or None when the text is not a BPF map's."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return MapInfo(int(fields["map_id"]), int(fields["map_type"]), int(fields["value_size"]),
                       int(fields["max_entries"]), int(fields.get("memlock", "0")))
    except (KeyError, ValueError):
        return None


def process_maps(pid: int, proc: Path = Path("/proc")) -> list[MapInfo]:
    """The BPF maps process ``pid`` holds file descriptors of (each map once)."""
    maps: dict[int, MapInfo] = {}
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError as e:
        raise ObserverError(f"cannot list {fd_dir}: {e.strerror or e}") from None
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) != "anon_inode:bpf-map":
                continue
            info = parse_fdinfo((proc / str(pid) / "fdinfo" / fd).read_text())
        except OSError:
            continue  # closed meanwhile
        if info is not None:
            maps[info.map_id] = info
    return sorted(maps.values(), key=lambda m: m.map_id)


def map_memory(maps: list[MapInfo], cpus: int = BIG_HOST_CPUS) -> int:
    """Bytes of kernel memory of these maps with ``cpus`` possible CPUs."""
    return sum(m.bytes_at(cpus) for m in maps)


class AggregateReads:
    """The daemon's aggregate read (observer.probes.session.ProbeSession.aggregates) fed to a model,
    for ``hstate_orders``' layout: per call both arrays are copied to Python integers and decoded,
    a few slots having moved (so the model changes and /metrics is encoded anew, as while the kernel
    is busy), and the model observes the totals. The arrays are shared by all CPUs (bpf/hvo_common.h):
    a read copies one value per slot however many CPUs the host has."""

    def __init__(self, hstate_orders: tuple[int, ...] = (9, 18)) -> None:
        from observer.probes.aggregates import AggregateLayout

        self.layout = AggregateLayout(hstate_orders)
        rng = random.Random(2)
        # every slot of every hstate in use; none for pages of an order no hstate has
        real_counts = len(hstate_orders) * self.layout.count_slots // self.layout.hstate_slots
        real_hist = len(hstate_orders) * self.layout.hist_slots // self.layout.hstate_slots
        self._counts = array("Q", (rng.randrange(1 << 20) if i < real_counts else 0
                                   for i in range(self.layout.count_slots)))
        self._hist = array("Q", (rng.randrange(1 << 20) if i < real_hist else 0
                                 for i in range(self.layout.hist_slots)))
        self._n = 0

    def __call__(self, model: object) -> None:
        from observer.probes.aggregates import Aggregates

        self._n += 1
        self._counts[self._n % (len(self._counts) // self.layout.hstate_slots)] += 1
        self._hist[self._n % (len(self._hist) // self.layout.hstate_slots)] += 1
        counts = self.layout.decode_counts(memoryview(self._counts).tolist())
        hist = self.layout.decode_hist(memoryview(self._hist).tolist())
        model.observe(model.snapshot, Aggregates(counts, hist, 0))  # type: ignore[attr-defined]
