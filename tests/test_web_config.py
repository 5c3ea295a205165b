"""The web config file (exporter-toolkit format): what it turns into, and one line naming the file and
the key for each mistake. The HTTP servers on a stub backend: basic auth, extra headers, routes per
listener, the API socket's mode, the stream budget, idle connections. Certificates come from openssl,
hashes from python3-bcrypt; no daemon and no root needed."""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from observer.errors import ObserverError
from observer.eventlog import EventLog
from observer.http_api import ApiServer, UnixApiServer
from observer.web_config import WebConfig, load
from tests.daemon_proc import unix_get


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                    "-subj", "/CN=ca", "-addext", "subjectAltName=IP:127.0.0.1"], cwd=d, check=True,
                   capture_output=True)
    return d


@pytest.fixture(scope="module")
def hashed() -> str:
    import bcrypt

    return bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


def write(d: Path, text: str) -> Path:
    path = d / "web.yml"
    path.write_text(text)
    return path


def test_empty_file_is_plain_http(tmp_path: Path) -> None:
    web = load(write(tmp_path, ""))
    assert not web.tls and not web.users and web.authorized(None)


def test_tls_basic_auth_and_headers(certs: Path, hashed: str) -> None:
    web = load(write(certs, f"""
tls_server_config: {{cert_file: ca.crt, key_file: ca.key, client_auth_type: RequireAndVerifyClientCert,
                    client_ca_file: ca.crt, min_version: TLS13}}
http_server_config: {{headers: {{x-frame-options: deny}}}}
basic_auth_users: {{prom: "{hashed}"}}
"""))
    assert web.ssl_context is not None and web.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.headers == (("X-Frame-Options", "deny"),)
    good = "Basic " + base64.b64encode(b"prom:pw").decode()
    assert web.authorized(good) and web.authorized(good)  # the second from the cache
    basic = ["Basic " + base64.b64encode(text).decode() for text in (b"prom:no", b"x:pw", b"prom")]
    for bad in (None, *basic, "Basic !!!", "Bearer abc"):
        assert not web.authorized(bad), bad
    assert "client certificates required" in web.describe() and "basic auth (1 users)" in web.describe()


@pytest.mark.parametrize(("text", "culprit"), [
    ("tls_server_config: [", "invalid YAML"),
    ("- a\n- b\n", "the file must be a mapping"),
    ("tls_config: {}\n", "unknown key tls_config"),
    ("tls_server_config: {cert_file: ca.crt}\n", "needs both cert_file and key_file"),
    ("tls_server_config: {cert_file: nope.crt, key_file: ca.key}\n", "tls_server_config.cert_file"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key, client_auth_type: Sometimes}\n",
     "client_auth_type = 'Sometimes' is invalid"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key, client_auth_type: RequireAnyClientCert}\n",
     "client_auth_type = 'RequireAnyClientCert' is not supported"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key,\n"
     "  client_auth_type: RequireAndVerifyClientCert}\n", "needs client_ca_file"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key, client_ca_file: ca.crt}\n",
     "client_ca_file is set but client_auth_type is NoClientCert"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key, min_version: TLS9}\n", "min_version = 'TLS9'"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.key, cipher_suites: [X]}\n",
     "cipher_suites is not"),
    ("tls_server_config: {cert_file: ca.crt, key_file: ca.crt}\n", "cannot load the certificate and key"),
    ("http_server_config: {headers: {Server: x}}\n", "'Server' cannot be configured"),
    ("http_server_config: {headers: {X-Frame-Options: allow}}\n", "X-Frame-Options = 'allow' is invalid"),
    ("http_server_config: {http3: true}\n", "unknown key http_server_config.http3"),
    ("basic_auth_users: {prom: plaintext}\n", "basic_auth_users.prom is not a bcrypt hash"),
    ("rate_limit: {burst: 1}\n", "rate_limit is not supported"),
])
def test_mistakes_name_the_file_and_the_key(certs: Path, text: str, culprit: str) -> None:
    path = write(certs, text)
    with pytest.raises(ObserverError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"web config file {path}: ") and culprit in msg and "\n" not in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ObserverError, match=f"web config file {tmp_path}/none.yml: no such file"):
        load(tmp_path / "none.yml")


# --- the servers on a stub backend -------------------------------------------------------------------


class Stub:
    events = EventLog(16)

    def metrics(self, accept: str) -> tuple[bytes, str]:
        return b"hvo_stub 1\n", "text/plain; version=0.0.4"

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def status(self) -> dict[str, Any]:
        return {"hstates": []}


@contextlib.contextmanager
def serving(server: ApiServer) -> Iterator[ApiServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def test_tcp_listener_serves_metrics_only_with_auth_and_headers(hashed: str) -> None:
    web = WebConfig(Path("web.yml"), users={"prom": hashed.encode()}, headers=(("X-Frame-Options", "deny"),))
    with serving(ApiServer(("127.0.0.1", 0), Stub(), 4, web=web)) as s:
        port = s.server_address[1]
        auth = {"Authorization": "Basic " + base64.b64encode(b"prom:pw").decode()}
        status, body, headers = get(port, "/metrics", auth)
        assert (status, body, headers["X-Frame-Options"]) == (200, b"hvo_stub 1\n", "deny")
        status, _, headers = get(port, "/metrics")
        assert status == 401 and headers["WWW-Authenticate"] == "Basic"
        assert headers["X-Frame-Options"] == "deny"
        assert get(port, "/api/v1/status", auth)[0] == 404  # the API is not on TCP unless asked for
    with serving(ApiServer(("127.0.0.1", 0), Stub(), 4, api=True)) as s:
        assert get(s.server_address[1], "/api/v1/status")[0] == 200


def test_unix_socket_mode_api_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.touch()
    path.unlink()
    with serving(UnixApiServer(path, Stub(), 4)):
        st = os.stat(path)
        assert oct(st.st_mode & 0o777) == "0o660" and st.st_uid == os.geteuid()
        assert unix_get(path, "/api/v1/status") == (200, '{"hstates":[]}\n')
        assert unix_get(path, "/metrics")[0] == 200
    assert not path.exists()


def test_streams_have_their_own_budget_and_idle_connections_take_no_slot() -> None:
    with serving(ApiServer(("127.0.0.1", 0), Stub(), 4, api=True, max_streams=2)) as s:
        port = s.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        streams = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for c in streams:
                c.sendall(b"GET /api/v1/stream HTTP/1.0\r\n\r\n")
            time.sleep(0.5)
            answers = []
            for c in streams:
                c.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    answers.append(c.recv(100).split(b" ", 2)[1])
            assert sorted(answers) == [b"200", b"200", b"503"], answers
            for _ in range(20):  # 100 idle connections and 2 streams hold none of the 4 request slots
                assert get(port, "/metrics")[0] == 200
        finally:
            for c in idle + streams:
                c.close()


def test_the_daemon_refuses_a_broken_web_config_in_one_line(tmp_path: Path) -> None:
    import sys

    from tests.daemon_proc import REPO

    web = write(tmp_path, "basic_auth_users: {prom: plaintext}\n")
    r = subprocess.run([sys.executable, "-m", "observer", "run", "--web.config.file", str(web), "--listen",
                        "127.0.0.1:0", "--api-socket", ""], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"hvo-observer: web config file {web}: basic_auth_users.prom is not a bcrypt")


def test_cli_client_reaches_a_tcp_api_behind_tls_and_basic_auth(certs: Path, hashed: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from observer.client import DaemonClient, parse_address

    web = load(write(certs, f'tls_server_config: {{cert_file: ca.crt, key_file: ca.key}}\n'
                            f'basic_auth_users: {{prom: "{hashed}"}}\n'))
    with serving(ApiServer(("127.0.0.1", 0), Stub(), 4, api=True, web=web)) as s:
        client = DaemonClient(parse_address(f"https://127.0.0.1:{s.server_address[1]}"))
        monkeypatch.setenv("SSL_CERT_FILE", str(certs / "nothing.pem"))
        with pytest.raises(ObserverError, match=r"TLS failed .*CERTIFICATE_VERIFY_FAILED"):
            client.status()
        monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.crt"))
        with pytest.raises(ObserverError, match=r"HTTP 401 .* set \$HVO_OBSERVER_BASIC_AUTH"):
            client.status()
        monkeypatch.setenv("HVO_OBSERVER_BASIC_AUTH", "prom:pw")
        assert client.status() == {"hstates": []}


def test_a_second_server_does_not_take_a_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with serving(UnixApiServer(path, Stub(), 4)):
        with pytest.raises(OSError, match="another daemon is listening there"):
            UnixApiServer(path, Stub(), 4)
        assert unix_get(path, "/healthz") == (200, "ok\n")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a killed daemon leaves
    stale.close()
    with serving(UnixApiServer(path, Stub(), 4)):
        assert unix_get(path, "/healthz") == (200, "ok\n")


def test_a_missing_socket_directory_is_made_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "run" / "api.sock"
    with serving(UnixApiServer(path, Stub(), 4)):
        assert unix_get(path, "/healthz") == (200, "ok\n")
    assert not path.parent.exists()


def test_a_local_flood_of_idle_connections_does_not_close_a_scrape() -> None:
    """A local user who keeps reconnecting far more idle connections than a peer may hold shares the
    loopback address with a local Prometheus: evicting that peer's oldest idle connection must never
    close a scrape whose request has already arrived."""
    with serving(ApiServer(("127.0.0.1", 0), Stub(), 16)) as s:
        port = s.server_address[1]
        stop = threading.Event()

        def flood() -> None:
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
            while not stop.is_set():
                for c in select.select(idle, [], [], 0.05)[0]:  # closed by the server: come back
                    idle.remove(c)
                    c.close()
                    idle.append(socket.create_connection(("127.0.0.1", port)))
            for c in idle:
                c.close()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            time.sleep(0.5)
            answers = [get(port, "/metrics")[0] for _ in range(300)]
        finally:
            stop.set()
            flooder.join(10)
        assert answers == [200] * 300
