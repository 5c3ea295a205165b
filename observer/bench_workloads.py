"""Measurement primitives of ``hvo-observer bench``: the daemon as a subprocess, the workloads whose
cost it may raise, and the in-process figures (scrape latency, event decoding).

Everything that changes the kernel (pool sizes, the HVO sysctl) is undone by ``KernelGuard``.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from observer.errors import ObserverError
from observer.kernel import hugepages

REPO = Path(__file__).resolve().parents[1]
H2M = "2048kB"
READY_TIMEOUT_S = 300.0  # compiling under QEMU TCG takes most of a minute


@contextlib.contextmanager
def pool_lock() -> Iterator[str]:
    """Hold the pools lock the live tests take (a bench never resizes pools under a test); yields a
    note when it could not be taken."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hugepages.pools_lock())
        except ObserverError as e:
            yield f"{e}: not serialised with tests"
            return
        yield ""


class KernelGuard:
    """Remember every pool size and the HVO sysctl; put them back on exit."""

    def __enter__(self) -> KernelGuard:
        from observer.kernel import hugepages, sysctl

        self.pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
        self.hvo = sysctl.read_hvo_sysctl()
        return self

    def __exit__(self, *exc: object) -> None:
        from observer.kernel import hugepages, sysctl

        for name, count in self.pools.items():
            hugepages.set_nr_hugepages(name, count)
        if self.hvo is not None:
            sysctl.write_hvo_sysctl(self.hvo)


# --- the daemon as a subprocess ----------------------------------------------------------------

class DaemonProcess:
    """``python -m observer run`` on a free loopback port; READY=1 arrives through $NOTIFY_SOCKET."""

    def __init__(self, mode: str, workdir: Path) -> None:
        self.mode = mode
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready_s = 0.0
        self.chosen_mode = ""

    def start(self) -> DaemonProcess:
        sock_path = self.workdir / f"notify-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = self.workdir / "daemon.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, self.log_path.open("ab") as log:
            notify.bind(str(sock_path))
            notify.settimeout(1.0)
            env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
            env.pop("WATCHDOG_USEC", None)
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "observer", "run", "--mode", self.mode, "--listen", "127.0.0.1:0",
                 "--api-socket", "", "--log-level", "warning"],  # no API socket: only /metrics is read
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                status = self._wait_ready(notify, t0)
            except BaseException:  # e.g. Ctrl-C during the start-up: leave no daemon behind
                self.stop()
                raise
        sock_path.unlink(missing_ok=True)
        # STATUS=mode tracepoint, optimized ..., listening on 127.0.0.1:PORT
        self.chosen_mode = status.split("mode ", 1)[1].split(",", 1)[0] if "mode " in status else self.mode
        self.port = int(status.rsplit(":", 1)[1]) if "listening on" in status else 0
        return self

    def _wait_ready(self, notify: socket.socket, t0: float) -> str:
        assert self.proc is not None
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            try:
                msg = notify.recv(65536).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise ObserverError(f"the daemon exited with {self.proc.returncode} before READY: "
                                        f"{self.last_log_line()}") from None
                continue
            if "READY=1" in msg.split("\n"):
                self.ready_s = time.monotonic() - t0
                return next((ln[7:] for ln in msg.split("\n") if ln.startswith("STATUS=")), "")
        self.stop()
        raise ObserverError(f"the daemon was not ready within {READY_TIMEOUT_S:.0f} s: "
                            f"{self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def memory_kib(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def cpu_ns(self) -> int:
        """CPU time of every thread so far (schedstat: nanoseconds, unlike /proc/PID/stat's ticks)."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total

    def wait_quiet(self, window_s: float = 0.5, max_cpu_s: float = 0.001, timeout_s: float = 15.0) -> float:
        """Wait until the daemon is done with what came before (it keeps decoding a pool run's events and
        polls briskly for a few seconds after the last one), so that a timed run measures the probes'
        cost in its own context, not the tail of the previous run. Returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            c0 = self.cpu_ns()
            time.sleep(window_s)
            if self.cpu_ns() - c0 <= max_cpu_s * 1e9:
                break
        return time.monotonic() - t0

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


def daemon_workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="hvo-bench-")


# --- workloads ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of CPU the calling thread used (user + system): what probes add in its context


@contextlib.contextmanager
def timed(out: list[Timing]) -> Iterator[None]:
    w0, c0 = time.perf_counter(), time.thread_time()
    yield
    out.append(Timing(time.perf_counter() - w0, time.thread_time() - c0))


def grow_shrink(pages: int, base: int, cycles: int = 1) -> Timing:
    """Grow the 2 MiB pool from ``base`` by ``pages`` and shrink it back, ``cycles`` times (the
    writer does the allocation, the HVO optimization and restore, and runs every probe on the way,
    in its context)."""
    from observer.kernel import hugepages

    out: list[Timing] = []
    got = base + pages
    with timed(out):
        for _ in range(cycles):
            got = min(got, hugepages.set_nr_hugepages(H2M, base + pages))
            hugepages.set_nr_hugepages(H2M, base)
    if got != base + pages:
        raise ObserverError(f"the kernel gave {got - base} of {pages} 2 MiB pages (memory too fragmented "
                            "or too small): lower --pool-pages")
    return out[0]


_memset = ctypes.CDLL(None).memset
_memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)


def touch_pages(size: int) -> Timing:
    """Map ``size`` bytes of anonymous memory as 4 KiB pages, write every byte (one page fault per
    page, each allocating a page and the unmap freeing it: the kmem tracepoints fire twice) and unmap."""
    out: list[Timing] = []
    with timed(out):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            m.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages, whatever THP is set to
            buf = (ctypes.c_char * size).from_buffer(m)
            _memset(ctypes.addressof(buf), 1, size)
            del buf
        finally:
            m.close()
    return out[0]


# --- in-process figures ------------------------------------------------------------------------

def simulated_model(hstates: int = 2, nodes: int = 64) -> Any:
    """A reconciled model of ``hstates`` hstates x ``nodes`` NUMA nodes, with every event series and
    latency histogram populated, as a big host would show it."""
    from observer.model import HstateSpec, Model, ProbeState, Runtime
    from observer.probes.events import HIST_BUCKETS, EventType, Result
    from observer.probes.session import Aggregates
    from observer.snapshot import KernelSnapshot, PoolPages

    specs = {}
    for i in range(hstates):
        order = 9 + 9 * i
        name = f"{4 << order}kB"
        specs[name] = HstateSpec(name, order, (1 << order) * 64 // 4096 - 1)
    # 64 GiB per node: 1,000 or so 2 MiB pages and 4 of 1 GiB each
    pools = {(h, n): PoolPages(1000 + n if specs[h].order == 9 else 4, 10, 0)
             for h in specs for n in range(nodes)}
    saved = sum(p.pages * specs[h].freeable_pages for (h, _), p in pools.items())
    full = nodes * (64 << 30) // 4096 * 64 // 4096
    snap = KernelSnapshot(time.monotonic_ns(), pools, full - saved, (full - saved, 0), full, True)
    counts = {(ev, s.order, res): 1000 + ev * 7 + res for s in specs.values() for ev in EventType
              for res in Result}
    hist = {(ev, s.order): [i * 3 for i in range(HIST_BUCKETS)] for s in specs.values()
            for ev in (EventType.OPTIMIZE, EventType.RESTORE, EventType.DEMOTE)}
    model = Model(specs)
    model.take_baseline(snap, Aggregates(counts, hist, 0), provisional=False)
    probes = tuple(ProbeState(f"probe_{i}", ev.label, "fentry", True, "attached")
                   for i, ev in enumerate(EventType))
    model.set_runtime(Runtime("bench", "6.18", "fentry", "bench", False, probes))
    return model


class _Backend:
    def __init__(self, model: Any) -> None:
        from exporters.prometheus.collector import Exposition
        from observer.eventlog import EventLog
        from observer.report import view_to_json

        self.model = model
        self.exposition = Exposition(model.view)
        self.events = EventLog(16)
        self._json = view_to_json

    def metrics(self, accept: str) -> tuple[bytes, str]:
        return self.exposition.render(accept)

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def status(self) -> dict[str, Any]:
        return self._json(self.model.view())


def scrape_latencies(requests: int, hstates: int = 2, nodes: int = 64,
                     before_each: Callable[[Any], None] | None = None) -> tuple[list[float], int, int]:
    """Seconds per GET /metrics (connect to last byte, one connection each as Prometheus does with
    HTTP/1.0 servers) against the real HTTP server over a simulated model; also body bytes and series.
    ``before_each(model)``, when given, runs inside each timed interval, right before the GET."""
    from observer.http_api import ApiServer

    model = simulated_model(hstates, nodes)
    backend = _Backend(model)
    server = ApiServer(("127.0.0.1", 0), backend, max_clients=16)
    server.start()
    port = server.server_address[1]
    times: list[float] = []
    body = b""
    try:
        for _ in range(requests):
            t0 = time.perf_counter()
            if before_each is not None:
                before_each(model)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            body = r.read()
            conn.close()
            times.append(time.perf_counter() - t0)
            if r.status != 200:
                raise ObserverError(f"/metrics answered {r.status} in the scrape benchmark")
    finally:
        server.stop()
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return times, len(body), series


def replay_records(n: int) -> Any:
    """``n`` encoded event records, as the ring buffer would hold them (pool and HVO events, 2 orders)."""
    from observer.probes.events import EVENT_SIZE, Event, EventType, Result, encode

    kinds = (EventType.POOL_ALLOC, EventType.OPTIMIZE, EventType.POOL_FREE, EventType.RESTORE)
    distinct = [encode(Event(ts_ns=1_000_000 + i, pfn=0x100000 + 512 * i, cgroup_id=1, duration_ns=1500 + i,
                             tgid=4242, tid=4242, err=0, node=0, event=kinds[i % 4], result=Result.OK,
                             order=9 if i % 5 else 18, inferred=False, comm="hugeadm", kernel_counted=True))
                for i in range(1024)]
    data = b"".join(distinct) * (n // len(distinct)) + b"".join(distinct[: n % len(distinct)])
    buf = ctypes.create_string_buffer(data, len(data))
    return buf, EVENT_SIZE


def decode_rate(n: int, pipeline: bool) -> float:
    """Events per second through the probe session's ring-buffer callback (decode and dispatch);
    ``pipeline`` adds what the daemon does per event (model, JSON record, event log)."""
    from observer.probes.session import ProbeSession

    buf, size = replay_records(n)
    base = ctypes.addressof(buf)
    if pipeline:
        handler = _daemon_event_handler()
    else:
        seen = [0]

        def handler(ev: object) -> None:
            seen[0] += 1
    session = ProbeSession("tracepoint", on_event=handler)
    callback = session._on_ring  # what libbpf calls per record
    t0 = time.perf_counter()
    for i in range(n):
        if callback(None, base + i * size, size):
            raise ObserverError("the ring-buffer callback failed during the decode benchmark")
    elapsed = time.perf_counter() - t0
    return n / elapsed


def _daemon_event_handler() -> Any:
    from observer.config import Config
    from observer.daemon import Daemon
    from observer.model import HstateSpec, Model

    d = Daemon(Config(recent_events=4096), None, {})
    d.model = Model({"2048kB": HstateSpec("2048kB", 9, 7), "1048576kB": HstateSpec("1048576kB", 18, 4095)})
    return d._on_event
