"""Debian packages from any suite, fetched without touching the host's apt state.

Used to get stock Debian kernels (QEMU kernel matrix) and kernel headers (for bcc) from bookworm,
bookworm-backports, trixie or sid. Each suite gets a private apt state directory under
``cache_dir()/apt/<suite>``; the archive URIs and keyring come from the host's own apt sources,
so no mirror is hard-coded. Packages are unpacked with ``dpkg-deb -x``, never installed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from observer.errors import ObserverError

DEFAULT_CACHE_DIR = Path("/var/cache/hvo-observer")
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
UPDATE_MAX_AGE_S = 24 * 3600
APT_TIMEOUT_S = 1800

# Suite names that identify a Debian archive entry (third-party repositories use other names).
_DEBIAN_SUITES = frozenset(
    {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid", "experimental", "rc-buggy"}
    | {"oldoldstable", "oldstable", "stable", "testing", "unstable"}
)
_SUITE_SUFFIXES = ("-security", "-updates", "-backports", "-backports-sloppy", "-proposed-updates")
# Suites served only by their own archive (debian-security) or carrying only point updates.
_AUXILIARY_SUFFIXES = ("-security", "-updates")


def cache_dir() -> Path:
    """Where downloaded packages, private apt state and header trees live."""
    return Path(os.environ.get("HVO_CACHE_DIR") or DEFAULT_CACHE_DIR)


# --- host apt sources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceEntry:
    """One ``deb`` source: URIs x suites x components, as apt would expand it."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None
    origin: Path


def parse_deb822(text: str, origin: Path) -> list[SourceEntry]:
    """Entries of a deb822 ``.sources`` file (``Types: deb`` only, ``Enabled: no`` skipped)."""
    entries = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        signed_by = stanza.get("signed-by", "").strip()
        entries.append(
            SourceEntry(
                uris=tuple(stanza.get("uris", "").split()),
                suites=tuple(stanza.get("suites", "").split()),
                components=tuple(stanza.get("components", "").split()),
                # An inline key block is not a path: leave it to the default keyring.
                signed_by=signed_by if signed_by and "\n" not in signed_by else None,
                origin=origin,
            )
        )
    return entries


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:  # continuation line
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


_ONE_LINE = re.compile(r"^(?P<type>deb|deb-src)\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<rest>.*)$")


def parse_one_line(text: str, origin: Path) -> list[SourceEntry]:
    """Entries of a one-line-format ``sources.list`` (``deb`` lines only)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = _ONE_LINE.match(line)
        if not m or m["type"] != "deb":
            continue
        words = m["rest"].split()
        if len(words) < 2:
            continue
        options = dict(o.split("=", 1) for o in (m["opts"] or "").split() if "=" in o)
        entries.append(
            SourceEntry(
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                signed_by=options.get("signed-by"),
                origin=origin,
            )
        )
    return entries


def _source_files(root: Path) -> list[Path]:
    etc = root / "etc/apt"
    return [
        etc / "sources.list",
        *sorted((etc / "sources.list.d").glob("*.list")),
        *sorted((etc / "sources.list.d").glob("*.sources")),
    ]


def host_sources(root: Path = Path("/")) -> list[SourceEntry]:
    """All ``deb`` entries apt itself would read (files with other suffixes are ignored, like apt)."""
    entries: list[SourceEntry] = []
    for path in _source_files(root):
        if path.suffix == ".sources":
            entries += parse_deb822(_read(path), path)
        elif path.is_file():
            entries += parse_one_line(_read(path), path)
    return entries


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ObserverError(f"cannot read apt sources {path}: {e.strerror or e}") from None


def _suite_base(suite: str) -> str:
    for suffix in _SUITE_SUFFIXES:
        if suite.endswith(suffix):
            return suite[: -len(suffix)]
    return suite


def _is_debian(entry: SourceEntry) -> bool:
    return any(_suite_base(s) in _DEBIAN_SUITES for s in entry.suites) and any(
        u.startswith(("http://", "https://", "file:", "mirror")) for u in entry.uris
    )


def _main_archive_entries(entries: Iterable[SourceEntry]) -> list[SourceEntry]:
    """Debian entries that serve a main suite, not only ``-security``/``-updates``."""
    return [
        e for e in entries if _is_debian(e) and any(not s.endswith(_AUXILIARY_SUFFIXES) for s in e.suites)
    ]


def host_apt_uris(root: Path = Path("/")) -> list[str]:
    """The Debian archive URIs of the host's apt sources, in apt's reading order, without duplicates."""
    entries = _main_archive_entries(host_sources(root))
    uris = list(dict.fromkeys(u.rstrip("/") for e in entries for u in e.uris))
    if not uris:
        files = [str(f) for f in _source_files(root) if f.is_file()] or [str(root / "etc/apt/sources.list")]
        raise ObserverError(
            f"no Debian archive (a 'deb' entry for bookworm, trixie, sid, ...) in {', '.join(files)}"
        )
    return uris


def host_keyring(root: Path = Path("/")) -> Path:
    """The keyring the host's Debian entries are signed by (Debian's archive keyring by default)."""
    for e in _main_archive_entries(host_sources(root)):
        if e.signed_by and (root / e.signed_by.lstrip("/")).is_file():
            return root / e.signed_by.lstrip("/")
    default = root / str(DEFAULT_KEYRING).lstrip("/")
    if default.is_file():
        return default
    raise ObserverError(
        f"Debian archive keyring {default} is missing: apt-get install debian-archive-keyring"
    )


# --- a private apt state per suite ----------------------------------------------------------------

# Frozen archive snapshots serve Release files past their Valid-Until date, which apt refuses unless
# told otherwise. Callers that only unpack packages as fixtures (the test harness's guest kernels) may
# accept them by setting this variable to 1; signatures are checked either way.
ACCEPT_EXPIRED_ENV = "HVO_APT_ACCEPT_EXPIRED_RELEASE"


class AptSuite:
    """apt for one Debian suite, with lists, cache and sources of its own under ``cache_dir()``.

    The keyring of bookworm's debian-archive-keyring (2023.3+deb12u2) holds the trixie keys too,
    which sign trixie and sid (checked: ``update()`` of both succeeds with it).
    """

    def __init__(
        self, suite: str, *, components: Sequence[str] = ("main",), root: Path | None = None
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", suite):
            raise ObserverError(f"bad Debian suite name {suite!r}")
        self.suite = suite
        self.components = tuple(components)
        self.root = (root or cache_dir() / "apt") / suite
        self._etc = self.root / "etc"
        self._stamp = self.root / "updated"

    # apt options that make apt-get/apt-cache use only this directory's state.
    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc": self._etc,
            "Dir::Etc::SourceList": self._etc / "sources.list",
            "Dir::Etc::SourceParts": self._etc / "sources.list.d",
            "Dir::Etc::Preferences": self._etc / "preferences",
            "Dir::Etc::PreferencesParts": self._etc / "preferences.d",
            "Dir::State": r / "state",
            "Dir::State::Lists": r / "lists",
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "cache/archives",
            # Hosts set up like Docker images turn the binary cache off; without it every call
            # parses the lists again (over a second each).
            "Dir::Cache::pkgcache": r / "cache/pkgcache.bin",
            "Dir::Cache::srcpkgcache": r / "cache/srcpkgcache.bin",
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "Acquire::Languages": "none",
            "Acquire::Retries": "3",
        }
        if os.environ.get(ACCEPT_EXPIRED_ENV) == "1":
            opts["Acquire::Check-Valid-Until"] = "false"
        return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]

    def _sources_text(self) -> str:
        return (
            "# Generated by hvo-observer from the host's apt sources.\n"
            "Types: deb\n"
            f"URIs: {' '.join(host_apt_uris())}\n"
            f"Suites: {self.suite}\n"
            f"Components: {' '.join(self.components)}\n"
            f"Architectures: {ARCH}\n"
            f"Signed-By: {host_keyring()}\n"
        )

    def _prepare(self) -> bool:
        """Create the state directories; True when the sources file changed."""
        text = self._sources_text()
        sources = self._etc / "sources.list.d" / f"{self.suite}.sources"
        try:
            for d in (
                self._etc / "sources.list.d",
                self._etc / "preferences.d",
                self.root / "state",
                self.root / "lists/partial",
                self.root / "cache/archives/partial",
            ):
                d.mkdir(parents=True, exist_ok=True)
            (self.root / "status").touch()
            if sources.is_file() and sources.read_text() == text:
                return False
            sources.write_text(text)
        except OSError as e:
            raise ObserverError(
                f"cannot write apt state in {self.root}: {e.strerror or e} (run as root or set HVO_CACHE_DIR)"
            ) from None
        return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One apt run per suite at a time across processes (apt would fail on its own lock instead)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(self.root / ".hvo-lock", "w")  # noqa: SIM115 (closed below, after the yield)
        except OSError as e:
            raise ObserverError(
                f"cannot use {self.root}: {e.strerror or e} (run as root or set HVO_CACHE_DIR)"
            ) from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self._options(), *args]
        try:
            proc = subprocess.run(  # runs: apt-get apt-cache
                cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
            )
        except FileNotFoundError:
            raise ObserverError(f"{tool} not found: this needs Debian's apt") from None
        except subprocess.TimeoutExpired:
            raise ObserverError(
                f"{tool} {' '.join(args)} for {self.suite}: no answer in {APT_TIMEOUT_S} s"
            ) from None
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")]
        if proc.returncode != 0 or errors:
            detail = (errors or proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise ObserverError(f"{tool} {' '.join(args)} for suite {self.suite} failed: {detail}")
        return proc.stdout

    def is_fresh(self, max_age_s: float = UPDATE_MAX_AGE_S) -> bool:
        try:
            return time.time() - self._stamp.stat().st_mtime < max_age_s
        except FileNotFoundError:
            return False

    def update(self, force: bool = False) -> bool:
        """``apt-get update`` for this suite when its lists are older than a day; True when it ran."""
        with self._locked():
            changed = self._prepare()
            if not force and not changed and self.is_fresh():
                return False
            self._run("apt-get", "-q", "update")
            self._stamp.touch()
            return True

    def policy(self, package: str) -> str | None:
        """The candidate version of ``package`` in this suite, or None when the suite has none."""
        self.update()
        out = self._run("apt-cache", "policy", package)
        m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        return None if not m or m[1] == "(none)" else m[1]

    def search(self, regex: str) -> list[str]:
        """Names of the real (not virtual) packages of this suite matching ``regex`` (re.search)."""
        self.update()
        pattern = re.compile(regex)
        names = self._run("apt-cache", "pkgnames").split()
        return sorted(n for n in names if pattern.search(n))

    def download(self, packages: Sequence[str], dest: Path) -> list[Path]:
        """The ``.deb`` files of ``packages`` in ``dest``, downloading only those not there yet."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        out = self._run("apt-get", "download", "--print-uris", *packages)
        # Lines are 'URI' FILE SIZE HASH; FILE is <package>_<version>_<arch>.deb.
        wanted = {
            m["file"].split("_", 1)[0]: (dest / m["file"], int(m["size"]))
            for m in re.finditer(r"^'[^']+'\s+(?P<file>\S+)\s+(?P<size>\d+)", out, re.M)
        }
        names = [p.split("=", 1)[0] for p in packages]
        if unresolved := [n for n in names if n not in wanted]:
            raise ObserverError(
                f"apt-get download for suite {self.suite}: cannot resolve {' '.join(unresolved)}"
            )
        missing = [
            pkg
            for pkg, name in zip(packages, names, strict=True)
            if not (wanted[name][0].is_file() and wanted[name][0].stat().st_size == wanted[name][1])
        ]
        if missing:
            # Download into a scratch directory, then rename: an interrupted run leaves no partial .deb.
            with self._locked(), tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
                self._run("apt-get", "-q", "download", *missing, cwd=Path(tmp))
                for f in Path(tmp).glob("*.deb"):
                    f.replace(dest / f.name)
        return [wanted[n][0] for n in names]

    @staticmethod
    def extract(deb: Path, dest: Path) -> None:
        """Unpack ``deb``'s files into ``dest`` (``dpkg-deb -x``: no maintainer scripts run)."""
        dest.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ObserverError(f"cannot unpack {deb}: {proc.stderr.strip() or proc.returncode}")


# --- kernels and their headers --------------------------------------------------------------------

# bookworm..trixie: linux-image-6.1.0-56-amd64(-unsigned); sid 7.x: linux-image-7.2.1+deb14-amd64.
# Flavours other than the generic one (-rt-, -cloud-) do not match: their ABI would end in a letter.
_IMAGE = re.compile(r"^linux-image-(?P<abi>\d+\.\d+\.\d+(?:-\d[\w.]*|\+[a-z]+\d+))-amd64(?:-unsigned)?$")


def _version_key(abi: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", abi))


def newest_abi(package_names: Iterable[str]) -> str | None:
    """The newest kernel ABI among ``linux-image-<abi>-amd64(-unsigned)`` names, None if none."""
    abis = {m["abi"] for n in package_names if (m := _IMAGE.match(n))}
    return max(abis, key=_version_key) if abis else None


def newest_kernel_abi(suite: str) -> str:
    """The newest kernel ABI of ``suite`` with an amd64 image, e.g. ``"6.1.0-56"``."""
    abi = newest_abi(AptSuite(suite).search(r"^linux-image-.*-amd64(-unsigned)?$"))
    if abi is None:
        raise ObserverError(f"no linux-image-*-amd64 package found in Debian suite {suite}")
    return abi


def headers_dir(abi: str) -> Path:
    return cache_dir() / "kernel-headers" / f"{abi}-amd64"


def prepare_headers(suite: str, abi: str) -> Path:
    """A merged header tree of Debian kernel ``abi``, usable as ``BCC_KERNEL_SOURCE``.

    Debian splits headers into ``linux-headers-<abi>-common`` (the source headers) and
    ``linux-headers-<abi>-amd64`` (.config and generated headers), tied together by
    ``/lib/modules/<abi>/{build,source}``; bcc given ``BCC_KERNEL_SOURCE`` looks in that one
    directory only, so the two are merged into one tree.
    Built in a scratch directory and renamed into place: it either exists complete or not at all.
    """
    final = headers_dir(abi)
    if (final / "include/generated/autoconf.h").is_file():
        return final
    apt = AptSuite(suite)
    flavour, common = f"linux-headers-{abi}-amd64", f"linux-headers-{abi}-common"
    debs = apt.download([common, flavour], cache_dir() / "debs" / suite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(final.parent)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}-") as tmp:
        unpacked = Path(tmp) / "unpacked"
        for deb in debs:
            apt.extract(deb, unpacked)
        tree = _src_dir(unpacked, common)
        _merge(_src_dir(unpacked, flavour), tree)
        if not (tree / "include/generated/autoconf.h").is_file():
            raise ObserverError(f"{flavour} from {suite} has no include/generated/autoconf.h")
        if final.exists():  # an incomplete tree left by an older version of this code
            shutil.rmtree(final)
        try:
            tree.rename(final)
        except OSError:
            if not (final / "include/generated/autoconf.h").is_file():
                raise
            # another process finished first: its tree is as good as ours
    return final


def _remove_stale_scratch(parent: Path, max_age_s: float = 3600) -> None:
    """Scratch trees of runs killed mid-way (a live run's is younger than an hour)."""
    for scratch in parent.glob(".*-amd64-*"):
        if scratch.is_dir() and time.time() - scratch.stat().st_mtime > max_age_s:
            shutil.rmtree(scratch, ignore_errors=True)


def _src_dir(unpacked: Path, package: str) -> Path:
    # Packages put the tree at usr/src/<package> in every suite so far.
    path = unpacked / "usr/src" / package
    if not path.is_dir():
        raise ObserverError(f"package {package} has no usr/src/{package} directory")
    return path


def _merge(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest``. In every suite so far both packages hold real directories (the
    -amd64 one adds config and generated headers); the only symlinks are relative ones inside
    -common and ``scripts``/``tools`` into linux-kbuild, which bcc does not need: those are dropped."""
    for tree in (src, dest):
        for name in ("scripts", "tools"):
            link = tree / name
            if link.is_symlink() and not link.exists():
                link.unlink()
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
