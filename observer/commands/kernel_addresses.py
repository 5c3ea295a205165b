"""``hvo-observer kernel-addresses``: record the kernel addresses the probes need, for a daemon that
cannot see them.

The systemd unit drops CAP_SYSLOG, so /proc/kallsyms shows the daemon every address as 0. Its
``ExecStartPre=+`` (full privileges) runs this command to write just those addresses (the probes'
``ADDRESS_SYMBOLS``) with this boot's id into the unit's RuntimeDirectory; the daemon fills the hidden
addresses from that file and ignores one from an earlier boot.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from observer.errors import ObserverError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Record the kernel addresses the fentry/kprobe probes need (from /proc/kallsyms, which needs "
        "CAP_SYSLOG) with this boot's id, for the sandboxed daemon. The systemd unit runs it as "
        "ExecStartPre=+. Prints the record without --write.")
    parser.add_argument("--write", metavar="FILE", type=Path,
                        help="write the record to FILE (mode 0600, replaced atomically)")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only; readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ObserverError(f"cannot write {path}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    from observer.kernel.kallsyms import record_addresses
    from observer.probes.functions import ADDRESS_SYMBOLS
    from observer.probes.page_pfn import KERNEL_TEXT

    # and the kernel's text: whether this boot randomized the memory layout (page_pfn.layout_randomized)
    wanted = (*ADDRESS_SYMBOLS, KERNEL_TEXT)
    rec = record_addresses(wanted)
    if args.write is None:
        print(rec.format(), end="")
        return 0
    write_private(args.write, rec.format())
    missing = [n for n in wanted if n not in rec.addresses]
    print(f"recorded {', '.join(rec.addresses) or 'no addresses'} in {args.write}"
          + (f" (not in this kernel: {', '.join(missing)})" if missing else ""))
    return 0
