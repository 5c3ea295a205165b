"""Kernel lockdown (securityfs): ``confidentiality`` forbids reading kernel memory from BPF
tracing programs on some kernels, and fentry loads here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from observer.kernel.files import ROOT, read_text, under

LOCKDOWN = "/sys/kernel/security/lockdown"


def parse_lockdown(text: str) -> str | None:
    """``none integrity [confidentiality]`` -> ``confidentiality``."""
    m = re.search(r"\[(\w+)\]", text)
    return m[1] if m else None


def read_lockdown(root: Path = ROOT) -> str | None:
    path = under(root, LOCKDOWN)
    if not path.exists() and root == ROOT and Path("/sys/kernel/security").is_dir():
        # securityfs is not mounted on minimal systems; mounting it changes nothing else.
        subprocess.run(["mount", "-t", "securityfs", "none", "/sys/kernel/security"],
                       capture_output=True, check=False)
    if not path.exists():
        return None  # no LSM lockdown in this kernel
    return parse_lockdown(read_text(path))
