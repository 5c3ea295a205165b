"""Daemon configuration: a TOML file whose keys are the ``run`` flags' names; flags override it.

    listen = "127.0.0.1:9817"      # HOST:PORT, [IPv6]:PORT; port 0 picks a free port
    mode = "auto"                  # auto | fentry | kprobe | tracepoint
    settle_seconds = 1.0           # quiet time before drift is evaluated
    ring_buffer_bytes = 4194304    # BPF ring buffer, a power-of-two number of pages
    log_level = "info"             # debug | info | warning | error
    recent_events = 4096           # events kept for /api/v1/events
    max_clients = 16               # concurrent HTTP requests
    max_streams = 8                # concurrent event streams (a budget of their own)
    web_config_file = ""           # exporter-toolkit web config: TLS, basic auth (TCP listener)
    api_socket = "/run/hvo-observer/api.sock"  # the JSON API's Unix socket; "" for none
    api_socket_group = ""          # group that may use the socket besides root ("": root only)
    tcp_api = false                # also serve the JSON API on `listen` (behind the web config)

Any problem is one ObserverError naming the file (or flag), the key and the value.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from observer.errors import ObserverError

MODES = ("auto", "fentry", "kprobe", "tracepoint")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_PORT = 9817
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Config:
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    mode: str = "auto"
    settle_seconds: float = 1.0
    ring_buffer_bytes: int = 1 << 22
    log_level: str = "info"
    recent_events: int = 4096
    max_clients: int = 16
    max_streams: int = 8
    web_config_file: str = ""
    api_socket: str = "/run/hvo-observer/api.sock"
    api_socket_group: str = ""
    tcp_api: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


KEYS = tuple(f.name for f in fields(Config))


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); ValueError with the reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9817")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("unbalanced brackets around the IPv6 address")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError("put an IPv6 address in brackets: [::1]:9817")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def _listen(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string HOST:PORT")
    parse_listen(v)
    return v


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(v: object) -> str:
        if not isinstance(v, str) or v.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v.lower()
    return check


def _seconds(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("expected a number of seconds")
    if not 0.05 <= v <= 3600:
        raise ValueError("expected between 0.05 and 3600 seconds")
    return float(v)


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError("expected an integer")
        if not lo <= v <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}")
        return v
    return check


def _ring_bytes(v: object) -> int:
    v = _int_in(PAGE_SIZE, 1 << 30)(v)
    pages = v // PAGE_SIZE
    if v % PAGE_SIZE or pages & (pages - 1):
        raise ValueError(f"expected a power-of-two multiple of the page size ({PAGE_SIZE}), e.g. {1 << 22}")
    return v


def _file_path(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string path")
    return v


def _path(v: object) -> str:
    v = _file_path(v)
    if v and not v.startswith("/"):
        raise ValueError("expected an absolute path, or \"\" for none")
    return v


def _group(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a group name or number as a string")
    if v and (any(c.isspace() or c in ":/" for c in v) or len(v) > 64):
        raise ValueError("expected a group name or number")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError("expected true or false")
    return v


CHECKS: dict[str, Callable[[object], object]] = {
    "listen": _listen,
    "mode": _choice(MODES),
    "settle_seconds": _seconds,
    "ring_buffer_bytes": _ring_bytes,
    "log_level": _choice(LOG_LEVELS),
    "recent_events": _int_in(16, 1_000_000),
    "max_clients": _int_in(1, 1024),
    "max_streams": _int_in(1, 1024),
    "web_config_file": _file_path,
    "api_socket": _path,
    "api_socket_group": _group,
    "tcp_api": _bool,
}
assert set(CHECKS) == set(KEYS)


def check_value(key: str, value: object, where: str) -> object:
    """The validated value; ObserverError naming ``where`` (file or flag), the key and the value."""
    try:
        return CHECKS[key](value)
    except (TypeError, ValueError) as e:
        raise ObserverError(f"{where}: {key} = {value!r} is invalid: {e}") from None


def load_file(path: Path) -> dict[str, object]:
    """The validated keys of a TOML config file (only those present)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ObserverError(f"config file {path}: no such file") from None
    except PermissionError:
        raise ObserverError(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise ObserverError(f"config file {path}: is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ObserverError(f"config file {path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ObserverError(f"config file {path}: cannot read: {e}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        if key not in CHECKS:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if key.replace("-", "_") in CHECKS else ""
            raise ObserverError(f"config file {path}: unknown key {key!r} = {value!r}{hint}; "
                                f"known keys: {', '.join(KEYS)}")
        values[key] = check_value(key, value, f"config file {path}")
    return values


def resolve(path: Path | None, overrides: Mapping[str, object]) -> Config:
    """Defaults, then the file, then the flags given on the command line (``None``: not given)."""
    config = Config()
    if path is not None:
        config = replace(config, **load_file(path))
    flags = {k: check_value(k, v, f"--{k.replace('_', '-')}") for k, v in overrides.items() if v is not None}
    return replace(config, **flags)
