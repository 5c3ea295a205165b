"""Reading kernel interface files with errors that name the file."""

from pathlib import Path

from observer.errors import KernelFactError

ROOT = Path("/")


def under(root: Path, path: str) -> Path:
    """``path`` (absolute, like ``/proc/vmstat``) inside ``root``."""
    return root / path.lstrip("/")


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise KernelFactError(f"cannot read {path}: no such file") from None
    except PermissionError:
        raise KernelFactError(f"cannot read {path}: permission denied (run as root)") from None
    except OSError as e:
        raise KernelFactError(f"cannot read {path}: {e.strerror or e}") from None


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
