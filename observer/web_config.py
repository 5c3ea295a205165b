"""The TCP listener's security: a web configuration file in the Prometheus exporter-toolkit format.

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # NoClientCert (default), VerifyClientCertIfGiven
      client_ca_file: clients-ca.crt
      client_allowed_sans: [prometheus.example.org]  # optional, with a required client certificate
      min_version: TLS12               # TLS10 .. TLS13 (default TLS12); max_version likewise (TLS13)
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000
    basic_auth_users:
      prometheus: $2b$12$...           # bcrypt hash (htpasswd -nBC 12 '' | tr -d ':\\n')

The same file node_exporter and Prometheus itself take as ``--web.config.file``, parsed with Debian's
python3-yaml, served with the standard library's ``ssl`` (OpenSSL) and checked with Debian's
python3-bcrypt. Keys this server cannot honour as the Go toolkit does (Go cipher-suite and curve
names, inline keys, client certificates requested without verification, rate limits) are refused by
name rather than ignored. A problem is one ObserverError naming the file and the key.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from observer.errors import ObserverError

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# client_auth_type -> whether a certificate is required; Go's RequestClientCert and
# RequireAnyClientCert accept certificates nobody verified, which OpenSSL's server API cannot.
CLIENT_AUTH = {"NoClientCert": None, "VerifyClientCertIfGiven": False, "RequireAndVerifyClientCert": True}
UNVERIFIED_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# Headers the toolkit lets a web config set, with the values it allows (None: any).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "client_ca", "client_allowed_sans",
            "min_version", "max_version", "prefer_server_cipher_suites", "cipher_suites", "curve_preferences",
            "cert", "key")
UNSUPPORTED_TLS = {"cipher_suites": "Go cipher-suite names", "curve_preferences": "Go curve names",
                   "cert": "inline certificates (use cert_file)", "key": "inline keys (use key_file)"}
BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
AUTH_CACHE_SIZE = 256
# Compared against when the user is unknown, so a wrong name costs what a wrong password costs.
_DUMMY_HASH = b"$2b$10$0VaSIUsF.YuYpkH0dQGOdeNGIl.6fu1wrVKc.aab2IvUtMi626XQa"


@dataclass(frozen=True)
class WebConfig:
    """What the TCP listener enforces; ``WebConfig()`` is plain HTTP without authentication."""

    path: Path | None = None
    ssl_context: ssl.SSLContext | None = None
    allowed_sans: tuple[str, ...] = ()
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    fingerprint: str = ""  # digest of the file and the files it names: unchanged -> same config
    _cache: OrderedDict[str, bool] = field(default_factory=OrderedDict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def describe(self) -> str:
        if self.path is None:
            return "plain HTTP, no authentication"
        parts = ["TLS" if self.tls else "plain HTTP"]
        if self.ssl_context is not None and self.ssl_context.verify_mode != ssl.CERT_NONE:
            required = self.ssl_context.verify_mode == ssl.CERT_REQUIRED
            parts.append("client certificates " + ("required" if required else "verified if given"))
        parts.append(f"basic auth ({len(self.users)} users)" if self.users else "no basic auth")
        return f"{', '.join(parts)} (web config {self.path})"

    def san_allowed(self, cert: Mapping[str, Any] | None) -> bool:
        """Whether a verified peer certificate names one of ``client_allowed_sans`` (always true
        without that key)."""
        if not self.allowed_sans:
            return True
        sans = {str(value) for _, value in (cert or {}).get("subjectAltName", ())}
        return bool(sans & set(self.allowed_sans))

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header satisfies ``basic_auth_users`` (always true without
        users). bcrypt takes tens of milliseconds by design; like the toolkit, a successful or failed
        check is remembered (keyed by a digest of user, hash and password), so a scraper pays once."""
        if not self.users:
            return True
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), hashed or b"", password.encode()))).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        import bcrypt

        ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        with self._lock:
            self._cache[key] = ok
            while len(self._cache) > AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
        return ok


def load(path: Path) -> WebConfig:
    """The web config of ``path``; ObserverError naming the file and the key on any problem."""
    where = f"web config file {path}"
    try:
        import yaml
    except ImportError:
        raise ObserverError(f"{where}: reading it needs PyYAML (apt-get install python3-yaml)") from None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ObserverError(f"{where}: no such file") from None
    except PermissionError:
        raise ObserverError(f"{where}: permission denied") from None
    except OSError as e:
        raise ObserverError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ObserverError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    if doc is None:
        doc = {}
    _mapping(doc, where, "the file")
    _known(doc, ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"), where, "")
    if "rate_limit" in doc:
        raise ObserverError(f"{where}: rate_limit is not supported by hvo-observer (the listener has its own "
                            "per-peer connection limits)")
    digest = hashlib.sha256(raw)
    base = path.parent
    tls = _mapping(doc.get("tls_server_config") or {}, where, "tls_server_config")
    ctx, sans = _ssl_context(tls, base, where, digest) if tls else (None, ())
    http = _mapping(doc.get("http_server_config") or {}, where, "http_server_config")
    _known(http, ("http2", "headers"), where, "http_server_config.")
    if not isinstance(http.get("http2", True), bool):
        raise ObserverError(f"{where}: http_server_config.http2 = {http['http2']!r} is not true or false")
    headers = _headers(_mapping(http.get("headers") or {}, where, "http_server_config.headers"), where)
    users = _users(_mapping(doc.get("basic_auth_users") or {}, where, "basic_auth_users"), where)
    return WebConfig(path, ctx, sans, users, headers, digest.hexdigest())


def _mapping(value: object, where: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ObserverError(f"{where}: {name} must be a mapping of names to values, not {value!r:.60}")
    return value


def _known(doc: Mapping[str, Any], keys: tuple[str, ...], where: str, prefix: str) -> None:
    for key in doc:
        if key not in keys:
            raise ObserverError(f"{where}: unknown key {prefix}{key}; known keys: "
                                f"{', '.join(prefix + k for k in keys)}")


def _string(tls: Mapping[str, Any], key: str, where: str) -> str:
    value = tls.get(key) or ""
    if not isinstance(value, str):
        raise ObserverError(f"{where}: tls_server_config.{key} = {value!r} is not a string")
    return value


def _file(tls: Mapping[str, Any], key: str, base: Path, where: str, digest: Any) -> Path | None:
    text = _string(tls, key, where)
    if not text:
        return None
    path = base / text
    try:
        digest.update(path.read_bytes())
    except OSError as e:
        raise ObserverError(f"{where}: tls_server_config.{key} {path}: {e.strerror or e}") from None
    return path


def _version(tls: Mapping[str, Any], key: str, default: str, where: str) -> ssl.TLSVersion:
    name = tls.get(key) or default
    if name not in TLS_VERSIONS:
        raise ObserverError(f"{where}: tls_server_config.{key} = {name!r} is invalid: expected one of "
                            f"{', '.join(TLS_VERSIONS)}")
    return TLS_VERSIONS[name]


def _ssl_context(tls: Mapping[str, Any], base: Path, where: str, digest: Any
                 ) -> tuple[ssl.SSLContext | None, tuple[str, ...]]:
    _known(tls, TLS_KEYS, where, "tls_server_config.")
    for key, what in UNSUPPORTED_TLS.items():
        if tls.get(key):
            raise ObserverError(f"{where}: tls_server_config.{key} is not supported ({what}); leave it out "
                                "to use OpenSSL's defaults")
    cert = _file(tls, "cert_file", base, where, digest)
    key = _file(tls, "key_file", base, where, digest)
    ca_file = _file(tls, "client_ca_file", base, where, digest)
    ca_text = _string(tls, "client_ca", where)
    auth = _string(tls, "client_auth_type", where) or "NoClientCert"
    if not (cert or key or ca_file or ca_text or tls.get("client_auth_type")):
        return None, ()  # as the toolkit: no TLS key set means plain HTTP
    if cert is None or key is None:
        raise ObserverError(f"{where}: tls_server_config needs both cert_file and key_file")
    if auth in UNVERIFIED_AUTH:
        raise ObserverError(f"{where}: tls_server_config.client_auth_type = {auth!r} is not supported (it "
                            "accepts certificates nobody verified): use VerifyClientCertIfGiven or "
                            "RequireAndVerifyClientCert with client_ca_file")
    if auth not in CLIENT_AUTH:
        raise ObserverError(f"{where}: tls_server_config.client_auth_type = {auth!r} is invalid: expected "
                            f"one of {', '.join((*CLIENT_AUTH, *UNVERIFIED_AUTH))}")
    required = CLIENT_AUTH[auth]
    if (ca_file or ca_text) and required is None:
        raise ObserverError(f"{where}: tls_server_config.client_ca_file is set but client_auth_type is "
                            f"{auth}: set client_auth_type to RequireAndVerifyClientCert")
    if required is not None and not (ca_file or ca_text):
        raise ObserverError(f"{where}: tls_server_config.client_auth_type = {auth!r} needs client_ca_file")
    sans = tls.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise ObserverError(f"{where}: tls_server_config.client_allowed_sans = {sans!r} is not a list "
                            "of names")
    if sans and required is not True:
        raise ObserverError(f"{where}: tls_server_config.client_allowed_sans needs client_auth_type "
                            "RequireAndVerifyClientCert")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(tls, "min_version", "TLS12", where)
    ctx.maximum_version = _version(tls, "max_version", "TLS13", where)
    if ctx.minimum_version > ctx.maximum_version:
        raise ObserverError(f"{where}: tls_server_config.min_version is above max_version")
    if tls.get("prefer_server_cipher_suites", True):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ObserverError(f"{where}: tls_server_config.cert_file {cert} / key_file {key}: cannot load the "
                            f"certificate and key: {getattr(e, 'reason', None) or e}") from None
    if required is not None:
        try:
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            else:
                ctx.load_verify_locations(cadata=ca_text)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ObserverError(f"{where}: tls_server_config.client_ca_file {ca_file or '(client_ca)'}: "
                                f"cannot load CA certificates: {getattr(e, 'reason', None) or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return ctx, tuple(sans)


def _headers(headers: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for name, value in headers.items():
        canonical = next((h for h in HEADERS if h.lower() == name.lower()), None)
        if canonical is None:
            raise ObserverError(f"{where}: http_server_config.headers: {name!r} cannot be configured; "
                                f"allowed: {', '.join(HEADERS)}")
        allowed = HEADERS[canonical]
        bad = not isinstance(value, str) or any(c in value for c in "\r\n")
        if bad or (allowed and value not in allowed):
            expect = f"one of {', '.join(allowed)}" if allowed else "a one-line string"
            raise ObserverError(f"{where}: http_server_config.headers.{name} = {value!r} is invalid: "
                                f"expected {expect}")
        out.append((canonical, value))
    return tuple(out)


def _users(users: Mapping[str, Any], where: str) -> dict[str, bytes]:
    if users:
        try:
            import bcrypt  # noqa: F401  (checked now, used at the first request)
        except ImportError:
            raise ObserverError(f"{where}: basic_auth_users needs bcrypt (Debian: apt-get install "
                                "python3-bcrypt)") from None
    out = {}
    for user, hashed in users.items():
        if ":" in user or not user:
            raise ObserverError(f"{where}: basic_auth_users: {user!r} is not a valid user name")
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise ObserverError(f"{where}: basic_auth_users.{user} is not a bcrypt hash (make one with "
                                "'htpasswd -nBC 12 \"\" | tr -d \":\\n\"' or python3 -c 'import bcrypt; "
                                "print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())')")
        out[user] = hashed.encode()
    return out
