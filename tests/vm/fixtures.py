"""pytest fixtures for QEMU guests, imported by tests/conftest.py.

- ``guest_kernel(name)``: the prepared GuestKernel (download/unpack/headers/cache), once per session.
- ``new_guest(kernel, **kw)``: boot a guest for this test only; stopped after the test.
- ``shared_guest(kernel, **kw)``: one guest per (kernel, settings) for the whole session, booted on
  first use and again if it died. A test using it must undo what it changes in the guest.
- ``guest_pool()``: a thread pool that runs independent guests PARALLEL_GUESTS at a time.

A per-kernel module fixture groups a module's tests by kernel (pytest orders by parameter)::

    @pytest.fixture(scope="module", params=KERNELS)
    def g(request, shared_guest):
        return shared_guest(request.param)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .guest import QEMU, Guest
from .kernels import GuestKernel, prepare_kernel

# A TCG guest compiling BPF (most of a guest test's time) keeps about one host core busy: on these
# 2-core machines two independent guests finish in about the time of one; more only slow each other.
PARALLEL_GUESTS = 2


@contextlib.contextmanager
def guest_pool() -> Iterator[ThreadPoolExecutor]:
    """Runs submitted guest jobs PARALLEL_GUESTS at a time; leaving waits for all of them. Prepare the
    kernels (prepare_kernel) before submitting: a job should only boot and run."""
    with ThreadPoolExecutor(PARALLEL_GUESTS, thread_name_prefix="guest") as pool:
        yield pool


@pytest.fixture(scope="session")
def guest_kernel() -> Callable[[str], GuestKernel]:
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86): no guests can boot")
    if os.geteuid() != 0:
        pytest.skip("QEMU guests need root: they share the whole host root over 9p")
    prepared: dict[str, GuestKernel] = {}

    def get(name: str) -> GuestKernel:
        if name not in prepared:
            prepared[name] = prepare_kernel(name)
        return prepared[name]

    return get


@pytest.fixture
def new_guest(guest_kernel: Callable[[str], GuestKernel], tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    started: list[Guest] = []

    def boot(kernel: str = "6.1", **settings: Any) -> Guest:
        g = Guest(guest_kernel(kernel), workdir=tmp_path / f"guest{len(started)}-{kernel}", **settings)
        started.append(g)
        return g.start()

    try:
        yield boot
    finally:
        for g in started:
            g.close()


@pytest.fixture(scope="session")
def shared_guest(
    guest_kernel: Callable[[str], GuestKernel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Guest]]:
    pool: dict[str, Guest] = {}

    def get(kernel: str = "6.1", **settings: Any) -> Guest:
        key = repr((kernel, sorted(settings.items())))
        g = pool.get(key)
        if g is None or not g.alive:
            if g is not None:
                g.close()
            workdir = tmp_path_factory.mktemp(f"shared-{re.sub(r'[^A-Za-z0-9.]', '_', kernel)}")
            g = pool[key] = Guest(guest_kernel(kernel), workdir=workdir, **settings)
            g.start()
        return g

    try:
        yield get
    finally:
        for g in pool.values():
            g.close()
