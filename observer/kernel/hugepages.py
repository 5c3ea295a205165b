"""HugeTLB pools (hstates) from /sys/kernel/mm/hugepages and, per NUMA node, from
/sys/devices/system/node/node*/hugepages."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from observer.errors import KernelFactError, ObserverError
from observer.kernel.files import ROOT, read_int, under, write_text

HUGEPAGES = "/sys/kernel/mm/hugepages"
NODES = "/sys/devices/system/node"
_HSTATE_DIR = re.compile(r"^hugepages-(\d+)kB$")
_NODE_DIR = re.compile(r"^node(\d+)$")


@dataclass(frozen=True)
class NodePool:
    nr_hugepages: int
    free_hugepages: int
    surplus_hugepages: int


@dataclass(frozen=True)
class Hstate:
    name: str  # as sysfs names it: "2048kB"
    size_bytes: int
    order: int  # log2(size / base page size)
    nr_hugepages: int
    free_hugepages: int
    surplus_hugepages: int
    resv_hugepages: int
    nodes: dict[int, NodePool] = field(default_factory=dict)


def _order(size_bytes: int, page_size: int) -> int:
    return (size_bytes // page_size).bit_length() - 1


def read_hstates(root: Path = ROOT, page_size: int = 4096) -> list[Hstate]:
    """All hstates, smallest first. Empty when the kernel has no HugeTLB support."""
    base = under(root, HUGEPAGES)
    if not base.is_dir():
        return []
    per_node = _read_node_pools(root)
    hstates = []
    for entry in sorted(base.iterdir(), key=lambda p: _size_kb(p.name)):
        kb = _size_kb(entry.name)
        if kb < 0:
            continue
        hstates.append(Hstate(
            name=f"{kb}kB",
            size_bytes=kb * 1024,
            order=_order(kb * 1024, page_size),
            nr_hugepages=read_int(entry / "nr_hugepages"),
            free_hugepages=read_int(entry / "free_hugepages"),
            surplus_hugepages=read_int(entry / "surplus_hugepages"),
            resv_hugepages=read_int(entry / "resv_hugepages"),
            nodes=per_node.get(f"{kb}kB", {}),
        ))
    return hstates


def _size_kb(name: str) -> int:
    m = _HSTATE_DIR.match(name)
    return int(m[1]) if m else -1


def _read_node_pools(root: Path) -> dict[str, dict[int, NodePool]]:
    pools: dict[str, dict[int, NodePool]] = {}
    nodes = under(root, NODES)
    if not nodes.is_dir():
        return pools
    for node_dir in nodes.iterdir():
        m = _NODE_DIR.match(node_dir.name)
        if not m or not (node_dir / "hugepages").is_dir():
            continue
        for entry in (node_dir / "hugepages").iterdir():
            if _size_kb(entry.name) < 0:
                continue
            pools.setdefault(entry.name.removeprefix("hugepages-"), {})[int(m[1])] = NodePool(
                nr_hugepages=read_int(entry / "nr_hugepages"),
                free_hugepages=read_int(entry / "free_hugepages"),
                surplus_hugepages=read_int(entry / "surplus_hugepages"),
            )
    return pools


def hstate_dir(name: str, root: Path = ROOT, node: int | None = None) -> Path:
    if node is None:
        path = under(root, f"{HUGEPAGES}/hugepages-{name}")
    else:
        path = under(root, f"{NODES}/node{node}/hugepages/hugepages-{name}")
    if not path.is_dir():
        raise ObserverError(f"no hstate {name!r}{'' if node is None else f' on node {node}'} ({path})")
    return path


def set_nr_hugepages(name: str, count: int, root: Path = ROOT, node: int | None = None) -> int:
    """Ask the kernel for ``count`` pages; returns what it really has afterwards (it may give fewer)."""
    path = hstate_dir(name, root, node) / "nr_hugepages"
    write_text(path, f"{count}\n")
    return read_int(path)


def by_name(hstates: list[Hstate], name: str) -> Hstate:
    for h in hstates:
        if h.name == name:
            return h
    have = ", ".join(h.name for h in hstates) or "none"
    raise KernelFactError(f"no hstate {name!r}; this kernel has {have}")


@contextlib.contextmanager
def pools_lock(root: Path = ROOT) -> Iterator[None]:
    """Hold the machine-wide lock of whoever resizes pools on purpose (the live tests, the bench).

    The lock is an flock on the sysfs directory of the pools itself: every mount namespace, chroot
    or container on this kernel that can see the pools sees that same directory, so two runs in
    different roots wait for each other, which a lock file under /run would not do. Waits, saying so
    on stderr, while another holder has it. Not re-entrant: a second open of the directory would wait
    for ourselves.
    """
    path = under(root, HUGEPAGES)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ObserverError(f"cannot open {path} to lock the pools: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for the pools lock ({path}): a test or a bench resizes pools", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
