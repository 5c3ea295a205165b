"""Who may read what from a live daemon: /metrics over TCP secured by an exporter-toolkit web config
and scraped by a real Prometheus (Debian's), the JSON API on a Unix socket only root may use.

One daemon (tracepoint mode, pools untouched) serves the module; its web config file is rewritten
and re-read on SIGHUP between the steps, as an operator would. Certificates are made here with
openssl (a CA, the server's, Prometheus's client certificate, and a rogue CA with its own client
certificate); the bcrypt hash with python3-bcrypt. Prometheus scrapes every second with its own
``tls_config``/``basic_auth`` options, and its ``up`` series and target state are the verdict.
Unprivileged runs use ``setpriv`` as user nobody. Waiting loops only turn a hang into a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_proc import REPO, WAIT_S, Daemon, daemon, free_port, skip_unless_possible
from tests.test_prometheus_live import PROMETHEUS, Prometheus

pytestmark = [pytest.mark.live, pytest.mark.prometheus]

PASSWORD = "s3cret-scrape"
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--")


# --- certificates and web configs ---------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, san: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "prometheus", "ca", "DNS:prometheus.test")
    make_ca(d, "rogue-ca")
    make_cert(d, "rogue", "rogue-ca", "DNS:prometheus.test")
    return d


def web_config(pki: Path, kind: str) -> str:
    """The web config file's text: ``plain`` (none), ``basic`` (TLS and basic auth), ``mtls`` (TLS
    and a verified client certificate), ``broken`` (not YAML)."""
    import bcrypt

    tls = {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS12"}
    headers = {"X-Content-Type-Options": "nosniff"}
    if kind == "plain":
        return ""
    if kind == "basic":
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        return yaml.safe_dump({"tls_server_config": tls, "http_server_config": {"headers": headers},
                               "basic_auth_users": {"prometheus": hashed}})
    if kind == "mtls":
        return yaml.safe_dump({"tls_server_config": {**tls, "client_auth_type": "RequireAndVerifyClientCert",
                                                     "client_ca_file": "ca.crt"}})
    return "tls_server_config: [cert_file\n"


class Web:
    """The running daemon plus its web config file, rewritten and re-read (SIGHUP) step by step."""

    def __init__(self, d: Daemon, pki: Path) -> None:
        self.d, self.pki = d, pki
        self.file = pki / "web.yml"

    def use(self, kind: str, expect: str) -> None:
        """Write the ``kind`` config, SIGHUP, wait for the log line ``expect`` to appear once more."""
        before = self.d.full_output().count(expect)
        self.file.write_text(web_config(self.pki, kind))
        self.d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while self.d.full_output().count(expect) <= before:
            assert time.monotonic() < deadline, f"no {expect!r} after SIGHUP:\n{self.d.output()}"
            time.sleep(0.1)

    def https(self, path: str = "/metrics", auth: str | None = None, cert: str | None = None
              ) -> tuple[int, str, dict[str, str]]:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if cert:
            ctx.load_cert_chain(self.pki / f"{cert}.crt", self.pki / f"{cert}.key")
        req = urllib.request.Request(f"https://127.0.0.1:{self.d.port}{path}")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Web]:
    skip_unless_possible()
    from observer.kernel import tracefs

    tracefs.ensure_tracefs()
    (pki / "web.yml").write_text("")
    config = pki / "hvo-observer.toml"
    config.write_text(f'web_config_file = "{pki / "web.yml"}"\n')
    with daemon(tmp_path_factory.mktemp("web"), "--config", str(config)) as d:
        yield Web(d, pki)
        assert d.proc.poll() is None, f"the daemon died:\n{d.output()}"
        assert d.stop() == 0


# --- the Unix socket: root only --------------------------------------------------------------------


def cli(*args: str, user: Sequence[str] = (), stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    return subprocess.run([*user, sys.executable, "-m", "observer", *args], cwd="/",  # runs: setpriv
                          capture_output=True, text=True, timeout=WAIT_S, check=False,
                          env={**env, "PYTHONPATH": str(REPO)}, stdin=stdin)


def as_nobody(code: str) -> str:
    r = subprocess.run([*NOBODY, sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_unprivileged_user_scrapes_metrics_but_not_the_api(web: Web) -> None:
    d = web.d
    sock = str(d.api_socket)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660" and os.stat(sock).st_uid == 0
    got = as_nobody(f"import urllib.request as u; r = u.urlopen({d.url('/metrics')!r}, timeout=10); "
                    "print(r.status, b'hvo_build_info' in r.read())")
    assert got == "200 True"
    got = as_nobody(f"import socket; s = socket.socket(socket.AF_UNIX)\ntry:\n s.connect({sock!r}); "
                    "print('connected')\nexcept PermissionError: print('EACCES')")
    assert got == "EACCES"
    # nor is the API on the TCP listener (tcp_api is off by default)
    status, body = _tcp_get(d, "/api/v1/events?since=0")
    assert status == 404 and "Unix socket" in body
    for command in ("events", "status", "top"):
        r = cli(command, "--daemon", sock, user=NOBODY)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (command, r.stderr)
        one_line = r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"hvo-observer: permission denied: {sock} ") and one_line, r.stderr


def _tcp_get(d: Daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(d.url(path), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_root_uses_status_events_and_top_through_the_socket(web: Web) -> None:
    sock = str(web.d.api_socket)
    r = cli("status", "--json", "--daemon", sock)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "daemon" and doc["daemon"] == sock and doc["api_socket"] == sock
    r = cli("events", "--json", "--daemon", sock, "--lines", "5")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert all(json.loads(line)["seq"] for line in r.stdout.splitlines())
    # top on a terminal (script(1) gives it one); "q" on its input quits
    command = f"{sys.executable} -m observer top --daemon {sock} --interval 0.5"
    with subprocess.Popen(["script", "-qec", command, "/dev/null"], cwd=REPO, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as top:
        time.sleep(3)
        assert top.stdin is not None
        top.stdin.write(b"q")
        top.stdin.flush()
        try:
            out, _ = top.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            top.kill()
            raise
    assert top.returncode == 0, out[-2000:]
    assert f"hvo-observer top - {sock} - kernel ".encode() in out


# --- TLS, basic auth and mutual TLS, scraped by Prometheus -------------------------------------------


class ScrapingPrometheus(Prometheus):
    """Prometheus scraping one daemon with several jobs (job name -> extra scrape options)."""

    def __init__(self, tmp: Path, port: int, jobs: dict[str, dict[str, Any]]) -> None:
        self.port = free_port()
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                                **opts} for job, opts in jobs.items()],
        }))  # fmt: skip
        self.log_path = tmp / "prometheus.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(  # runs: prometheus
            [str(PROMETHEUS), f"--config.file={self.config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip

    def target(self, job: str) -> dict[str, Any] | None:
        """The job's target (None until Prometheus has discovered it)."""
        targets = self.get("/api/v1/targets")["activeTargets"]
        return next((t for t in targets if t["labels"]["job"] == job), None)

    def scraped_after(self, job: str, since: float, health: str) -> dict[str, Any] | None:
        """The job's target once a scrape that started after ``since`` (unix time) has ``health``."""
        t = self.target(job)
        return t if t is not None and unix_time(t["lastScrape"]) > since and t["health"] == health else None

    def wait_health(self, job: str, health: str, since: float | None = None) -> dict[str, Any]:
        since = time.time() if since is None else since
        return self.wait(f"job {job} {health} after {since:.1f}",
                         lambda: self.scraped_after(job, since, health), lambda: self.target(job))


@pytest.fixture(scope="module")
def prometheus(web: Web, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapingPrometheus]:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: run scripts/setup (Debian package prometheus)")
    ca = str(web.pki / "ca.crt")
    jobs = {
        "basic": {"scheme": "https", "tls_config": {"ca_file": ca},
                  "basic_auth": {"username": "prometheus", "password": PASSWORD}},
        "wrong-password": {"scheme": "https", "tls_config": {"ca_file": ca},
                           "basic_auth": {"username": "prometheus", "password": PASSWORD + "x"}},
        "mtls": {"scheme": "https", "tls_config": {"ca_file": ca,
                                                   "cert_file": str(web.pki / "prometheus.crt"),
                                                   "key_file": str(web.pki / "prometheus.key")}},
    }
    prom = ScrapingPrometheus(tmp_path_factory.mktemp("prometheus"), web.d.port, jobs)
    try:
        yield prom
    finally:
        prom.stop()


def unix_time(rfc3339: str) -> float:
    """Prometheus's ``2026-12-06T07:10:01.123456789Z`` (nanoseconds, which fromisoformat refuses)."""
    whole, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (frac or "0"))


def up(prom: ScrapingPrometheus, job: str) -> float | None:
    return prom.value(f'up{{job="{job}"}}')


def plaintext_to_tls_port(d: Daemon) -> bytes:
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def rogue_certificate_refused(web: Web) -> str:
    """A TLS client presenting a certificate of another CA: the handshake (or, with TLS 1.3, where the
    client finishes first, the first read) fails; never an HTTP answer."""
    ctx = ssl.create_default_context(cafile=str(web.pki / "ca.crt"))
    ctx.load_cert_chain(web.pki / "rogue.crt", web.pki / "rogue.key")
    try:
        with (socket.create_connection(("127.0.0.1", web.d.port), timeout=10) as raw,
              ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s):
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = s.recv(65536)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return type(e).__name__
    assert data == b"", f"a rogue client certificate got an answer: {data[:200]!r}"
    return "closed"


def test_prometheus_scrapes_over_tls_with_basic_auth(web: Web, prometheus: ScrapingPrometheus) -> None:
    web.use("basic", "TLS, basic auth (1 users)")
    prometheus.wait_health("basic", "up")
    assert up(prometheus, "basic") == 1
    bad = prometheus.wait_health("wrong-password", "down")
    assert "401" in bad["lastError"], bad
    assert up(prometheus, "wrong-password") == 0
    status, _, headers = web.https(auth=f"prometheus:{PASSWORD}x")
    assert status == 401 and headers.get("WWW-Authenticate") == "Basic"
    status, body, headers = web.https(auth=f"prometheus:{PASSWORD}")
    assert status == 200 and "hvo_build_info" in body and headers.get("X-Content-Type-Options") == "nosniff"
    # plain HTTP on the TLS port: Go's answer, no metrics; the next scrape is unharmed
    answer = plaintext_to_tls_port(web.d)
    assert answer.startswith(b"HTTP/1.0 400 ") and b"hvo_" not in answer, answer[:200]
    prometheus.wait_health("basic", "up", since=time.time())


def test_prometheus_scrapes_over_mutual_tls(web: Web, prometheus: ScrapingPrometheus) -> None:
    web.use("mtls", "client certificates required")
    since = time.time()
    prometheus.wait_health("mtls", "up", since)
    assert up(prometheus, "mtls") == 1
    prometheus.wait_health("basic", "down", since)  # no client certificate: the handshake fails
    assert up(prometheus, "basic") == 0
    assert rogue_certificate_refused(web) in {"SSLError", "SSLEOFError", "ConnectionResetError",
                                              "BrokenPipeError", "closed"}
    answer = plaintext_to_tls_port(web.d)
    assert b"hvo_" not in answer
    prometheus.wait_health("mtls", "up", since=time.time())  # the next scrape is unharmed
    status, body, _ = web.https(cert="prometheus")
    assert status == 200 and "hvo_build_info" in body


def test_a_broken_web_config_keeps_the_running_one(web: Web, prometheus: ScrapingPrometheus) -> None:
    web.use("broken", "reload failed, keeping the running configuration")
    line = [x for x in web.d.full_output().splitlines() if "reload failed" in x][-1]
    assert f"web config file {web.file}: invalid YAML" in line
    prometheus.wait_health("mtls", "up", since=time.time())
    web.use("plain", "plain HTTP, no basic auth")
    assert _tcp_get(web.d, "/metrics")[0] == 200


def test_the_socket_group_uses_the_api(tmp_path: Path) -> None:
    """api_socket_group: the daemon, a member of the group as the unit's SupplementaryGroups= makes
    it (it keeps no CAP_CHOWN), gives the socket to it; a user in that group uses status/events, a
    user outside it is refused; without membership the daemon stops in one line naming the key."""
    import grp

    skip_unless_possible()
    group = grp.getgrnam("adm")  # a Debian base system group that nobody is not in
    gid = group.gr_gid
    with daemon(tmp_path, "--api-socket-group", group.gr_name,
                wrapper=("setpriv", f"--groups={gid}", "--")) as d:
        sock = str(d.api_socket)
        st = os.stat(sock)
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, gid, "0o660")
        member = ("setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}", "--inh-caps=-all", "--")
        r = cli("status", "--json", "--daemon", sock, user=member)
        assert r.returncode == 0 and json.loads(r.stdout)["source"] == "daemon", r.stderr
        r = cli("events", "--json", "--daemon", sock, "--lines", "1", user=member)
        assert r.returncode == 0, r.stderr
        r = cli("events", "--daemon", sock, user=NOBODY)
        assert r.returncode == 2 and r.stderr == (
            f"hvo-observer: permission denied: {sock} (the daemon's API socket; its events show every task's "
            f"pids and page frames): run as root or a member of group '{group.gr_name}'\n")
    lone = Daemon(tmp_path, "--api-socket-group", group.gr_name)  # not a member
    try:
        assert lone.proc.wait(timeout=WAIT_S) == 2
    finally:
        lone.kill()
    out = lone.full_output()
    expected = f"hvo-observer: api_socket_group = '{group.gr_name}': cannot give {lone.api_socket} to that"
    assert expected in out and "Traceback" not in out, out
