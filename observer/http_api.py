"""The daemon's HTTP servers: /metrics and /healthz on TCP, the JSON API on a Unix socket.

    GET /metrics                  Prometheus text format (OpenMetrics when the scraper asks for it)
    GET /healthz                  200 "ok" once probes are attached and the baseline is taken, and
                                  while the main loop is alive; 503 with the reason otherwise
    GET /api/v1/status            one JSON object: pools, optimized pages, savings, drift, probes
    GET /api/v1/events?since=N&limit=M
                                  {"events": [...], "next": N', "missed": K}: events with seq > N
    GET /api/v1/stream?since=N    JSON lines, one per event ({"type": "event", "seq": ..., ...}), a
                                  {"type": "heartbeat"} line every 5 s of silence, and
                                  {"type": "missed", "count": K} when the reader fell behind the ring

The events carry pfns, pids, command names and cgroup ids, which /proc hides from other users: the
JSON API is served on a Unix socket (root's, mode 0660, an optional group) and, on the TCP
listener, only when the configuration asks for it (``tcp_api``). The TCP listener is secured by a
web configuration file in the Prometheus exporter-toolkit format (``observer.web_config``: TLS,
client certificates, basic auth, extra headers), swapped in place on reload.

Bounded so that a misbehaving client cannot grow memory, pin threads or starve a scrape:

- a connection that has sent nothing yet costs a file descriptor, not a thread or a slot: the accept
  loop keeps it in a selector until its first byte, for at most 5 s; at most ``PENDING_PER_PEER`` of
  them per peer address and ``PENDING_MAX`` in all, the oldest evicted first (served instead when its
  request has begun meanwhile);
- at most ``max_clients`` requests are served at once (more get 503 and are closed), one peer
  address taking at most three quarters of them (TCP);
- event streams have a budget of their own (``max_streams``): a stream gives its request slot back
  when it starts, so readers that never read cannot starve /metrics;
- one request per connection (HTTP/1.0); the request line and headers may take 16 KiB in total,
  and they and the TLS handshake must arrive within 5 s of the first byte (a slowloris client
  dribbling bytes is cut off); sockets time out after 10 s of no progress in either direction;
  the stream reads the shared event ring instead of queueing per client.

No thread is started per request (on a busy machine, waiting for a new thread to run cost a scrape
tens of milliseconds at times): connections go to a pool of worker threads that grows on demand and
stays, one worker per connection being served, and the header deadline is checked at each receive
instead of by a timer thread.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import queue
import selectors
import socket
import ssl
import stat
import sys
import threading
import time
from collections import Counter, OrderedDict
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

from observer import __version__
from observer.eventlog import EventLog
from observer.web_config import WebConfig

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
HEADER_DEADLINE_S = 5.0
SOCKET_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0
EVENTS_LIMIT_DEFAULT, EVENTS_LIMIT_MAX = 1000, 10000
PENDING_PER_PEER = 64  # connections that have sent nothing yet, per peer address
PENDING_MAX = 256  # and in all (each is a file descriptor)
ACCEPT_BATCH = 64
PLAIN_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                b"Client sent an HTTP request to an HTTPS server.\n")


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


class ApiServer(HTTPServer):
    """The TCP listener: /metrics and /healthz, the JSON API too when ``api`` is true, secured by
    ``web`` (swap ``server.web`` to apply a reloaded web config to the next connections)."""

    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: Any, backend: Backend, max_clients: int = 16, *, api: bool = False,
                 web: WebConfig | None = None, max_streams: int = 8) -> None:
        if self.address_family != socket.AF_UNIX:
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.backend = backend
        self.api = api
        self.web = web or WebConfig()
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_clients)
        self.stream_slots = threading.BoundedSemaphore(max(1, max_streams))
        self._per_peer = max(1, max_clients * 3 // 4)
        self._thread: threading.Thread | None = None
        # Worker pool: every dispatched connection has a worker of its own (busy <= workers), so a
        # request never waits behind a stream; idle workers block in get().
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._workers = 0
        self._busy = 0
        self._active: Counter[str] = Counter()  # requests being served, per peer
        self._streaming: set[int] = set()  # connections whose slot went to the stream budget
        super().__init__(address, _Handler)

    @property
    def listen(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def peer(self, client_address: Any) -> str:
        return str(client_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()  # ends the accept loop within POLL_S and streams within a second
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.server_close()
        with self._pool_lock:
            for _ in range(self._workers):
                self._jobs.put(None)  # each worker exits once its connection is done
            self._workers = 0

    def shutdown(self) -> None:
        self.stopping.set()

    # --- accept loop: connections wait for their first byte without a thread -----------------------
    def serve_forever(self, poll_interval: float = 0.2) -> None:
        self.socket.setblocking(False)
        pending: OrderedDict[socket.socket, tuple[Any, float]] = OrderedDict()
        peers: Counter[str] = Counter()
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ, None)

            def drop(conn: socket.socket) -> None:
                addr, _ = pending.pop(conn)
                _decrement(peers, self.peer(addr))
                sel.unregister(conn)

            while not self.stopping.is_set():
                for key, _ in sel.select(poll_interval):
                    if key.data is None:
                        self._accept(sel, pending, peers, drop)
                    elif key.fileobj in pending:
                        conn = key.fileobj
                        addr = pending[conn][0]  # type: ignore[index]
                        drop(conn)  # type: ignore[arg-type]
                        self._dispatch(conn, addr)
                now = time.monotonic()
                while pending and next(iter(pending.values()))[1] < now:
                    conn = next(iter(pending))
                    drop(conn)
                    self.shutdown_request(conn)
            for conn in list(pending):
                drop(conn)
                self.shutdown_request(conn)

    def _accept(self, sel: selectors.BaseSelector, pending: OrderedDict[socket.socket, tuple[Any, float]],
                peers: Counter[str], drop: Any) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE/ENFILE: make room by closing the oldest waiting connection
                log.warning("accept on %s failed: %s", self.listen, e.strerror or e)
                if pending:
                    oldest = next(iter(pending))
                    drop(oldest)
                    self.shutdown_request(oldest)
                return
            peer = self.peer(addr)
            victim = None
            if peers[peer] >= PENDING_PER_PEER:  # the peer's oldest waiting connection makes room
                victim = next(c for c, (a, _) in pending.items() if self.peer(a) == peer)
            elif len(pending) >= PENDING_MAX:
                victim = next(iter(pending))
            if victim is not None:
                victim_addr = pending[victim][0]
                drop(victim)
                # One whose request has begun since the selector last looked is no idler: it is served.
                # (A burst of connections from its peer, e.g. a local user's while Prometheus scrapes
                # over the same loopback address, must not close a scrape that has sent its request.)
                if _has_data(victim):
                    self._dispatch(victim, victim_addr)
                else:
                    self.shutdown_request(victim)
            conn.setblocking(True)
            pending[conn] = (addr, time.monotonic() + HEADER_DEADLINE_S)
            peers[peer] += 1
            sel.register(conn, selectors.EVENT_READ, addr)

    def _refuse(self, request: socket.socket, why: bytes) -> None:
        if not self.web.tls:  # a TLS client would not understand a plain answer
            try:
                request.settimeout(1)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Connection: close\r\n\r\n" + why + b"\n")
            except OSError:
                pass
        self.shutdown_request(request)

    def _dispatch(self, request: socket.socket, client_address: Any) -> None:
        peer = self.peer(client_address)
        with self._pool_lock:
            crowded = self._active[peer] >= self._per_peer
        if crowded:
            self._refuse(request, b"too many connections from your address")
            return
        if not self._slots.acquire(blocking=False):
            self._refuse(request, b"too many clients")
            return
        with self._pool_lock:
            self._active[peer] += 1
            self._busy += 1
            grow = self._busy > self._workers
            if grow:
                self._workers += 1
            name = f"http-{self._workers}"
        if grow:
            try:
                threading.Thread(target=self._work, name=name, daemon=True).start()
            except RuntimeError as e:  # no more threads: refuse this one, keep serving
                with self._pool_lock:
                    self._busy -= 1
                    self._workers -= 1
                    _decrement(self._active, peer)
                self._slots.release()
                log.warning("cannot start an HTTP worker: %s", e)
                self.shutdown_request(request)
                return
        self._jobs.put((request, client_address))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, client_address = job
            try:
                self.process_request_thread(request, client_address)  # handles errors, closes
            finally:
                with self._pool_lock:
                    self._busy -= 1
                    moved = id(request) in self._streaming
                    self._streaming.discard(id(request))
                    if not moved:
                        _decrement(self._active, self.peer(client_address))
                if not moved:
                    self._slots.release()

    def to_stream_budget(self, request: Any, client_address: Any) -> bool:
        """Move a connection from the request budget (its slot and its peer's share) to the stream
        budget; False when every stream slot is taken."""
        if not self.stream_slots.acquire(blocking=False):
            return False
        with self._pool_lock:
            self._streaming.add(id(request))
            _decrement(self._active, self.peer(client_address))
        self._slots.release()
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, reset the connection, timed out
            log.debug("%s: %s", self.peer(client_address), error)
        else:
            log.exception("error while serving %s", self.peer(client_address))


def _listening(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _has_data(conn: socket.socket) -> bool:
    """Whether bytes wait unread on ``conn`` (not EOF), without reading them."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing yet; others: a broken connection
        return False


def _decrement(counts: Counter[str], key: str) -> None:
    """One less for ``key``, forgotten at zero (peers come and go: the counter must not grow)."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class SocketGroupError(PermissionError):
    """The API socket could not be given to the configured group."""


class UnixApiServer(ApiServer):
    """The JSON API (and /metrics, /healthz) on a Unix socket: root's, ``mode``, group ``gid`` (-1:
    root's), so that only root and that group read event detail. A stale socket file is replaced."""

    address_family = socket.AF_UNIX

    def __init__(self, path: Path, backend: Backend, max_clients: int = 16, *, max_streams: int = 8,
                 mode: int = 0o660, gid: int = -1) -> None:
        self.path, self.mode, self.gid = path, mode, gid
        self._inode: tuple[int, int] | None = None
        self._made_dir = False
        super().__init__(str(path), backend, max_clients, api=True, max_streams=max_streams)
        self._per_peer = max_clients  # every client is "local": no per-peer share

    @property
    def listen(self) -> str:
        return str(self.path)

    def peer(self, client_address: Any) -> str:
        return "local"

    def server_bind(self) -> None:
        if not self.path.parent.exists():  # run by hand: the unit's RuntimeDirectory= is not there
            self.path.parent.mkdir(mode=0o755)
            self._made_dir = True
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                if _listening(self.path):
                    raise OSError(errno.EADDRINUSE, "another daemon is listening there")
                os.unlink(self.path)  # left by a daemon that was killed
        self.socket.bind(str(self.path))  # nobody can connect before listen()
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)  # from here on server_close() removes it
        if self.gid != -1:
            try:
                os.chown(self.path, -1, self.gid)
            except PermissionError as e:
                raise SocketGroupError(e.errno, e.strerror) from None
        os.chmod(self.path, self.mode)
        self.server_address = str(self.path)
        self.server_name, self.server_port = "localhost", 0

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # ours, not a successor's
                os.unlink(self.path)
        if self._made_dir:
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                self.path.parent.rmdir()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = f"hvo-observer/{__version__}"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    server: ApiServer

    def setup(self) -> None:
        deadline = time.monotonic() + HEADER_DEADLINE_S
        self.web = self.server.web  # one web config for the whole connection, even across a reload
        self._raw = self.request
        self._tls: ssl.SSLSocket | None = None
        self._accepted = self.web.ssl_context is None or self._handshake(self.web.ssl_context, deadline)
        super().setup()
        self.rfile.close()  # replaced by a reader under the header deadline (the socket stays open)
        self._reader = _DeadlineIO(self.connection, deadline)
        self.rfile = _CappedReader(io.BufferedReader(self._reader), MAX_REQUEST_BYTES)  # type: ignore[assignment]

    def _handshake(self, ctx: ssl.SSLContext, deadline: float) -> bool:
        """TLS under the header deadline. A plain HTTP request gets the answer Go's servers give; a
        failed handshake (no or a wrong client certificate, an old protocol) closes the connection."""
        raw = self.request
        try:
            raw.settimeout(HEADER_DEADLINE_S)
            first = raw.recv(1, socket.MSG_PEEK)
            if first != b"\x16":  # not a TLS handshake record
                if first:
                    raw.sendall(PLAIN_TO_TLS)
                return False
            self._tls = self.request = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._tls.settimeout(max(0.001, deadline - time.monotonic()))
            self._tls.do_handshake()
            if not self.web.san_allowed(self._tls.getpeercert()):
                log.debug("%s: client certificate names none of client_allowed_sans", self.address_string())
                return False
            return True
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.debug("TLS handshake with %s failed: %s", self.address_string(), e)
            return False

    def handle(self) -> None:
        if self._accepted:
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._tls is not None:  # the accepted socket was detached into it
                with contextlib.suppress(OSError):
                    self._tls.shutdown(socket.SHUT_WR)
                self._tls.close()

    def address_string(self) -> str:
        return self.server.peer(self.client_address)

    def end_headers(self) -> None:
        for name, value in self.web.headers:
            self.send_header(name, value)
        super().end_headers()

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
        if not self.web.authorized(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Basic")
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "13")
            self.end_headers()
            if not head:
                self.wfile.write(b"Unauthorized\n")
            return
        api = self.server.api
        try:
            if url.path == "/metrics":
                body, content_type = backend.metrics(self.headers.get("Accept", ""))
                self._send(200, body, content_type, head)
            elif url.path == "/healthz":
                ok, reason = backend.health()
                self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8", head)
            elif url.path.startswith("/api/") and not api:
                self._send(404, b"not found: the JSON API is served on the daemon's Unix socket\n",
                           "text/plain; charset=utf-8", head)
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
                paths = b" /api/v1/status /api/v1/events /api/v1/stream" if api else b""
                body = b"hvo-observer: /metrics /healthz" + paths + b"\n"
                self._send(200, body, "text/plain; charset=utf-8", head)
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
        if not self.server.to_stream_budget(self._raw, self.client_address):
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
