"""Command-line entry point: ``hvo-observer <command>``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules are imported to build the parser, so they import bcc and other heavy modules only
inside ``run``: ``doctor`` never pays for bcc.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from observer import __version__
from observer.errors import ObserverError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("observer.doctor", "report what this kernel supports and what HVO frees per hstate"),
    "run": ("observer.daemon", "run the daemon: probes, reconciler, /metrics and the JSON API"),
    "status": ("observer.commands.status", "one screen: pools, optimized pages, savings, drift"),
    "events": ("observer.commands.events", "stream HVO events (from the daemon, or own probes)"),
    "top": ("observer.commands.top", "live full-screen view of rates, latency and savings"),
    "explain": ("observer.commands.explain", "why savings differ from what the geometry promises"),
    "bench": ("observer.bench", "run the benchmarks and print figures"),
    "kernel-addresses": ("observer.commands.kernel_addresses",
                         "record the kernel addresses the probes need (systemd ExecStartPre=+)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, names the flag, exit 2
        self.exit(2, f"hvo-observer: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvo-observer",
                     description="Live eBPF observer of the kernel's HugeTLB Vmemmap Optimization (HVO).")
    parser.add_argument("--version", action="version", version=f"hvo-observer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # blame the command the flag was given to, so its --help is the one suggested
        command = getattr(args, "command", None)
        culprit = parser.commands.get(command, parser) if command else parser
        culprit.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ObserverError as e:
        print(f"hvo-observer: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
