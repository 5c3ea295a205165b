"""The guest initramfs: static busybox, ``/init`` (init.sh) and the 9p/virtio/overlay modules.

Modules are stored decompressed (busybox insmod cannot read .ko.xz/.ko.zst) and listed in
``/modules.order`` so that each one comes after everything it depends on (from modules.dep).
One archive per kernel release and content hash, cached under ``$HVO_CACHE_DIR/vm/initramfs/``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

from observer.errors import ObserverError

from .kernels import GuestKernel, cache_lock, vm_cache_dir

BUSYBOX = Path("/bin/busybox")
INIT = Path(__file__).with_name("init.sh")
# What init needs: the virtio PCI transport, 9p over virtio, and overlayfs for systemd/overlay mode.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def build_initramfs(kernel: GuestKernel) -> Path:
    """The cached initramfs (uncompressed newc cpio) for ``kernel``; built when missing."""
    busybox = _static_busybox()
    order = module_load_order(kernel.modules, MODULES)
    digest = hashlib.sha256()
    parts = [INIT.read_bytes(), busybox.read_bytes(), *((kernel.modules / m).read_bytes() for m in order)]
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    out = vm_cache_dir() / "initramfs" / f"{kernel.release}-{digest.hexdigest()[:12]}.cpio"
    with cache_lock(f"initramfs-{kernel.release}"):
        if not out.is_file():
            _build(kernel.modules, order, busybox, out)
            for old in out.parent.glob(f"{kernel.release}-*.cpio"):
                if old != out:  # QEMU reads -initrd at start: running guests do not need it
                    old.unlink()
    return out


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` and their dependencies, dependencies first.

    Modules built into the kernel (modules.builtin) are left out.
    """
    deps: dict[str, list[str]] = {}
    for line in _read(modules_dir / "modules.dep").splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    builtin = {_module_name(p) for p in _read(modules_dir / "modules.builtin").split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise ObserverError(f"kernel module {name} is neither in {modules_dir}/modules.dep nor built in")
        visit(by_name[name])
    return order


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ObserverError(f"cannot read {path}: {e.strerror or e}") from None


def _static_busybox() -> Path:
    """The host's busybox, which must be static: the initramfs has no libc."""
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        raise ObserverError(f"{BUSYBOX} is missing: apt-get install busybox-static") from None
    if _has_interpreter(data):
        raise ObserverError(f"{BUSYBOX} is dynamically linked: apt-get install busybox-static")
    return BUSYBOX


def _has_interpreter(elf: bytes) -> bool:
    """True when a 64-bit little-endian ELF has a PT_INTERP program header (dynamic linking)."""
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _decompress(src: Path) -> bytes:
    name = src.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(src.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(src.read_bytes())
    if name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dcq", str(src)], capture_output=True, check=False)
        if proc.returncode != 0:
            detail = proc.stderr.decode().strip()
            raise ObserverError(f"cannot decompress {src} (is zstd installed?): {detail}")
        return proc.stdout
    return src.read_bytes()


def _build(modules_dir: Path, order: list[str], busybox: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage-") as tmp:
        stage = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "modules"):
            (stage / d).mkdir(parents=True)
        (stage / "bin/busybox").write_bytes(busybox.read_bytes())
        (stage / "bin/busybox").chmod(0o755)
        (stage / "init").write_bytes(INIT.read_bytes())
        (stage / "init").chmod(0o755)
        names = []
        for rel in order:
            name = _module_name(rel) + ".ko"
            (stage / "modules" / name).write_bytes(_decompress(modules_dir / rel))
            names.append(name)
        (stage / "modules.order").write_text("\n".join(names) + "\n")
        # The kernel opens /dev/console for init before anything is mounted; without root the node
        # cannot be made, and init reopens /dev/console once devtmpfs is mounted.
        with contextlib.suppress(PermissionError):
            os.mknod(stage / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        partial = Path(tmp) / "initramfs.cpio"
        with partial.open("wb") as f:
            proc = subprocess.run(
                ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                input="\n".join(files).encode(),
                stdout=f,
                stderr=subprocess.PIPE,
                cwd=stage,
                check=False,
            )
        if proc.returncode != 0:
            raise ObserverError(f"cpio failed building {out}: {proc.stderr.decode().strip()}")
        partial.replace(out)
