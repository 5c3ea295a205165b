"""``hvo-observer top``: a live full-screen view of the running daemon; ``q`` quits.

Needs the daemon: rates and latency come from its exact in-kernel counts and histograms (a session of
our own would start from zero and miss everything before it). Each refresh reads ``/api/v1/status``
(pools, savings, drift, event counts) and ``/metrics`` (the latency histograms); rates are the
count differences between two refreshes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from observer import render
from observer.client import DaemonClient, add_daemon_argument, client_from
from observer.errors import ObserverError

QUANTILES = (0.5, 0.9, 0.99)
LATENCY_METRIC = "hvo_operation_duration_seconds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Live full-screen view of the running daemon: event rates, optimize/restore latency percentiles, "
        "pool and savings per hstate and node, drift. Press q to quit. Needs the daemon "
        "('hvo-observer run'); without one it exits with a one-line error (use 'hvo-observer events' to "
        "watch with probes of its own).")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between refreshes (default 1)")
    add_daemon_argument(parser)


# --- figures ------------------------------------------------------------------------------------
CountKey = tuple[str, str, str]  # (event, hstate, result)


def counts_of(doc: dict[str, Any]) -> dict[CountKey, int]:
    return {(e["event"], e["hstate"], e["result"]): int(e["count"]) for e in doc.get("events", [])}


def latency_buckets(metrics_text: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Per (op, hstate): the cumulative histogram buckets [(upper bound s, count), ...] of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != LATENCY_METRIC:
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                key = (s.labels.get("op", "?"), s.labels.get("hstate", "?"))
                out.setdefault(key, []).append((float(s.labels["le"]), s.value))
    for buckets in out.values():
        buckets.sort()
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Seconds at quantile ``q`` of cumulative buckets, interpolated inside the bucket (as
    PromQL's histogram_quantile does); None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # above the largest finite bound: report that bound
            inside = count - lower_count
            frac = (rank - lower_count) / inside if inside else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Frame:
    """One refresh: the status document, the latency histograms and rates since the previous one."""

    doc: dict[str, Any]
    latency: dict[tuple[str, str], list[tuple[float, float]]]
    rates: dict[CountKey, float] = field(default_factory=dict)
    taken: float = field(default_factory=time.monotonic)


def next_frame(client: DaemonClient, prev: Frame | None) -> Frame:
    doc = client.status()
    frame = Frame(doc, latency_buckets(client.metrics()))
    if prev is not None:
        dt = frame.taken - prev.taken
        old = counts_of(prev.doc)
        if dt > 0:
            frame.rates = {k: (n - old.get(k, 0)) / dt for k, n in counts_of(doc).items()}
    return frame


# --- screen -------------------------------------------------------------------------------------
def _events_table(frame: Frame) -> Any:
    from rich.table import Table

    t = Table(title="events", title_justify="left", expand=True, box=None, header_style="bold")
    for col in ("event", "hstate"):
        t.add_column(col)
    for col in ("rate/s", "total", "errors", "skipped", "p50", "p90", "p99"):
        t.add_column(col, justify="right")
    per: dict[tuple[str, str], dict[str, int]] = {}
    for (ev, hs, res), n in counts_of(frame.doc).items():
        per.setdefault((ev, hs), {})[res] = n
    for key in sorted(set(per) | set(frame.latency)):
        by = per.get(key, {})
        rate = sum(r for (ev, hs, _), r in frame.rates.items() if (ev, hs) == key) if frame.rates else None
        qs = [quantile(q, frame.latency.get(key, [])) for q in QUANTILES]
        errors = by.get("error", 0)
        t.add_row(key[0], key[1], "-" if rate is None else f"{rate:.1f}", str(sum(by.values())),
                  f"[red]{errors}[/red]" if errors else "0", str(by.get("skipped", 0)),
                  *(render.duration(None if s is None else s * 1e9) for s in qs))
    if not per and not frame.latency:
        t.add_row("(none yet)", "", "", "", "", "", "", "", "")
    return t


def _pools_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="pools", title_justify="left", expand=True, box=None, header_style="bold")
    t.add_column("hstate")
    for col in ("node", "pages", "free", "surplus", "optimized", "freeable/page", "expected saved MiB"):
        t.add_column(col, justify="right")
    for h in doc["hstates"]:
        per = h["freeable_vmemmap_pages"]
        for n in h["nodes"]:
            known = n["optimized"] is not None  # None: the split by node is unknown (events carry no node)
            t.add_row(h["name"], str(n["node"]), str(n["pages"]), str(n["free"]), str(n["surplus"]),
                      str(n["optimized"]) if known else "?", str(per),
                      render.mib(n["expected_saved_bytes"]) if known else "?")
        if any(n["optimized"] is None for n in h["nodes"]):
            t.add_row(h["name"], "all", str(h["pages"]), str(h["free"]), str(h["surplus"]),
                      str(h["optimized"]), str(per), render.mib(h["expected_saved_bytes"]))
    return t


def _summary(doc: dict[str, Any]) -> Any:
    from rich.text import Text

    ps = doc["page_size"]
    saved, rec = doc["saved_bytes"], doc["reconcile"]
    kernel = saved["kernel"]
    lines = [f"savings  expected {render.mib(saved['expected'])} MiB ({saved['expected'] // ps} pages)   "
             f"kernel " + (f"{render.mib(kernel)} MiB ({kernel // ps} pages)" if kernel is not None
                           else "unknown (kernel < 6.11)")]
    drift = rec["drift_bytes"]
    if drift is None:
        lines.append("drift    unknown (no byte truth)")
    else:
        state = "settled" if rec["settled"] else "settling"
        lines.append(f"drift    {render.signed_mib(drift)} MiB ({drift // ps:+d} pages), {state}; now "
                     f"{render.signed_mib(rec['pending_drift_bytes'])} MiB")
    lines.append(f"events   {rec['events_seen']} seen, {rec['events_lost']} lost, {rec['resyncs']} resyncs"
                 + ("   INCONSISTENT: " + rec["inconsistent"] if rec.get("inconsistent") else ""))
    text = Text("\n".join(lines))
    if drift:
        text.highlight_words(["drift"], style="bold red")
    return text


def screen(frame: Frame, addr: str, error: str = "") -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    doc = frame.doc
    hvo = {True: "on", False: "OFF", None: "?"}[doc.get("hvo_enabled")]
    title = (f"hvo-observer top - {addr} - kernel {doc.get('kernel', '?')} - mode {doc.get('mode', '?')}"
             f"{' (degraded)' if doc.get('degraded') else ''} - HVO {hvo} - {time.strftime('%H:%M:%S')}")
    parts: list[Any] = []
    if error:
        parts.append(Text(f"daemon lost: {error} (showing the last figures; retrying)", style="bold red"))
    parts += [_events_table(frame), Text(""), _pools_table(doc), Text(""), _summary(doc)]
    return Panel(Group(*parts), title=title, title_align="left", subtitle="q quits", subtitle_align="right")


# --- keyboard -----------------------------------------------------------------------------------
@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys arrive one by one without echo; Ctrl-C still interrupts. The terminal is restored after."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_quit(fd: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for keys; True when q (or Q) was pressed."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or b"q" in data.lower():  # EOF on the terminal also ends the view
                return True
    return False


def run(args: argparse.Namespace) -> int:
    if not 0.1 <= args.interval <= 60:
        raise ObserverError(f"bad --interval {args.interval:g}: expected 0.1 to 60 seconds")
    client = client_from(args, timeout=max(2.0, args.interval))
    frame = next_frame(client, None)  # a missing daemon fails here, before the screen is taken over
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise ObserverError("top needs a terminal (stdin/stdout is not a tty): use 'hvo-observer status' "
                            "or 'hvo-observer events --follow' in scripts")

    from rich.console import Console
    from rich.live import Live

    fd = sys.stdin.fileno()
    console = Console()
    with cbreak(fd), Live(screen(frame, str(client.addr)), console=console, screen=True,
                          auto_refresh=False) as live:
        try:
            while not wait_for_quit(fd, args.interval):
                error = ""
                try:
                    frame = next_frame(client, frame)
                except ObserverError as e:
                    error = str(e)
                live.update(screen(frame, str(client.addr), error), refresh=True)
        except KeyboardInterrupt:
            pass
    return 0
