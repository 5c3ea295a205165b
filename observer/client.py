"""HTTP client for the daemon's JSON API (``/api/v1/...``), for the on-call commands.

The API is on the daemon's Unix socket (``/run/hvo-observer/api.sock``: root's and its group's);
``--daemon`` (or ``$HVO_OBSERVER_ADDR``) names another socket path, or ``HOST:PORT`` of a daemon
whose configuration serves the API on TCP too (``tcp_api``), ``https://HOST:PORT`` when its web
config asks for TLS: the CA comes from OpenSSL's defaults (``$SSL_CERT_FILE``), a client certificate
from ``$HVO_OBSERVER_TLS_CERT``/``$HVO_OBSERVER_TLS_KEY``, basic auth from
``$HVO_OBSERVER_BASIC_AUTH`` (``user:password``). Standard library only (http.client):
the CLI must start fast and needs nothing else. Every failure becomes one ``ObserverError`` line
naming the address and what to do; a missing socket is ``DaemonUnavailable`` (callers fall back to
the kernel's counters), a socket this user may not use is a plain "permission denied" error.
"""

from __future__ import annotations

import argparse
import base64
import grp
import http.client
import json
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from observer.config import parse_listen
from observer.errors import ObserverError

DEFAULT_ADDR = "/run/hvo-observer/api.sock"
ENV_ADDR = "HVO_OBSERVER_ADDR"
ENV_AUTH, ENV_CERT, ENV_KEY = "HVO_OBSERVER_BASIC_AUTH", "HVO_OBSERVER_TLS_CERT", "HVO_OBSERVER_TLS_KEY"
API = "/api/v1"


class DaemonUnavailable(ObserverError):
    """Nothing (or nothing that speaks our API) listens at the address: callers may fall back."""


class DaemonStarting(ObserverError):
    """The daemon answers but has no figures yet (attaching probes, taking the baseline)."""


def add_daemon_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--daemon", metavar="SOCKET|HOST:PORT", default=None,
        help=f"the daemon's API socket, or HOST:PORT when its config sets tcp_api (default: ${ENV_ADDR}, "
             f"else {DEFAULT_ADDR})")


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    source: str  # "--daemon", "$HVO_OBSERVER_ADDR" or "default": named in errors
    path: str | None = None  # the Unix socket (host and port unused)
    tls: bool = False  # https://HOST:PORT

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        hostport = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"https://{hostport}" if self.tls else hostport


def parse_address(value: str, source: str = "--daemon") -> Address:
    """``HOST:PORT`` or ``[V6]:PORT`` (the daemon's own ``--listen`` syntax); an error names the flag (or
    variable) and the value."""
    text = value.strip()
    if text.startswith("unix:"):
        text = text[len("unix:"):]
    if text.startswith("/"):
        return Address("localhost", 0, source, text)
    tls = text.startswith("https://")
    if text.startswith(("http://", "https://")):  # pasted from a browser or a scrape config
        text = text.split("://", 1)[1].rstrip("/")
    try:
        host, port = parse_listen(text)
        if port == 0:
            raise ValueError("port 0 only means 'any free port' when listening")
        if not host or any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError(f"{host!r} is not a host name or IP address")
    except ValueError as e:
        raise ObserverError(f"bad {source} address {value!r}: {e}") from None
    return Address(host, port, source, tls=tls)


def address_from(args: argparse.Namespace) -> Address:
    flag = getattr(args, "daemon", None)
    if flag is not None:
        return parse_address(flag, "--daemon")
    env = os.environ.get(ENV_ADDR)
    if env:
        return parse_address(env, f"${ENV_ADDR}")
    return parse_address(DEFAULT_ADDR, "default")


class DaemonClient:
    def __init__(self, addr: Address, timeout: float = 5.0) -> None:
        self.addr = addr
        self.timeout = timeout

    # --- errors ----------------------------------------------------------------------------
    def _unreachable(self, why: str) -> DaemonUnavailable:
        if self.addr.source == "default":
            hint = "start it with 'hvo-observer run'"
        elif self.addr.path is not None:
            hint = f"start it with 'hvo-observer run --api-socket {self.addr}' or fix {self.addr.source}"
        else:
            hint = f"start it with 'hvo-observer run --listen {self.addr}' or fix {self.addr.source}"
        return DaemonUnavailable(f"no daemon at {self.addr} ({why}): {hint}")

    def _denied(self) -> ObserverError:
        who = "root"
        try:
            st = os.stat(self.addr.path or "")
            if st.st_gid != 0 and stat.S_IMODE(st.st_mode) & 0o060 == 0o060:
                try:
                    who = f"root or a member of group {grp.getgrgid(st.st_gid).gr_name!r}"
                except KeyError:
                    who = f"root or a member of group {st.st_gid}"
        except OSError:
            pass
        return ObserverError(f"permission denied: {self.addr} (the daemon's API socket; its events show "
                             f"every task's pids and page frames): run as {who}")

    def _os_error(self, e: OSError) -> ObserverError:
        if isinstance(e, ssl.SSLError):
            return ObserverError(f"daemon at {self.addr}: TLS failed ({e.reason or e}): its CA must be in "
                                 f"$SSL_CERT_FILE, a client certificate in ${ENV_CERT}/${ENV_KEY}")
        if self.addr.path is not None:
            if isinstance(e, PermissionError):
                return self._denied()
            if isinstance(e, FileNotFoundError):
                return self._unreachable("no such socket")
        if isinstance(e, socket.gaierror):
            return ObserverError(f"bad {self.addr.source} address '{self.addr}': host "
                                 f"{self.addr.host!r} not found ({e.strerror or e})")
        if isinstance(e, ConnectionRefusedError):
            return self._unreachable("connection refused")
        if isinstance(e, TimeoutError):
            return self._unreachable(f"no answer within {self.timeout:g} s")
        return self._unreachable(e.strerror or str(e) or type(e).__name__)

    # --- requests --------------------------------------------------------------------------
    def _open(self, path: str, params: dict[str, Any] | None, timeout: float | None, prefix: str = API
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = f"{prefix}{path}" + (f"?{urlencode(query, doseq=True)}" if query else "")
        headers = {"Accept": "application/json"}
        conn = self._connection(timeout, headers)
        try:
            conn.request("GET", url, headers=headers)
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            raise self._os_error(e) from None
        except http.client.HTTPException as e:
            conn.close()
            raise DaemonUnavailable(f"no hvo-observer daemon at {self.addr}: {type(e).__name__} "
                                    f"from {url} (another service on that port?)") from None
        if resp.status != 200:
            body = resp.read(4096)
            conn.close()
            raise self._http_error(url, resp.status, body)
        return conn, resp

    def _connection(self, timeout: float | None, headers: dict[str, str]) -> http.client.HTTPConnection:
        if self.addr.path is not None:
            return _UnixConnection(self.addr.path, timeout)
        if not self.addr.tls:
            return http.client.HTTPConnection(self.addr.host, self.addr.port, timeout=timeout)
        ctx = ssl.create_default_context()
        cert, key = os.environ.get(ENV_CERT), os.environ.get(ENV_KEY)
        if cert:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as e:
                raise ObserverError(f"bad ${ENV_CERT} {cert!r}: {getattr(e, 'reason', None) or e}") from None
        auth = os.environ.get(ENV_AUTH)
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        return http.client.HTTPSConnection(self.addr.host, self.addr.port, timeout=timeout, context=ctx)

    def _http_error(self, url: str, status: int, body: bytes) -> ObserverError:
        try:
            msg = json.loads(body).get("error")
        except (ValueError, AttributeError):
            msg = None
        if msg:  # the daemon's own explanation (e.g. a bad filter value)
            return ObserverError(f"daemon at {self.addr}: {msg}")
        if status == 404 and self.addr.path is None and b"Unix socket" in body:
            return ObserverError(f"the daemon at {self.addr} serves its JSON API on its Unix socket only: "
                                 "run this on its host (as root or its socket's group), or set "
                                 "tcp_api = true in its config")
        if status == 401:
            return ObserverError(f"daemon at {self.addr}: HTTP 401 for {url}: its web config requires basic "
                                 f"auth: set ${ENV_AUTH} to USER:PASSWORD, or use its Unix socket")
        if status == 404:
            return DaemonUnavailable(f"no hvo-observer API at {self.addr} ({url}: HTTP 404; another "
                                     "service on that port, or an older daemon?)")
        text = body.decode("utf-8", "replace").strip().splitlines()
        detail = f": {text[0][:200]}" if text else ""  # e.g. "too many clients"
        return ObserverError(f"daemon at {self.addr}: HTTP {status} for {url}{detail}")

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET one JSON document."""
        conn, resp = self._open(path, params, self.timeout)
        try:
            body = resp.read()
        except OSError as e:
            raise self._os_error(e) from None
        except http.client.HTTPException as e:
            raise ObserverError(f"daemon at {self.addr}: incomplete answer to {API}{path} "
                                f"({type(e).__name__})") from None
        finally:
            conn.close()
        try:
            return json.loads(body)
        except ValueError:
            raise DaemonUnavailable(f"no hvo-observer daemon at {self.addr}: {API}{path} did not "
                                    "return JSON (another service on that port?)") from None

    def metrics(self) -> str:
        """The Prometheus text exposition of ``/metrics``."""
        conn, resp = self._open("/metrics", None, self.timeout, prefix="")
        try:
            return resp.read().decode("utf-8", "replace")
        except OSError as e:
            raise self._os_error(e) from None
        except http.client.HTTPException as e:
            raise ObserverError(f"daemon at {self.addr}: incomplete /metrics ({type(e).__name__})") from None
        finally:
            conn.close()

    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """GET a JSON-lines stream: connects now (so nothing after this call is missed), then the
        iterator yields each object until the daemon closes the stream."""
        conn, resp = self._open(path, params, None)
        return self._lines(conn, resp, path)

    def _lines(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, path: str
               ) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    line = resp.readline()
                except OSError as e:
                    raise self._os_error(e) from None
                except http.client.HTTPException:
                    return
                if not line:
                    return
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise ObserverError(f"daemon at {self.addr}: malformed line in {API}{path}: "
                                            f"{line[:60]!r}") from None
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        doc = self.get("/status")
        if not isinstance(doc, dict):
            raise DaemonUnavailable(f"no hvo-observer daemon at {self.addr}: {API}/status is not an object")
        if "hstates" not in doc:
            raise DaemonStarting(f"the daemon at {self.addr} is still starting (attaching probes, taking the "
                                 "baseline): try again in a few seconds")
        return doc


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's Unix socket."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def client_from(args: argparse.Namespace, timeout: float = 5.0) -> DaemonClient:
    return DaemonClient(address_from(args), timeout)
