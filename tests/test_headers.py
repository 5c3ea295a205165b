"""Choosing bcc's kernel headers, on fixture trees built under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from observer.errors import ObserverError
from observer.kernel import headers

RELEASE = "6.12.9-test"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("/* fixture */\n")


def _full_tree(tree: Path) -> Path:
    _touch(tree / "include/linux/kconfig.h")
    _touch(tree / "include/generated/autoconf.h")
    return tree


def _cached(cache: Path, name: str) -> Path:
    return _full_tree(cache / "kernel-headers" / name)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def cache(tmp_path):
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


def test_own_build_tree_is_exact(root, cache):
    build = _full_tree(root / f"lib/modules/{RELEASE}/build")
    _cached(cache, "6.1.0-50-amd64")  # present but not preferred
    choice = headers.find_bcc_headers(RELEASE, root=root, cache=cache)
    assert (choice.path, choice.exact, choice.release) == (build, True, RELEASE)


def test_debian_split_build_and_source_is_exact(root, cache):
    kdir = root / f"lib/modules/{RELEASE}"
    _touch(kdir / "build/include/generated/autoconf.h")
    _touch(kdir / "source/include/linux/kconfig.h")
    choice = headers.find_bcc_headers(RELEASE, root=root, cache=cache)
    assert choice.exact and choice.path == kdir / "build"


def test_leftover_build_dir_without_headers_is_not_used(root, cache):
    (root / f"lib/modules/{RELEASE}/build/include").mkdir(parents=True)  # e.g. headers removed
    cached = _cached(cache, "6.1.0-50-amd64")
    choice = headers.find_bcc_headers(RELEASE, root=root, cache=cache)
    assert (choice.path, choice.exact) == (cached, False)


def test_kheaders_is_exact(root, cache):
    _touch(root / "sys/kernel/kheaders.tar.xz")
    choice = headers.find_bcc_headers(RELEASE, root=root, cache=cache)
    assert choice.exact and choice.path == root / "sys/kernel/kheaders.tar.xz"


def test_cache_prefers_same_series_then_newest(root, cache):
    bookworm = _cached(cache, "6.1.0-50-amd64")
    oldest = _cached(cache, "6.1.0-9-amd64")
    same = _cached(cache, "6.12.117+deb13-amd64")
    newest = _cached(cache, "7.2.13+deb14-amd64")
    _cached(cache, "7.10.1+deb14-amd64")
    _touch(cache / "kernel-headers/.6.12.200-1-amd64-scratch/include/linux/kconfig.h")  # half-built
    (cache / "kernel-headers/6.12.999+deb13-amd64").mkdir()  # no headers inside

    def pick(release: str) -> Path:
        return headers.find_bcc_headers(release, root=root, cache=cache).path

    choice = headers.find_bcc_headers("6.12.9-test", root=root, cache=cache)
    assert (choice.path, choice.exact) == (same, False)
    assert "not the running kernel's" in choice.describe()
    assert pick("6.18.44-fc-v782") == same  # newest series not newer than the kernel
    assert pick("7.5.0") == newest
    assert pick("6.1.5") == bookworm  # same series: the newest ABI of it
    assert pick("5.10.0-30-amd64") == oldest  # all newer: the oldest of them


def test_nothing_found_names_every_place_searched(root, cache):
    with pytest.raises(ObserverError) as err:
        headers.find_bcc_headers(RELEASE, root=root, cache=cache)
    message = str(err.value)
    for place in (
        root / f"lib/modules/{RELEASE}/build",
        root / "sys/kernel/kheaders.tar.xz",
        cache / "kernel-headers",
    ):
        assert str(place) in message
    assert "install linux-headers-" in message and "--prepare" in message


def test_apply_sets_or_clears_bcc_kernel_source(root, cache, monkeypatch):
    monkeypatch.setenv(headers.ENV, "/stale")
    inexact = headers.find_bcc_headers(
        RELEASE, root=root, cache=_cached(cache, "6.1.0-50-amd64").parent.parent
    )
    headers.apply(inexact)
    assert os.environ[headers.ENV] == str(inexact.path)
    _full_tree(root / f"lib/modules/{RELEASE}/build")
    headers.apply(headers.find_bcc_headers(RELEASE, root=root, cache=cache))
    assert headers.ENV not in os.environ  # bcc finds the kernel's own headers, split trees included


def test_cli_reports_the_choice_or_the_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HVO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(headers.platform, "release", lambda: "0.0.0-no-such-kernel")
    assert headers.main([]) != 0
    assert "install linux-headers-0.0.0-no-such-kernel" in capsys.readouterr().err
    _cached(tmp_path, "6.1.0-50-amd64")
    assert headers.main([]) == 0
    assert f"bcc headers: Debian 6.1.0-50-amd64 headers (kernel is 0.0.0-no-such-kernel) at {tmp_path}" in (
        capsys.readouterr().out
    )
