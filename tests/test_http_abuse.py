"""HTTP abuse on loopback, bounded in time and count: unknown paths and methods, garbage, huge headers,
slow clients, many concurrent scrapes. The daemon must keep serving /metrics and its memory must stay
bounded. One daemon (tracepoint mode, pools untouched) serves every test of this module.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.daemon_proc import Daemon, daemon, parse_metrics, process_memory_kib, skip_unless_possible

pytestmark = pytest.mark.live

MAX_CLIENTS = 16
ATTACK_S = 30.0  # how long slow clients keep going: a scrape must get through before they stop
MEMORY_BOUND_KIB = 32 * 1024  # growth of the daemon's private memory across every abuse of this module


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    skip_unless_possible()
    from observer.kernel import tracefs

    tracefs.ensure_tracefs()
    # --tcp-api: the event stream on the TCP listener too, so that its budget is abused here
    with daemon(tmp_path_factory.mktemp("abuse"), "--max-clients", str(MAX_CLIENTS), "--tcp-api") as running:
        for _ in range(5):  # warm up: first scrapes allocate the collector's and server's steady state
            running.scrape()
        start = process_memory_kib(running.pid)["RssAnon"]
        yield running
        grown = process_memory_kib(running.pid)["RssAnon"] - start
        print(f"\ndaemon private memory grew by {grown} KiB across the module")
        assert grown < MEMORY_BOUND_KIB, f"private memory grew by {grown} KiB"
        assert running.stop() == 0


def raw(d: Daemon, request: bytes, timeout: float = 15) -> bytes:
    """Send ``request`` as is, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may close before we finish sending
            s.sendall(request)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def metrics_ok(d: Daemon) -> None:
    status, body = d.get("/metrics")
    assert status == 200
    assert "hvo_build_info" in parse_metrics(body)


def test_unknown_paths_methods_and_garbage(d: Daemon) -> None:
    rng = random.Random(8)
    requests = [f"GET /{rng.randbytes(8).hex()} HTTP/1.0\r\n\r\n".encode() for _ in range(200)]
    requests += [
        b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", b"GET /metrics/../../ HTTP/1.0\r\n\r\n",
        b"GET /%00%ff HTTP/1.0\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n",
        b"GET /api/v1/events?since=" + b"9" * 30 + b" HTTP/1.0\r\n\r\n",
        b"GET /api/v1/events?" + b"&".join(b"p%d=1" % i for i in range(50)) + b" HTTP/1.0\r\n\r\n",
        b"POST /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"DELETE / HTTP/1.0\r\n\r\n",
        b"BREW /pot HTCPCP/1.0\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET\r\n\r\n", b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
        bytes(range(256)) * 4,
    ]
    seen = Counter()
    for req in requests:
        status = status_of(raw(d, req))
        seen[status] += 1
        assert status == 0 or 400 <= status < 600 or req.startswith(b"GET / HTTP"), (req[:60], status)
    print(dict(seen))
    assert seen[404] >= 200
    metrics_ok(d)
    assert d.get("/healthz")[0] == 200


def test_huge_headers_are_refused(d: Daemon) -> None:
    header = b"X-Junk: " + b"j" * 1000 + b"\r\n"
    one_mib = b"GET /metrics HTTP/1.0\r\n" + header * 1024 + b"\r\n"
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: status_of(raw(d, one_mib)), range(24)))
    print(Counter(statuses))
    assert set(statuses) <= {431, 503, 0}, statuses  # 0: reset while we were still sending
    assert 431 in statuses
    # Just under the cap is still a request.
    assert status_of(raw(d, b"GET /metrics HTTP/1.0\r\n" + header * 14 + b"\r\n")) == 200
    metrics_ok(d)


def test_many_concurrent_scrapes(d: Daemon) -> None:
    def scrape(_: int) -> tuple[int, bool]:
        response = raw(d, b"GET /metrics HTTP/1.0\r\n\r\n")
        status = status_of(response)
        body = response.split(b"\r\n\r\n", 1)[-1].decode()
        return status, status == 200 and "hvo_build_info" in parse_metrics(body)

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(scrape, range(640)))
    statuses = Counter(s for s, _ in results)
    print(dict(statuses))
    assert set(statuses) <= {200, 503}, statuses
    assert all(complete for s, complete in results if s == 200), "a 200 with an incomplete body"
    assert statuses[200] >= MAX_CLIENTS
    metrics_ok(d)


class SlowClients:
    """``n`` connections that each send a request one byte a second (or, with ``read=False`` after a
    complete /api/v1/stream request, never read), for at most ATTACK_S."""

    def __init__(self, d: Daemon, n: int, request: bytes, dribble: bool) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", d.port), timeout=5) for _ in range(n)]
        self.request, self.dribble = request, dribble
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(len(self.request) if self.dribble else 1):
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.sendall(self.request[i:i + 1] if self.dribble else self.request)
            if self.stop.wait(1.0):
                return

    def __enter__(self) -> SlowClients:
        self.thread.start()
        time.sleep(0.5)  # every connection is being served (or refused) before we scrape
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def slots_free(d: Daemon) -> None:
    """Wait until the daemon has dropped the clients of an earlier test (a stream notices a closed
    client at its next heartbeat, every 5 s)."""
    deadline = time.monotonic() + ATTACK_S
    while d.get("/metrics")[0] != 200:
        assert time.monotonic() < deadline, "client slots still taken after the clients closed"
        time.sleep(0.5)


def scrape_during(d: Daemon, n: int, request: bytes, dribble: bool) -> list[str]:
    """Scrape every half second while ``n`` slow clients go on; returns the outcomes until a 200."""
    slots_free(d)
    outcomes: list[str] = []
    end = time.monotonic() + ATTACK_S
    with SlowClients(d, n, request, dribble):
        while time.monotonic() < end:
            try:
                status, _ = d.get("/metrics", timeout=5)
                outcomes.append(str(status))
            except OSError as e:
                outcomes.append(type(e).__name__)
            if outcomes[-1] == "200":
                break
            time.sleep(0.5)
    return outcomes


def test_fewer_slow_clients_than_slots_do_not_delay_scrapes(d: Daemon) -> None:
    request = b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 30 + b"\r\n"
    slots_free(d)
    with SlowClients(d, MAX_CLIENTS // 2, request, dribble=True):
        for _ in range(20):
            metrics_ok(d)


def test_slow_clients_cannot_starve_metrics(d: Daemon) -> None:
    """More slowloris connections than client slots: each sends its request one byte a second. A
    request that takes that long must be dropped so that /metrics gets through."""
    request = b"GET /metrics HTTP/1.0\r\nUser-Agent: " + b"s" * 64 + b"\r\n\r\n"
    outcomes = scrape_during(d, MAX_CLIENTS + 4, request, dribble=True)
    print(Counter(outcomes))
    assert outcomes[-1] == "200", f"/metrics starved by {MAX_CLIENTS + 4} slow clients for {ATTACK_S:.0f} s"
    slots_free(d)


def test_stream_readers_that_never_read_cannot_starve_metrics(d: Daemon) -> None:
    """More /api/v1/stream clients than slots, none of which reads: /metrics must still get through."""
    outcomes = scrape_during(d, MAX_CLIENTS + 4, b"GET /api/v1/stream HTTP/1.0\r\n\r\n", dribble=False)
    print(Counter(outcomes))
    assert outcomes[-1] == "200", f"/metrics starved by {MAX_CLIENTS + 4} idle stream clients"
    slots_free(d)
