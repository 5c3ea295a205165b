"""The daemon's TOML config and flags: defaults, precedence, and one-line errors naming the culprit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from observer.config import KEYS, Config, load_file, parse_listen, resolve
from observer.errors import ObserverError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hvo-observer.toml"
    path.write_text(text)
    return path


def test_defaults_listen_on_loopback_port_9817() -> None:
    cfg = resolve(None, {})
    assert cfg == Config()
    assert cfg.address == ("127.0.0.1", 9817)


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "127.0.0.1:1234"\nmode = "tracepoint"\nsettle_seconds = 2\n')
    cfg = resolve(path, {"listen": "[::1]:9999", "mode": None, "settle_seconds": None})
    assert (cfg.listen, cfg.mode, cfg.settle_seconds) == ("[::1]:9999", "tracepoint", 2.0)
    assert cfg.address == ("::1", 9999)


def test_the_shipped_example_config_is_valid_and_has_every_key() -> None:
    example = REPO / "systemd" / "hvo-observer.toml"
    values = load_file(example)
    assert set(values) == set(KEYS)
    assert resolve(example, {}) == Config()  # the example documents the defaults


@pytest.mark.parametrize(("text", "expected"), [
    ('listn = "127.0.0.1:1"\n', "unknown key 'listn'"),
    ('settle-seconds = 1\n', "did you mean 'settle_seconds'"),
    ('listen = 9817\n', "listen = 9817 is invalid"),
    ('listen = "localhost"\n', "expected HOST:PORT"),
    ('listen = "127.0.0.1:99999"\n', "port '99999'"),
    ('mode = "ebpf"\n', "mode = 'ebpf' is invalid: expected one of auto, fentry, kprobe, tracepoint"),
    ('settle_seconds = "1"\n', "settle_seconds = '1' is invalid: expected a number of seconds"),
    ('settle_seconds = 0\n', "between 0.05 and 3600"),
    ('ring_buffer_bytes = 5000\n', "power-of-two multiple of the page size"),
    ('ring_buffer_bytes = true\n', "ring_buffer_bytes = True is invalid: expected an integer"),
    ('log_level = "loud"\n', "log_level = 'loud'"),
    ('max_clients = 0\n', "max_clients = 0"),
    ('listen = "127.0.0.1:1\n', "invalid TOML"),
])
def test_bad_file_is_one_line_naming_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ObserverError) as e:
        resolve(path, {})
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ObserverError, match=r"config file .*nope.toml: no such file"):
        resolve(tmp_path / "nope.toml", {})


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ObserverError, match=r"^--settle-seconds: settle_seconds = -1.0 is invalid"):
        resolve(None, {"settle_seconds": -1.0})
    with pytest.raises(ObserverError, match=r"^--listen: listen = '::1:80' is invalid: put an IPv6"):
        resolve(None, {"listen": "::1:80"})


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_listen("[::]:9817") == ("::", 9817)
    for bad in ("9817", ":9817", "[::1:9817", "[nothex]:1", "host:port"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_cli_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, 'mode = "fast"\n')
    r = subprocess.run([sys.executable, "-m", "observer", "run", "--config", str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"hvo-observer: config file {path}: mode = 'fast'")
