"""Daemon logging: one line per record on stderr, journald-friendly.

Under systemd (stderr is the journal: $JOURNAL_STREAM names its device:inode) each line starts with
a ``<N>`` syslog priority, which journald turns into the record's priority, and carries no timestamp
of its own; elsewhere lines start with the time and the level. Newlines inside a message (e.g. a
compiler log) are escaped so one record never spans lines.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _to_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(ino) and f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class OneLineFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__("%(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # includes the traceback, if any
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {text}"
        return text


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what C libraries (bcc, clang, libbpf) write straight to file descriptor 2, so that it can
    be logged as one line instead of breaking the one-line-per-record rule. Our own records keep
    going out: setup() gave the handler its own descriptor for the real stderr."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode("utf-8", "replace").splitlines())


def setup(level: str = "info") -> None:
    # A descriptor of our own: captured_stderr() redirects fd 2 without swallowing our records.
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, closefd=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(_to_journal()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
