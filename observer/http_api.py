"""The daemon's HTTP server: /metrics, /healthz and the JSON API the CLI uses.

    GET /metrics                  Prometheus text format (OpenMetrics when the scraper asks for it)
    GET /healthz                  200 "ok" once probes are attached and the baseline is taken, and
                                  while the main loop is alive; 503 with the reason otherwise
    GET /api/v1/status            one JSON object: pools, optimized pages, savings, drift, probes
    GET /api/v1/events?since=N&limit=M
                                  {"events": [...], "next": N', "missed": K}: events with seq > N
    GET /api/v1/stream?since=N    JSON lines, one per event ({"type": "event", "seq": ..., ...}), a
                                  {"type": "heartbeat"} line every 5 s of silence, and
                                  {"type": "missed", "count": K} when the reader fell behind the ring

Bounded so that a misbehaving client cannot grow memory or pin threads: at most ``max_clients``
connections are served at once (more get 503 and are closed), one request per connection
(HTTP/1.0), the request line and headers may take 16 KiB in total and must arrive within 5 s (a
slowloris client dribbling bytes is cut off), sockets time out after 10 s of no progress in either
direction, streams may take at most half of the slots (idle stream readers cannot starve scrapes),
and the stream reads the shared event ring instead of queueing per client.

No thread is started per request (on a busy machine, waiting for a new thread to run cost a scrape
tens of milliseconds at times): connections go to a pool of worker threads that grows on demand to
at most ``max_clients`` and stays, one worker per connection being served, and the header deadline
is checked at each receive instead of by a timer thread.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

from observer import __version__
from observer.eventlog import EventLog

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
HEADER_DEADLINE_S = 5.0
SOCKET_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0
EVENTS_LIMIT_DEFAULT, EVENTS_LIMIT_MAX = 1000, 10000


class Backend(Protocol):
    events: EventLog

    def metrics(self, accept: str) -> tuple[bytes, str]: ...  # body and content type of /metrics

    def health(self) -> tuple[bool, str]: ...

    def status(self) -> dict[str, Any]: ...


class _DeadlineIO(socket.SocketIO):
    """A socket's read side whose reads fail with TimeoutError once ``deadline`` (monotonic) passed:
    one absolute deadline for the request line and headers, checked at every receive, so a client
    that dribbles one byte a second cannot hold its slot (per-read timeouts alone would let it), and
    no timer thread is needed per request."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, "rb")
        self.deadline: float | None = deadline

    def readinto(self, b: Any) -> int | None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request line and headers took too long")
            self._sock.settimeout(min(left, SOCKET_TIMEOUT_S))
        return super().readinto(b)


class _CappedReader:
    """A read side that yields at most ``cap`` bytes, then EOF (and remembers it ran out)."""

    def __init__(self, inner: BinaryIO, cap: int) -> None:
        self._inner = inner
        self.remaining = cap
        self.exhausted = False

    def readline(self, size: int = -1) -> bytes:
        allowed = self.remaining if size < 0 else min(size, self.remaining)
        if allowed <= 0:
            self.exhausted = True
            return b""
        line = self._inner.readline(allowed)
        self.remaining -= len(line)
        if self.remaining <= 0 and not line.endswith(b"\n"):
            self.exhausted = True
        return line

    def read(self, size: int = -1) -> bytes:
        return b""  # no request this server accepts has a body

    def close(self) -> None:
        self._inner.close()


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], backend: Backend, max_clients: int = 16) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.backend = backend
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_clients)
        self.stream_slots = threading.BoundedSemaphore(max(1, max_clients // 2))
        self._thread: threading.Thread | None = None
        # Worker pool: every accepted connection holds a slot and has a worker of its own (busy <=
        # workers), so a request never waits behind a stream; idle workers block in get().
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._workers = 0
        self._busy = 0
        super().__init__(address, _Handler)

    @property
    def listen(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()  # ends streams within a second
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=2)
        self.server_close()
        with self._pool_lock:
            for _ in range(self._workers):
                self._jobs.put(None)  # each worker exits once its connection is done
            self._workers = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Connection: close\r\n\r\ntoo many clients\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._pool_lock:
            self._busy += 1
            grow = self._busy > self._workers
            if grow:
                self._workers += 1
            name = f"http-{self._workers}"
        if grow:
            try:
                threading.Thread(target=self._work, name=name, daemon=True).start()
            except BaseException:  # e.g. no more threads: socketserver logs it and closes the connection
                with self._pool_lock:
                    self._busy -= 1
                    self._workers -= 1
                self._slots.release()
                raise
        self._jobs.put((request, client_address))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self.process_request_thread(*job)  # handles errors, closes the connection
            finally:
                with self._pool_lock:
                    self._busy -= 1
                self._slots.release()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = f"hvo-observer/{__version__}"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    server: ApiServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader under the header deadline (the socket stays open)
        self._reader = _DeadlineIO(self.connection, time.monotonic() + HEADER_DEADLINE_S)
        self.rfile = _CappedReader(io.BufferedReader(self._reader), MAX_REQUEST_BYTES)  # type: ignore[assignment]

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers: still under the deadline
        self._reader.deadline = None
        self.connection.settimeout(SOCKET_TIMEOUT_S)
        if ok and self.rfile.exhausted:  # type: ignore[attr-defined]
            self.send_error(431, "Request header fields too large")
            return False
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        try:
            query = parse_qs(url.query, max_num_fields=8)
        except ValueError:
            self._send(400, b"too many query parameters\n", "text/plain; charset=utf-8", head)
            return
        backend = self.server.backend
        try:
            if url.path == "/metrics":
                body, content_type = backend.metrics(self.headers.get("Accept", ""))
                self._send(200, body, content_type, head)
            elif url.path == "/healthz":
                ok, reason = backend.health()
                self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8", head)
            elif url.path == "/api/v1/status":
                self._send(200, _json(backend.status()), "application/json", head)
            elif url.path == "/api/v1/events":
                since = _int_param(query, "since", 0)
                limit = min(_int_param(query, "limit", EVENTS_LIMIT_DEFAULT), EVENTS_LIMIT_MAX)
                batch = backend.events.since(since, limit)
                body = {"events": batch.records, "next": batch.next_seq, "missed": batch.missed}
                self._send(200, _json(body), "application/json", head)
            elif url.path == "/api/v1/stream":
                since = _int_param(query, "since", backend.events.last_seq)
                self._stream(since, head)
            elif url.path == "/":
                self._send(200, b"hvo-observer: /metrics /healthz /api/v1/status /api/v1/events "
                                b"/api/v1/stream\n", "text/plain; charset=utf-8", head)
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
        except _BadParam as e:
            self._send(400, f"{e}\n".encode(), "text/plain; charset=utf-8", head)

    def _send(self, code: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _stream(self, since: int, head: bool) -> None:
        if not self.server.stream_slots.acquire(blocking=False):
            self._send(503, b"too many streams\n", "text/plain; charset=utf-8", head)
            return
        try:
            self._stream_events(since, head)
        finally:
            self.server.stream_slots.release()

    def _stream_events(self, since: int, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if head:
            return
        events = self.server.backend.events
        seq, last_write = since, time.monotonic()
        try:
            while not self.server.stopping.is_set():
                batch = events.since(seq, 256)
                out = []
                if batch.missed:
                    out.append(_json({"type": "missed", "count": batch.missed}))
                out.extend(_json({"type": "event", **r}) for r in batch.records)
                seq = batch.next_seq
                if not out and time.monotonic() - last_write >= HEARTBEAT_S:
                    out.append(_json({"type": "heartbeat", "seq": seq, "unix_time": time.time()}))
                if out:
                    self.wfile.write(b"".join(out))
                    self.wfile.flush()
                    last_write = time.monotonic()
                if not batch.records:
                    events.wait(seq, 1.0)
        except OSError:
            pass  # the client went away or stopped reading (socket timeout)


class _BadParam(ValueError):
    pass


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.lstrip("-").isdigit() or len(text) > 20:
        raise _BadParam(f"query parameter {name}={text!r} is not an integer")
    return int(text)
