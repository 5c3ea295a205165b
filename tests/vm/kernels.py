"""Stock Debian kernels for test guests: image, modules and headers of the newest kernel of a suite.

Everything is downloaded with apt (observer.kernel.debian_packages: URIs from the host's apt sources),
unpacked with ``dpkg-deb -x`` and cached under ``$HVO_CACHE_DIR/vm/kernels/<abi>-amd64/``; an unpacked
kernel is complete once its ``.complete`` stamp exists. Package layouts differ per generation:
bookworm ships ``linux-image-<abi>-amd64-unsigned`` with ``/boot/vmlinuz-*`` and ``/lib/modules``,
trixie the same merged into ``/usr/lib/modules``, sid 7.x ``linux-binary-<abi>-amd64`` (the image at
``usr/lib/modules/<release>/vmlinuz``) plus ``linux-modules-<abi>-amd64``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from observer.errors import ObserverError
from observer.kernel import debian_packages as deb

# Guest kernel name -> Debian suite whose newest generic amd64 kernel it is.
SUITES = {"6.1": "bookworm", "6.12": "trixie", "sid": "sid"}
KERNELS = tuple(SUITES)


@dataclass(frozen=True)
class GuestKernel:
    name: str  # "6.1", "6.12", "sid"
    suite: str
    abi: str  # "6.1.0-50", "7.2.13+deb14"
    release: str  # uname -r in the guest
    vmlinuz: Path
    modules: Path  # .../lib/modules/<release>, with modules.dep
    headers: Path  # merged header tree: the guest's BCC_KERNEL_SOURCE


def vm_cache_dir() -> Path:
    return deb.cache_dir() / "vm"


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise cache updates between concurrent test sessions (several engineers, one machine)."""
    path = vm_cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_kernel(name: str) -> GuestKernel:
    """The newest kernel of ``name``'s suite, unpacked (downloaded only when not cached yet)."""
    if name not in SUITES:
        raise ValueError(f"unknown guest kernel {name!r}: expected one of {', '.join(KERNELS)}")
    suite = SUITES[name]
    # Guest kernels are fixtures, unpacked and never installed: a frozen archive snapshot whose
    # testing/sid Release files are past their Valid-Until date must not stop the tests.
    os.environ[deb.ACCEPT_EXPIRED_ENV] = "1"
    with cache_lock(f"kernel-{name}"):
        abi, online = _resolve_abi(name, suite)
        root = vm_cache_dir() / "kernels" / f"{abi}-amd64"
        if online:
            apt = deb.AptSuite(suite)
            debs = apt.download(_image_packages(apt, abi), deb.cache_dir() / "debs" / suite)
            if _stamp(root) != [d.name for d in debs]:  # new, or a rebuild with the same ABI
                _unpack_kernel(apt, debs, root)
        headers = deb.prepare_headers(suite, abi)
    vmlinuz, modules = _locate(root)
    return GuestKernel(name, suite, abi, modules.name, vmlinuz, modules, headers)


def _resolve_abi(name: str, suite: str) -> tuple[str, bool]:
    """(ABI, True): the suite's newest ABI; offline (ABI, False): the one resolved last time, if cached."""
    memo = vm_cache_dir() / "kernels" / f"{name}.json"
    try:
        abi = deb.newest_kernel_abi(suite)
    except ObserverError as e:
        try:
            abi = json.loads(memo.read_text())["abi"]
        except (OSError, ValueError, KeyError):
            raise e from None
        if _stamp(vm_cache_dir() / "kernels" / f"{abi}-amd64") is None:
            raise e from None
        return abi, False
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"suite": suite, "abi": abi}) + "\n")
    return abi, True


def _image_packages(apt: deb.AptSuite, abi: str) -> list[str]:
    binary = f"linux-binary-{abi}-amd64"
    if apt.policy(binary):
        # linux-base carries config, System.map and modules.builtin (needed to tell built-in modules).
        return [binary, f"linux-modules-{abi}-amd64", f"linux-base-{abi}-amd64"]
    return [f"linux-image-{abi}-amd64-unsigned"]


def _stamp(root: Path) -> list[str] | None:
    """The .deb files a complete unpacked kernel was made of (None: missing or incomplete)."""
    try:
        return json.loads((root / ".complete").read_text())["debs"]
    except (OSError, ValueError, KeyError):
        return None


def _unpack_kernel(apt: deb.AptSuite, debs: list[Path], root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as tmp:
        tree = Path(tmp) / "tree"
        for f in debs:
            apt.extract(f, tree)
        _, modules = _locate(tree)
        _depmod(modules)
        (tree / ".complete").write_text(json.dumps({"debs": [d.name for d in debs]}) + "\n")
        if root.exists():  # an incomplete leftover of an interrupted run
            shutil.rmtree(root)
        tree.rename(root)


def _locate(tree: Path) -> tuple[Path, Path]:
    """(vmlinuz, modules directory) of an unpacked kernel."""
    candidates = (*tree.glob("lib/modules/*"), *tree.glob("usr/lib/modules/*"))
    mod_dirs = [d for d in candidates if (d / "kernel").is_dir()]
    if len(mod_dirs) != 1:
        raise ObserverError(f"expected one lib/modules/<release>/kernel in {tree}, found {len(mod_dirs)}")
    modules = mod_dirs[0]
    for vmlinuz in (modules / "vmlinuz", tree / "boot" / f"vmlinuz-{modules.name}"):
        if vmlinuz.is_file():
            return vmlinuz, modules
    raise ObserverError(f"no vmlinuz for {modules.name} in {tree}")


def _depmod(modules: Path) -> None:
    """Write modules.dep (not shipped in the packages: depmod runs at install time)."""
    base = modules.parent.parent.parent  # <base>/lib/modules/<release>
    proc = subprocess.run(
        [shutil.which("depmod") or "/usr/sbin/depmod", "-b", str(base), modules.name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (modules / "modules.dep").is_file():
        raise ObserverError(f"depmod for {modules}: {proc.stderr.strip() or 'no modules.dep written'}")
