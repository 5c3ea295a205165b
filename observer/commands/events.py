"""``hvo-observer events``: HVO events as human lines or JSON lines, filtered.

From the running daemon (its recent-event ring, then its live stream with ``--follow``). With no
daemon, this command attaches its own probes for the session (root needed), prints events as they
happen and detaches on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from observer import render
from observer.client import DaemonClient, DaemonUnavailable, add_daemon_argument, client_from
from observer.errors import ObserverError
from observer.probes.events import EventType, Result

EVENT_NAMES = tuple(e.label for e in EventType)
RESULT_NAMES = tuple(r.label for r in Result)
RING_LIMIT = 10000  # the API's per-request maximum
COMM_LEN = 15  # the kernel keeps TASK_COMM_LEN - 1 characters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "HVO events, one per line: time, event, hstate, node, pfn, task, duration, result. From the "
        "daemon's recent events (and its live stream with --follow); with no daemon, attaches its own "
        "probes for the session (root) and streams until Ctrl-C.")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they happen")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--event", metavar="NAME[,NAME...]",
                        help=f"only these events: {', '.join(EVENT_NAMES)}")
    parser.add_argument("--hstate", metavar="SIZE", help="only this hstate, e.g. 2048kB (or 2M, 1G)")
    parser.add_argument("--node", metavar="N", help="only this NUMA node")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--pid", metavar="PID", help="only events of this process (tgid) or thread")
    who.add_argument("--comm", metavar="NAME", help="only events of tasks with this command name")
    parser.add_argument("--result", metavar="R[,R...]", help=f"only these results: {', '.join(RESULT_NAMES)}")
    parser.add_argument("-n", "--lines", type=int, metavar="N",
                        help="show the last N recent events first (default: all the daemon keeps; "
                             "0 with --follow)")
    parser.add_argument("--mode", default="auto", choices=("auto", "fentry", "kprobe", "tracepoint"),
                        help="probe mode when attaching own probes (no daemon); default auto")
    add_daemon_argument(parser)


# --- filters ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventFilter:
    events: frozenset[str] | None = None
    hstate: str | None = None
    node: int | None = None
    pid: int | None = None
    comm: str | None = None
    results: frozenset[str] | None = None

    def matches(self, r: dict[str, Any]) -> bool:
        return ((self.events is None or r.get("event") in self.events)
                and (self.hstate is None or r.get("hstate") == self.hstate)
                and (self.node is None or r.get("node") == self.node)
                and (self.pid is None or self.pid in (r.get("tgid"), r.get("tid")))
                and (self.comm is None or r.get("comm") == self.comm)
                and (self.results is None or r.get("result") in self.results))


def _names(value: str, flag: str, known: tuple[str, ...], what: str) -> frozenset[str]:
    names = [v.strip().lower() for v in value.split(",")]
    for n in names:
        if n not in known:
            raise ObserverError(f"bad {flag} {value!r}: unknown {what} {n!r} "
                                f"(choose from {', '.join(known)})")
    return frozenset(names)


def hstate_name(value: str) -> str | None:
    """'2048kB', '2M', '2MB', '2MiB', '1G' -> sysfs name ('2048kB'); None when not a size."""
    from observer.kernel.cmdline import parse_size

    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    size = parse_size(text) if text and text[0].isdigit() else None
    if not size or size % 1024:
        return None
    return f"{size // 1024}kB"


def make_filter(args: argparse.Namespace, hstates: list[str], nodes: list[int]) -> EventFilter:
    """Validated filters; ``hstates``/``nodes`` are those of the observed kernel."""
    events = _names(args.event, "--event", EVENT_NAMES, "event") if args.event else None
    results = _names(args.result, "--result", RESULT_NAMES, "result") if args.result else None
    hstate = None
    if args.hstate is not None:
        hstate = hstate_name(args.hstate)
        if hstate not in hstates:
            raise ObserverError(f"bad --hstate {args.hstate!r}: this kernel's hstates are "
                                f"{', '.join(hstates)}")
    node = None
    if args.node is not None:
        if not args.node.isdigit() or int(args.node) not in nodes:
            raise ObserverError(f"bad --node {args.node!r}: this host's NUMA nodes are "
                                f"{', '.join(map(str, nodes))}")
        node = int(args.node)
    pid = None
    if args.pid is not None:
        if not args.pid.isdigit() or int(args.pid) <= 0:
            raise ObserverError(f"bad --pid {args.pid!r}: expected a process id (a positive integer)")
        pid = int(args.pid)
    comm = None
    if args.comm is not None:
        if not args.comm:
            raise ObserverError("bad --comm '': expected a command name")
        comm = args.comm[:COMM_LEN]
    if args.lines is not None and args.lines < 0:
        raise ObserverError(f"bad --lines {args.lines}: expected 0 or more")
    return EventFilter(events, hstate, node, pid, comm, results)


# --- output -------------------------------------------------------------------------------------
class Printer:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.header_done = as_json

    def emit(self, records: Iterable[dict[str, Any]]) -> None:
        out = []
        for r in records:
            if not self.header_done:
                out.append(render.EVENT_HEADER)
                self.header_done = True
            if self.as_json:
                out.append(json.dumps({k: v for k, v in r.items() if k != "type"}, separators=(",", ":")))
            else:
                out.append(render.event_line(r))
        if out:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()


def note(msg: str) -> None:
    print(f"hvo-observer: {msg}", file=sys.stderr, flush=True)


# --- from the daemon ----------------------------------------------------------------------------
def _kernel_shape(doc: dict[str, Any]) -> tuple[list[str], list[int]]:
    hstates = [h["name"] for h in doc.get("hstates", [])]
    nodes = sorted({n["node"] for h in doc.get("hstates", []) for n in h.get("nodes", [])}) or [0]
    return hstates, nodes


def _recent(client: DaemonClient, flt: EventFilter) -> tuple[list[dict[str, Any]], int]:
    """Every matching event in the daemon's ring, and the sequence number to follow from."""
    found: list[dict[str, Any]] = []
    since = 0
    while True:
        batch = client.get("/events", {"since": since, "limit": RING_LIMIT})
        records = batch.get("events", [])
        found.extend(r for r in records if flt.matches(r))
        nxt = int(batch.get("next", since))
        if nxt <= since or not records:
            return found, nxt
        since = nxt


def from_daemon(client: DaemonClient, args: argparse.Namespace, flt: EventFilter, printer: Printer) -> int:
    lines = args.lines if args.lines is not None else (0 if args.follow else None)
    seq = None  # follow from now, unless a backlog was printed: then from right after it
    if lines != 0:
        backlog, seq = _recent(client, flt)
        if lines is not None:
            backlog = backlog[-lines:]
        printer.emit(backlog)
        if not backlog and not args.follow:
            note(f"no matching events among the recent ones the daemon at {client.addr} keeps "
                 "(--follow waits for new ones)")
    if not args.follow:
        return 0
    stream = client.stream("/stream", {"since": seq})
    note(f"following events from the daemon at {client.addr} (Ctrl-C to stop)")
    for item in stream:
        kind = item.get("type")
        if kind == "event" and flt.matches(item):
            printer.emit([item])
        elif kind == "missed":
            note(f"{item.get('count')} event(s) left the daemon's ring before this reader got them")
    raise ObserverError(f"the daemon at {client.addr} closed the stream (stopped or restarted?)")


# --- own probes (no daemon) ---------------------------------------------------------------------
def with_own_probes(args: argparse.Namespace, printer: Printer, why: str) -> int:
    from observer.kernel.facts import gather
    from observer.probes.events import Event
    from observer.probes.session import ProbeSession

    facts = gather()
    hstates = facts.hstates()
    nodes = sorted({n for h in hstates for n in h.nodes}) or [0]
    flt = make_filter(args, [h.name for h in hstates], nodes)
    by_order = {h.order: h.name for h in hstates}
    if not _may_trace():
        raise ObserverError(f"{why}; attaching own probes instead needs root (or CAP_BPF and CAP_PERFMON): "
                            "run as root, or start the daemon")
    if args.lines:
        note("--lines needs the daemon's recent events; showing live events only")
    note(f"{why}; attaching own probes for this session (Ctrl-C to stop)")

    pending: list[Event] = []  # filled from bcc callbacks, printed from the loop (no I/O in callbacks)
    stop: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ProbeSession(args.mode, facts, pending.append) as session:
            attached = sum(a.ok for a in session.attachments)
            note(f"mode {session.mode}: {attached}/{len(session.attachments)} probes attached")
            while not stop:
                session.poll(100)
                if pending:
                    batch, pending[:] = list(pending), []
                    printer.emit(r for r in map(lambda e: _record(e, by_order, facts.page_size), batch)
                                 if flt.matches(r))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    note("probes detached")
    return 0


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def _may_trace() -> bool:
    """Whether this process may load and attach BPF tracing programs (its effective capabilities)."""
    try:
        status = Path("/proc/self/status").read_text()
        caps = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    except (OSError, ValueError, StopIteration, IndexError):
        return os.geteuid() == 0
    return bool(caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1))


def _record(ev: Any, by_order: dict[int, str], page_size: int) -> dict[str, Any]:
    """The daemon's event record (observer.daemon) for an event seen by our own session."""
    return ev.to_json(by_order.get(ev.order) or f"{(page_size << ev.order) // 1024}kB")


def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    printer = Printer(args.json)
    try:
        doc = client.status()
    except DaemonUnavailable as e:
        return with_own_probes(args, printer, str(e))
    flt = make_filter(args, *_kernel_shape(doc))
    try:
        return from_daemon(client, args, flt, printer)
    except KeyboardInterrupt:
        return 0
