"""Debian packages from other suites: apt sources parsing (fixture text) and a live private apt state."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from observer.errors import ObserverError
from observer.kernel import debian_packages as dp

# Host names here are placeholders: the real ones come from the host at run time.
DEB822 = """\
# A comment before the first stanza
Types: deb deb-src
# http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian https://other.example.net/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example.org/debian
Suites: trixie
Components: main
Enabled: no

Types: deb-src
URIs: http://src-only.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://vendor.example.com/node_20.x
Suites: nodistro
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----
"""

ONE_LINE = """\
# deb http://commented.example.org/debian bookworm main
deb [arch=amd64 signed-by=/etc/apt/keyrings/mirror.gpg] http://one.example.org/debian/ bookworm main non-free
deb-src http://one.example.org/debian bookworm main
deb http://one.example.org/debian-security bookworm-security main  # trailing comment
deb https://vendor.example.com/apt cloud-sdk-bookworm main
"""


def test_deb822_entries():
    entries = dp.parse_deb822(DEB822, Path("x.sources"))
    assert [e.suites for e in entries] == [
        ("bookworm", "bookworm-updates"),
        ("bookworm-security",),
        ("nodistro",),
    ]
    first = entries[0]
    assert first.uris == ("http://mirror.example.org/debian", "https://other.example.net/debian/")
    assert first.components == ("main", "contrib")
    assert first.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert entries[2].signed_by is None  # an inline key is not a keyring path


def test_one_line_entries():
    entries = dp.parse_one_line(ONE_LINE, Path("sources.list"))
    assert [(e.uris, e.suites) for e in entries] == [
        (("http://one.example.org/debian/",), ("bookworm",)),
        (("http://one.example.org/debian-security",), ("bookworm-security",)),
        (("https://vendor.example.com/apt",), ("cloud-sdk-bookworm",)),
    ]
    assert entries[0].components == ("main", "non-free")
    assert entries[0].signed_by == "/etc/apt/keyrings/mirror.gpg"


def _apt_tree(tmp_path: Path, *, sources: str = "", one_line: str = "", extra: dict[str, str] | None = None):
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    if sources:
        (d / "debian.sources").write_text(sources)
    if one_line:
        (tmp_path / "etc/apt/sources.list").write_text(one_line)
    for name, text in (extra or {}).items():
        (d / name).write_text(text)
    return tmp_path


def test_host_uris_skip_security_third_party_and_disabled(tmp_path):
    root = _apt_tree(
        tmp_path,
        sources=DEB822,
        one_line=ONE_LINE,
        extra={"google.list.disabled-by-farm": "deb http://ignored.example.org/debian bookworm main\n"},
    )
    assert dp.host_apt_uris(root) == [
        "http://one.example.org/debian",
        "http://mirror.example.org/debian",
        "https://other.example.net/debian",
    ]


def test_host_uris_none_names_the_files(tmp_path):
    root = _apt_tree(
        tmp_path,
        sources="Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: bookworm-security\n",
    )
    with pytest.raises(ObserverError, match=re.escape(str(root / "etc/apt/sources.list.d/debian.sources"))):
        dp.host_apt_uris(root)


def test_host_keyring_from_signed_by_else_default(tmp_path):
    root = _apt_tree(tmp_path, one_line=ONE_LINE)
    with pytest.raises(ObserverError, match=r"debian-archive-keyring\.gpg is missing"):
        dp.host_keyring(root)
    (root / "usr/share/keyrings").mkdir(parents=True)
    (root / "usr/share/keyrings/debian-archive-keyring.gpg").write_bytes(b"k")
    assert dp.host_keyring(root) == root / "usr/share/keyrings/debian-archive-keyring.gpg"
    (root / "etc/apt/keyrings").mkdir()
    (root / "etc/apt/keyrings/mirror.gpg").write_bytes(b"k")
    assert dp.host_keyring(root) == root / "etc/apt/keyrings/mirror.gpg"


def test_newest_abi_across_naming_schemes():
    bookworm = [
        "linux-image-6.1.0-47-amd64",
        "linux-image-6.1.0-50-amd64-unsigned",
        "linux-image-6.1.0-50-amd64-dbg",
        "linux-image-6.1.0-51-rt-amd64",
        "linux-image-6.1.0-52-cloud-amd64",
        "linux-image-amd64",
    ]
    assert dp.newest_abi(bookworm) == "6.1.0-50"
    assert dp.newest_abi(["linux-image-6.12.107+deb13-amd64", "linux-image-6.12.117+deb13-amd64"]) == (
        "6.12.117+deb13"
    )
    assert (
        dp.newest_abi(["linux-image-7.2.13+deb14-amd64", "linux-binary-7.2.14+deb14-amd64"]) == "7.2.13+deb14"
    )
    assert dp.newest_abi(["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-10-amd64"]) == "6.1.0-10"
    assert dp.newest_abi(["linux-image-amd64"]) is None


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HVO_CACHE_DIR", str(tmp_path))
    assert dp.cache_dir() == tmp_path
    monkeypatch.delenv("HVO_CACHE_DIR")
    assert dp.cache_dir() == Path("/var/cache/hvo-observer")


def test_bad_suite_name():
    with pytest.raises(ObserverError, match="bad Debian suite name"):
        dp.AptSuite("../etc")


# --- live: the Debian archive through the host's own sources (network to the registry) -------------


def test_live_bookworm_policy():
    apt = dp.AptSuite("bookworm")
    candidate = apt.policy("linux-image-amd64")
    assert candidate is not None and candidate.startswith("6.1."), candidate
    assert apt.policy("hvo-observer-no-such-package") is None
    # The private sources file names only URIs from the host and the host's keyring.
    sources = (apt.root / "etc/sources.list.d/bookworm.sources").read_text()
    assert f"URIs: {' '.join(dp.host_apt_uris())}\n" in sources
    assert f"Signed-By: {dp.host_keyring()}\n" in sources


def test_live_download_is_cached_and_extracts(tmp_path):
    abi = dp.newest_kernel_abi("bookworm")
    assert re.fullmatch(r"6\.1\.0-\d+", abi), abi
    apt = dp.AptSuite("bookworm")
    package = f"linux-headers-{abi}-amd64"  # the smallest package of a kernel (about 2 MB)
    (deb,) = apt.download([package], tmp_path / "debs")
    assert deb.name.startswith(f"{package}_") and deb.suffix == ".deb"
    before = deb.stat()
    assert apt.download([package], tmp_path / "debs") == [deb]
    after = deb.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not fetched again
    apt.extract(deb, tmp_path / "x")
    assert (tmp_path / f"x/usr/src/{package}/include/generated/autoconf.h").is_file()


def test_live_prepare_headers_builds_one_merged_tree(tmp_path, monkeypatch):
    suite, real = "bookworm", dp.cache_dir()
    abi = dp.newest_kernel_abi(suite)
    packages = [f"linux-headers-{abi}-common", f"linux-headers-{abi}-amd64"]
    debs = dp.AptSuite(suite).download(packages, real / "debs" / suite)  # cached: no network once setup ran
    # A cache of our own, sharing the real apt state and the downloaded packages.
    monkeypatch.setenv("HVO_CACHE_DIR", str(tmp_path))
    (tmp_path / "apt").symlink_to(real / "apt")
    (tmp_path / "debs" / suite).mkdir(parents=True)
    for deb in debs:
        shutil.copy2(deb, tmp_path / "debs" / suite)
    stale = tmp_path / f"kernel-headers/.{abi}-amd64-killed"  # scratch tree of a killed run
    (stale / "unpacked").mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    tree = dp.prepare_headers(suite, abi)

    assert tree == tmp_path / "kernel-headers" / f"{abi}-amd64"
    assert [p.name for p in tree.parent.iterdir()] == [tree.name]  # scratch trees gone, stale one too
    # One tree holding both packages' halves, as bcc needs with BCC_KERNEL_SOURCE.
    for rel in (
        "include/linux/kconfig.h",  # -common
        "include/generated/autoconf.h",  # -amd64
        "arch/x86/include/asm/ptrace.h",  # -common
        "arch/x86/include/generated/asm/rwonce.h",  # -amd64
        "include/uapi/linux/bpf.h",
        "include/dt-bindings/input/linux-event-codes.h",  # a relative symlink inside -common
    ):
        assert (tree / rel).is_file(), rel
    assert not (tree / "scripts").is_symlink()  # the dangling link into linux-kbuild is gone
    inode = tree.stat().st_ino
    assert dp.prepare_headers(suite, abi) == tree
    assert tree.stat().st_ino == inode  # cached, not rebuilt


def test_expired_release_files_are_accepted_only_when_asked(monkeypatch):
    monkeypatch.delenv(dp.ACCEPT_EXPIRED_ENV, raising=False)
    assert "Acquire::Check-Valid-Until=false" not in dp.AptSuite("sid")._options()
    monkeypatch.setenv(dp.ACCEPT_EXPIRED_ENV, "1")
    assert "Acquire::Check-Valid-Until=false" in dp.AptSuite("sid")._options()
