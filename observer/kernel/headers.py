"""Which kernel headers bcc compiles against, and whether struct layouts in them can be trusted.

Order of preference:
1. the running kernel's own headers, ``/lib/modules/<release>/build`` (Debian's split
   ``build`` + ``source`` included) or the kernel's ``/sys/kernel/kheaders.tar.xz``: exact, so struct
   layouts are right; bcc finds these by itself, ``BCC_KERNEL_SOURCE`` must stay unset;
2. a Debian header tree that ``scripts/setup`` unpacked into ``cache_dir()/kernel-headers``: enough
   to compile programs that read no kernel struct (tracepoints), but layouts may differ from the
   running kernel, so ``exact`` is False and offsets must come from BTF.

``python -m observer.kernel.headers [--prepare]`` prints the choice; ``--prepare`` first unpacks
bookworm's newest headers into the cache when nothing is found (used by ``scripts/setup``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from observer.errors import ObserverError
from observer.kernel import debian_packages
from observer.kernel.files import under

ENV = "BCC_KERNEL_SOURCE"
FALLBACK_SUITE = "bookworm"


@dataclass(frozen=True)
class HeaderChoice:
    path: Path
    exact: bool  # headers of the running kernel itself: struct layouts are trustworthy
    release: str  # the running kernel's release
    origin: str  # for messages: where the headers come from

    def describe(self) -> str:
        trust = (
            "exact" if self.exact else "not the running kernel's: struct layouts untrusted, offsets from BTF"
        )
        return f"{self.origin} at {self.path} ({trust})"


def _has_headers(tree: Path) -> bool:
    return (tree / "include/linux/kconfig.h").is_file()


def _own_headers(root: Path, release: str) -> HeaderChoice | None:
    kdir = under(root, f"/lib/modules/{release}")
    try:
        return _find_own_headers(root, kdir, release)
    except OSError as e:  # e.g. /lib/modules hidden by a sandbox (ProtectKernelModules=)
        raise ObserverError(f"cannot look for kernel headers in {kdir}: {e.strerror or e}") from None


def _find_own_headers(root: Path, kdir: Path, release: str) -> HeaderChoice | None:
    build, source = kdir / "build", kdir / "source"
    # bcc itself uses source/ when both exist (Debian puts generated headers in build/, the rest in source/).
    if build.is_dir() and source.is_dir():
        if _has_headers(source) and (build / "include/generated/autoconf.h").is_file():
            return HeaderChoice(build, True, release, f"headers of the running kernel {release}")
    elif _has_headers(build):
        return HeaderChoice(build, True, release, f"headers of the running kernel {release}")
    kheaders = under(root, "/sys/kernel/kheaders.tar.xz")
    if kheaders.is_file():
        return HeaderChoice(kheaders, True, release, f"in-kernel headers (CONFIG_IKHEADERS) of {release}")
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _cached_headers(cache: Path, release: str) -> HeaderChoice | None:
    trees = [t for t in (cache / "kernel-headers").glob("*-amd64") if _has_headers(t)]
    if not trees:
        return None
    # Closest first: the running kernel's series (major.minor), else the newest series not newer
    # than it, else the oldest newer one (newer headers may use what the older clang of bcc lacks).
    running = _version_key(release)[:2]

    def closeness(tree: Path) -> tuple[bool, bool, tuple[int, ...]]:
        version = _version_key(tree.name)
        not_newer = version[:2] <= running
        return version[:2] == running, not_newer, version if not_newer else tuple(-n for n in version)

    best = max(trees, key=closeness)
    return HeaderChoice(best, False, release, f"Debian {best.name} headers (kernel is {release})")


def find_bcc_headers(
    release: str | None = None, *, root: Path = Path("/"), cache: Path | None = None
) -> HeaderChoice:
    """The headers bcc should use for kernel ``release`` (default: the running kernel)."""
    release = release or platform.release()
    cache = cache or debian_packages.cache_dir()
    choice = _own_headers(root, release) or _cached_headers(cache, release)
    if choice is None:
        searched = ", ".join(
            str(p)
            for p in (
                under(root, f"/lib/modules/{release}/build"),
                under(root, "/sys/kernel/kheaders.tar.xz"),
                cache / "kernel-headers/*-amd64",
            )
        )
        raise ObserverError(
            f"no kernel headers for bcc (searched {searched}): install linux-headers-{release}, or for a "
            "kernel Debian has no headers package for, unpack the newest with "
            "'python3 -m observer.kernel.headers --prepare' (in /usr/share/hvo-observer)"
        )
    return choice


def apply(choice: HeaderChoice) -> None:
    """Point bcc at ``choice`` (bcc reads the environment each time it compiles)."""
    if choice.exact:
        os.environ.pop(ENV, None)  # bcc finds the running kernel's own headers, split trees included
    else:
        os.environ[ENV] = str(choice.path)


def prepare_fallback(suite: str = FALLBACK_SUITE) -> Path:
    """Unpack the newest Debian headers of ``suite`` into the cache (network, once)."""
    return debian_packages.prepare_headers(suite, debian_packages.newest_kernel_abi(suite))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m observer.kernel.headers", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--prepare", action="store_true", help=f"unpack {FALLBACK_SUITE} headers when none are found"
    )
    args = parser.parse_args(argv)
    try:
        try:
            choice = find_bcc_headers()
        except ObserverError:
            if not args.prepare:
                raise
            print(
                f"preparing Debian {FALLBACK_SUITE} kernel headers for bcc in {debian_packages.cache_dir()}"
            )
            prepare_fallback()
            choice = find_bcc_headers()
    except ObserverError as e:
        print(f"hvo-observer: {e}", file=sys.stderr)
        return e.exit_code
    print(f"bcc headers: {choice.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
