"""Reading kernel interface files with errors that name the file."""

import os
from pathlib import Path

from observer.errors import KernelFactError

ROOT = Path("/")


def under(root: Path, path: str) -> Path:
    """``path`` (absolute, like ``/proc/vmstat``) inside ``root``."""
    return root / path.lstrip("/")


def read_error(path: Path, e: OSError) -> KernelFactError:
    """The one wording of "cannot read FILE: why" for every reader."""
    if isinstance(e, FileNotFoundError):
        return KernelFactError(f"cannot read {path}: no such file")
    if isinstance(e, PermissionError):
        return KernelFactError(f"cannot read {path}: permission denied (run as root)")
    return KernelFactError(f"cannot read {path}: {e.strerror or e}")


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise read_error(path, e) from None


def open_readonly(path: Path) -> int:
    """A file descriptor for pread-style readers (e.g. /proc/kpageflags)."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise read_error(path, e) from None


def read_int(path: Path) -> int:
    text = read_text(path).strip()
    try:
        return int(text, 0)
    except ValueError:
        raise KernelFactError(f"malformed {path}: expected an integer, got {text[:40]!r}") from None


def write_text(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise KernelFactError(f"cannot write {value.strip()!r} to {path}: {e.strerror or e}") from None
