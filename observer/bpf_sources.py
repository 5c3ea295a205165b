"""Where the BPF C sources (``bpf/``) are: beside the ``observer`` package.

The application directory holds ``observer/``, ``exporters/`` and ``bpf/`` side by side, both in a
source tree and in the Debian package (``/usr/share/hvo-observer``), so the probes find their sources
without a checkout and without a search path.
"""

from __future__ import annotations

from pathlib import Path

from observer.errors import ObserverError

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


def bpf_source(name: str) -> Path:
    """The path of one BPF source file (``functions.bpf.c``, ``hvo_common.h``, ...)."""
    return BPF_DIR / name


def read_bpf_source(name: str) -> str:
    """The text of one BPF source file; a missing file is an installation error naming the path."""
    path = bpf_source(name)
    try:
        return path.read_text()
    except OSError as e:
        why = e.strerror or e
        raise ObserverError(f"cannot read BPF source {path}: {why} (broken installation)") from None
