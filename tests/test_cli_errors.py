"""One-line errors of the on-call commands, run as a user runs them (subprocesses, real sockets)."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    return subprocess.run([sys.executable, "-m", "observer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False, env={**base, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("hvo-observer: ")
    return r.stderr.strip()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", ["status", "events", "top", "explain"])
def test_bad_daemon_flag(command: str) -> None:
    msg = one_line_error(cli(command, "--daemon", "localhost"))
    assert msg == ("hvo-observer: bad --daemon address 'localhost': expected HOST:PORT, e.g. 127.0.0.1:9817")


@pytest.mark.parametrize(("value", "why"), [("127.0.0.1:http", "port 'http' is not a number"),
                                            ("fe80::1:9817", "put an IPv6 address in brackets"),
                                            ("127.0.0.1:0", "port 0 only means")])
def test_bad_daemon_values(value: str, why: str) -> None:
    msg = one_line_error(cli("status", "--daemon", value))
    assert f"bad --daemon address {value!r}: {why}" in msg


def test_bad_environment_address_names_the_variable() -> None:
    msg = one_line_error(cli("top", env={"HVO_OBSERVER_ADDR": "nowhere"}))
    assert "bad $HVO_OBSERVER_ADDR address 'nowhere'" in msg


def test_top_with_no_daemon() -> None:
    port = closed_port()
    msg = one_line_error(cli("top", "--daemon", f"127.0.0.1:{port}"))
    assert msg == (f"hvo-observer: no daemon at 127.0.0.1:{port} (connection refused): start it with "
                   f"'hvo-observer run --listen 127.0.0.1:{port}' or fix --daemon")


def test_top_with_no_daemon_at_the_default_address_says_how_to_start_it() -> None:
    port = closed_port()
    msg = one_line_error(cli("top", env={"HVO_OBSERVER_ADDR": f"127.0.0.1:{port}"}))
    assert msg.startswith(f"hvo-observer: no daemon at 127.0.0.1:{port} (connection refused)")
    assert msg.endswith("or fix $HVO_OBSERVER_ADDR")


@pytest.fixture
def not_an_observer() -> Iterator[int]:
    """A real HTTP server on loopback that is not hvo-observer (answers 404 to everything)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_top_against_another_service(not_an_observer: int) -> None:
    msg = one_line_error(cli("top", "--daemon", f"127.0.0.1:{not_an_observer}"))
    assert msg.startswith(f"hvo-observer: no hvo-observer API at 127.0.0.1:{not_an_observer} "
                          "(/api/v1/status: HTTP 404")


def test_top_needs_a_sane_interval() -> None:
    msg = one_line_error(cli("top", "--interval", "0"))
    assert msg == "hvo-observer: bad --interval 0: expected 0.1 to 60 seconds"


def test_pid_and_comm_together() -> None:
    msg = one_line_error(cli("events", "--pid", "1", "--comm", "bash"))
    assert "argument --comm: not allowed with argument --pid" in msg


@pytest.mark.live
@pytest.mark.parametrize(("flags", "expected"), [
    (["--event", "optimise"], "bad --event 'optimise': unknown event 'optimise' (choose from pool_alloc, "),
    (["--hstate", "3M"], "bad --hstate '3M': this kernel's hstates are 2048kB"),
    (["--node", "99"], "bad --node '99': this host's NUMA nodes are 0"),
    (["--pid", "x"], "bad --pid 'x': expected a process id"),
    (["--result", "failure"],
     "bad --result 'failure': unknown result 'failure' (choose from ok, error, skipped)"),
])
def test_bad_filters_with_no_daemon(flags: list[str], expected: str) -> None:
    """Checked against this host's kernel before any probe is attached."""
    msg = one_line_error(cli("events", "--daemon", f"127.0.0.1:{closed_port()}", *flags))
    assert msg.startswith(f"hvo-observer: {expected}")


def test_events_unprivileged_with_no_daemon() -> None:
    """Without a daemon, events would attach its own probes: a user without the capabilities is told so."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command as an unprivileged user")
    port = closed_port()
    base = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        sys.executable, "-m", "observer", "events", "--daemon", f"127.0.0.1:{port}"],
                       cwd="/", capture_output=True, text=True, timeout=120, check=False,
                       env={**base, "PYTHONPATH": str(REPO)})
    msg = one_line_error(r)
    assert msg == (f"hvo-observer: no daemon at 127.0.0.1:{port} (connection refused): start it with "
                   f"'hvo-observer run --listen 127.0.0.1:{port}' or fix --daemon; attaching own probes "
                   "instead needs root (or CAP_BPF and CAP_PERFMON): run as root, or start the daemon")


def test_busy_daemon_answer_is_one_line() -> None:
    """The daemon's 503 when all client slots are taken, as a real server sends it."""

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"too many clients\n"
            self.send_response(503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        msg = one_line_error(cli("top", "--daemon", f"127.0.0.1:{port}"))
        assert msg == (f"hvo-observer: daemon at 127.0.0.1:{port}: HTTP 503 for /api/v1/status: "
                       "too many clients")
    finally:
        server.shutdown()
        server.server_close()
