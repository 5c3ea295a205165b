"""The Debian package, end to end: built from a clean clone of HEAD, lintian-clean, installed with apt into
a pristine Debian 12 root, booted under QEMU with systemd, purged without a trace.

- ``scripts/build-deb`` on a fresh ``git clone`` of this repository's HEAD gives one ``.deb``;
  ``lintian`` reports no error (E:) on it.
- The root is ``debootstrap --variant=minbase`` bookworm plus systemd (cached under
  ``/var/cache/hvo-observer/debian-root``; each run works on a fresh copy), with apt sources copied from
  the host's own. ``apt-get install ./hvo-observer_*.deb`` (in a chroot with a private mount namespace)
  resolves the dependencies from Debian, plus the headers package of the guest's kernel, as an
  operator installs it (``linux-headers-$(uname -r)``).
- That root boots under QEMU TCG (tests/vm, systemd mode, the root shared over 9p with a tmpfs upper
  layer). Checked in the guest: the unit the package enabled is active (systemd says so only after
  READY=1) and /healthz answers ok at once; ``systemctl status`` shows the probe mode;
  ``hvo-observer status`` and ``doctor`` work; after a 2 MiB pool change /metrics shows the pool that
  /sys/kernel/mm/hugepages shows; ``systemd-analyze security`` rates the installed unit <= 2.5.
- ``apt-get purge`` stops the daemon: no process and no tracing BPF program is left (enumerated with the
  bpf(2) syscall), and no file of ours: every file present after the purge was in the pristine root,
  belongs to a package still installed, or is state systemd, apt and dpkg keep for themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from observer.kernel import debian_packages as deb
from tests.vm import Guest
from tests.vm.guest import DEFAULT_MASK
from tests.vm.kernels import prepare_kernel

pytestmark = [pytest.mark.vm, pytest.mark.package]

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
NEXT_VERSION = "0.1.0+test1"  # the upgrade target: HEAD with one more changelog entry
KERNEL = "6.1"
UNIT = "hvo-observer.service"
MAX_EXPOSURE = 2.5
WAIT_S = 900.0  # TCG: compiling the probes takes minutes on a loaded machine
InstalledRoot = tuple[Path, set[str], str]  # the root, its files before (and the dependencies'), the kernel
POOL_SERIES = r'^{}\{{[^}}]*hstate="2048kB"[^}}]*\}} (\S+)$'
ROOT_CACHE = deb.cache_dir() / "debian-root"
BASE = ROOT_CACHE / f"{SUITE}-minbase-systemd"
ARCHIVES = ROOT_CACHE / "archives"  # .debs apt downloaded before, handed to the next run's apt
# Not shared with the guest root (tmpfs or API file systems there), so not compared.
SKIP_TOP = ("proc", "sys", "dev", "run", "tmp", "var/tmp")
# State that systemd, apt, dpkg and the dynamic linker keep for themselves while the root lives.
VOLATILE = re.compile(
    r"^(var/lib/(dpkg|apt|systemd|dbus|ucf|python)/|var/cache/(apt|debconf|ldconfig)/|var/log/|"
    r"etc/ld\.so\.cache$|etc/machine-id$|var/lib/dbus/machine-id$|etc/\.pwd\.lock$|"
    r"etc/(passwd|group|shadow|gshadow)-$|etc/systemd/system/.*\.wants/(systemd-|getty|remote-fs|"
    r"e2scrub|fstrim|apt-|dpkg-)|usr/lib/python3[^/]*/.*__pycache__|etc/resolv\.conf$)"
)
HTTP_GET = ("python3 -c 'import sys, urllib.request as u; "
            "sys.stdout.write(u.urlopen(\"http://127.0.0.1:9817\" + sys.argv[1]).read().decode())'")
# Tracing programs (the kinds the probe modes load; systemd's own are cgroup programs), from bpf(2):
# BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD (bpftool is not in the root).
BPF_TRACING_PROGS = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
TRACING = {2: "kprobe", 5: "tracepoint", 7: "perf_event", 17: "raw_tracepoint", 26: "tracing"}
def bpf(cmd, attr):
    return libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
found, start = [], 0
while True:
    a = (ctypes.c_uint32 * 4)(start, 0, 0, 0)
    if bpf(11, a) != 0:
        break
    start = a[1]
    g = (ctypes.c_uint32 * 4)(start, 0, 0, 0)
    fd = bpf(13, g)
    if fd < 0:
        continue
    info = (ctypes.c_uint8 * 256)()
    q = (ctypes.c_uint64 * 2)(fd | (256 << 32), ctypes.addressof(info))
    if bpf(15, q) == 0:
        kind = int.from_bytes(bytes(info[0:4]), "little")
        name = bytes(info[64:80]).split(b"\0")[0].decode()
        if kind in TRACING:
            found.append(f"{start} {TRACING[kind]} {name}")
    os.close(fd)
print("\n".join(found))
"""


def run(*argv: str | Path, timeout: float = 1800, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       check=False, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-3000:]}"
    return r


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian packages build-essential debhelper dh-python "
                        "pybuild-plugin-pyproject python3-all python3-setuptools lintian debootstrap")


@pytest.fixture(scope="module")
def deb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("git", "dpkg-buildpackage", "dh", "pybuild")
    work = tmp_path_factory.mktemp("build")
    t0 = time.monotonic()
    run("git", "clone", "--quiet", REPO, work / "src")
    run(work / "src" / "scripts" / "build-deb", work / "dist")  # runs: dpkg-buildpackage
    debs = sorted((work / "dist").glob("hvo-observer_*_all.deb"))
    assert len(debs) == 1, debs
    print(f"\nbuilt {debs[0].name} from a clean clone in {time.monotonic() - t0:.1f} s")
    return debs[0]


@pytest.fixture(scope="module")
def next_deb(deb_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree as the next release: a changelog entry on top, version NEXT_VERSION."""
    work = tmp_path_factory.mktemp("build-next")
    run("git", "clone", "--quiet", REPO, work / "src")
    changelog = work / "src" / "debian" / "changelog"
    text = changelog.read_text()
    stamp = text.split("\n -- ", 1)[1].split("\n", 1)[0]  # maintainer and date of the top entry
    changelog.write_text(f"hvo-observer ({NEXT_VERSION}) unstable; urgency=medium\n\n"
                         f"  * Test upgrade.\n\n -- {stamp}\n\n{text}")
    run("git", "-C", work / "src", "-c", "user.name=test", "-c", "user.email=test@localhost",
        "commit", "--quiet", "-m", "next version", "debian/changelog")
    run(work / "src" / "scripts" / "build-deb", work / "dist")  # runs: dpkg-buildpackage
    return next(iter((work / "dist").glob(f"hvo-observer_{NEXT_VERSION}_all.deb")))


def test_lintian_reports_no_error(deb_file: Path) -> None:
    need("lintian")
    r = subprocess.run(["lintian", "--pedantic", str(deb_file)], capture_output=True, text=True, timeout=600,
                       check=False)
    tags = [ln for ln in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", ln)]
    print("\n".join(tags))
    assert not [t for t in tags if t.startswith("E: ")], r.stdout


def test_the_package_has_no_generic_top_level_module_and_ships_its_bpf_sources(deb_file: Path) -> None:
    listing = run("dpkg-deb", "--contents", deb_file).stdout
    paths = {ln.split()[-1].lstrip(".") for ln in listing.splitlines()}
    assert not [p for p in paths if "/dist-packages/" in p or "/site-packages/" in p]
    app = "/usr/share/hvo-observer"
    for p in ("/usr/bin/hvo-observer", f"{app}/observer/cli.py", f"{app}/bpf/hvo_common.h",
              f"{app}/bpf/functions.bpf.c", f"{app}/bpf/pool_tracepoints.bpf.c",
              "/lib/systemd/system/hvo-observer.service", "/etc/hvo-observer/hvo-observer.toml",
              f"{app}/prometheus/rules/hvo-observer.rules.yml", f"{app}/grafana/hvo-observer.json",
              "/usr/share/man/man1/hvo-observer.1.gz"):
        assert p in paths, p
    assert not [p for p in paths if p.startswith("/usr/share/hvo-observer/tests")]
    conffiles = run("dpkg-deb", "--info", deb_file, "conffiles").stdout.split()
    assert conffiles == ["/etc/hvo-observer/hvo-observer.toml"]


def pristine_base() -> Path:
    """debootstrap minbase + systemd, built once and kept (a stamp marks a complete one)."""
    stamp = BASE / ".hvo-complete"
    if stamp.is_file():
        return BASE
    need("debootstrap")
    ROOT_CACHE.mkdir(parents=True, exist_ok=True)
    partial = ROOT_CACHE / f"{BASE.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run("debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv",
        f"--keyring={deb.host_keyring()}", SUITE, partial, deb.host_apt_uris()[0], timeout=3600)
    shutil.rmtree(BASE, ignore_errors=True)
    partial.rename(BASE)
    stamp.write_text(f"{SUITE}\n")
    return BASE


def file_list(root: Path) -> set[str]:
    """Every path under ``root`` (relative, symlinks not followed), without SKIP_TOP."""
    out: set[str] = set()
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        prefix = "" if rel == "." else f"{rel}/"
        dirs[:] = [d for d in dirs if prefix + d not in SKIP_TOP]
        out.update(prefix + n for n in dirs + files)
    return out


def chroot(root: Path, script: str, timeout: float = 1800) -> str:
    """``script`` in ``root`` with /proc mounted in a private mount namespace (gone when it ends)."""
    wrapper = f"mount -t proc proc {root}/proc && exec chroot {root} /bin/sh -ec \"$0\""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    return run("unshare", "--mount", "--propagation", "private", "sh", "-ec", wrapper, script,
               timeout=timeout, env=env).stdout


def fresh_root(name: str) -> Path:
    """A copy of the pristine root whose apt uses the host's own Debian sources (URIs, suites, keyring)."""
    root = ROOT_CACHE / f"{name}-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    run("cp", "-a", "--reflink=auto", pristine_base(), root)
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for f in Path("/etc/apt/sources.list.d").glob("*.sources"):
        shutil.copy(f, root / "etc/apt/sources.list.d" / f.name)
    if Path("/etc/apt/sources.list").is_file():
        shutil.copy("/etc/apt/sources.list", root / "etc/apt/sources.list")
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    return root


def apt(root: Path, command: str) -> None:
    """``apt-get update`` and ``apt-get COMMAND`` in ``root``, reusing the .debs earlier runs downloaded."""
    archives = root / "var/cache/apt/archives"
    for d in ARCHIVES.glob("*.deb"):
        shutil.copy(d, archives / d.name)
    chroot(root, f"apt-get update -q >/dev/null\napt-get {command} >/dev/null\n")
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    for d in archives.glob("*.deb"):
        if not (ARCHIVES / d.name).exists():
            shutil.copy(d, ARCHIVES / d.name)
    chroot(root, "apt-get clean")


@pytest.fixture(scope="module")
def installed_root(deb_file: Path) -> Iterator[InstalledRoot]:
    """hvo-observer installed by apt into a fresh copy of the pristine root, that root's file list
    before, plus what its dependencies alone add (their maintainer scripts make files no package
    owns, /etc/inputrc say: not ours), and the guest kernel's release."""
    if os.geteuid() != 0:
        pytest.fail("building and booting a Debian root needs root")
    need("unshare", "chroot")
    kernel = prepare_kernel(KERNEL)
    headers = f"linux-headers-{kernel.release}"  # as an operator installs it: the running kernel's
    roots: list[Path] = []
    t0 = time.monotonic()
    try:
        roots.append(root := fresh_root("work"))
        before = file_list(root)
        shutil.copy(deb_file, root / "tmp" / deb_file.name)
        apt(root, f"install -y -q --no-install-recommends /tmp/{deb_file.name} {headers}")
        (root / "tmp" / deb_file.name).unlink()
        print(f"\ninstalled into a pristine {SUITE} root in {time.monotonic() - t0:.1f} s")
        roots.append(deps := fresh_root("deps"))
        depends = run("dpkg-deb", "--field", deb_file, "Depends").stdout.strip()
        apt(deps, f"satisfy -y -q --no-install-recommends '{depends}, {headers}'")
        before |= file_list(deps)
        shutil.rmtree(deps)
        yield root, before, kernel.release
    finally:
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(installed_root: InstalledRoot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    root, _, _ = installed_root
    need("qemu-system-x86_64")
    files = {
        # TimeoutStartSec: the unit's 180 s is for real hosts; under TCG compiling takes minutes.
        f"/etc/systemd/system/{UNIT}.d/tcg.conf": "[Service]\nTimeoutStartSec=900s\n",
    }
    mask = (*DEFAULT_MASK, "serial-getty@ttyS0.service")
    with Guest(KERNEL, systemd=True, files=files, mask=mask, root=root,
               workdir=tmp_path_factory.mktemp("package-guest")) as g:
        print(f"\n{g.kernel.release}: pristine root booted with systemd in {g.boot_s:.1f} s")
        yield g


def sh(g: Guest, script: str, timeout: float = 600) -> str:
    # The harness points bcc at the host's header cache; the root has the kernel's headers package.
    r = g.run("unset BCC_KERNEL_SOURCE\n" + script, timeout=timeout)
    assert r.exit_code == 0, r.describe()
    return r.stdout


def journal(g: Guest) -> str:
    return g.run(f"journalctl -u {UNIT} --no-pager -o cat").stdout[-4000:]


def test_the_installed_unit_becomes_active_after_ready(guest: Guest) -> None:
    script = (f"end=$(( $(date +%s) + {int(WAIT_S)} ))\n"
              f"until [ \"$(systemctl show -P ActiveState {UNIT})\" = active ]; do\n"
              f"  [ \"$(systemctl show -P ActiveState {UNIT})\" = failed ] && exit 1\n"
              f"  [ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done\n"
              f"{HTTP_GET} /healthz\n")
    r = guest.run(script, timeout=WAIT_S + 120)
    assert r.exit_code == 0, f"{journal(guest)}\n{r.describe()}"
    assert r.stdout.strip() == "ok"
    assert sh(guest, f"systemctl is-enabled {UNIT}").strip() == "enabled"


def test_systemctl_status_shows_the_mode(guest: Guest) -> None:
    out = sh(guest, f"systemctl status --no-pager {UNIT} || true")
    assert re.search(r'Status: "mode (fentry|kprobe|tracepoint)\b', out), out
    assert "/usr/bin/hvo-observer run --config /etc/hvo-observer/hvo-observer.toml" in out, out


def test_status_and_doctor_work(guest: Guest) -> None:
    status = sh(guest, "hvo-observer status")
    assert "2048kB" in status, status
    doctor = sh(guest, "hvo-observer doctor", timeout=900)
    assert "modes" in doctor and "fentry" in doctor, doctor


def test_metrics_follow_a_pool_change(guest: Guest) -> None:
    h = "/sys/kernel/mm/hugepages/hugepages-2048kB"
    try:
        sh(guest, "echo 1 > /proc/sys/vm/hugetlb_optimize_vmemmap; echo 12 > /proc/sys/vm/nr_hugepages")
        truth = int(sh(guest, f"cat {h}/nr_hugepages"))
        assert truth > 0
        deadline, seen = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            text = sh(guest, f"{HTTP_GET} /metrics")
            pool = [float(v) for v in re.findall(POOL_SERIES.format("hvo_hugepages"), text, re.M)]
            opt = [float(v) for v in re.findall(POOL_SERIES.format("hvo_optimized_hugepages"), text, re.M)]
            seen = (sum(pool), sum(opt))
            if seen == (truth, truth):
                break
            time.sleep(2)
        assert seen == (truth, truth), f"/metrics shows pool, optimized {seen}; the kernel has {truth}"
    finally:
        sh(guest, "echo 0 > /proc/sys/vm/nr_hugepages")


def test_systemd_analyze_security_of_the_installed_unit(guest: Guest) -> None:
    out = sh(guest, f"systemd-analyze security --no-pager {UNIT}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    assert float(m.group(1)) <= MAX_EXPOSURE, out[-3000:]


def test_piuparts_install_purge_and_upgrade_from_the_previous_build(deb_file: Path, next_deb: Path,
                                                                    tmp_path: Path) -> None:
    """piuparts (systemd treated as essential, as on real hosts): install -> purge of the next build,
    and the upgrade to it from this build, served by a local file repository."""
    need("piuparts", "dpkg-scanpackages")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(deb_file, repo / deb_file.name)
    (repo / "Packages").write_text(run("dpkg-scanpackages", ".", cwd=repo).stdout)
    log = tmp_path / "piuparts.log"
    t0 = time.monotonic()
    r = subprocess.run(
        ["piuparts", "--fake-essential-packages=systemd,systemd-sysv", "-d", SUITE,
         "-m", deb.host_apt_uris()[0], f"--existing-chroot={pristine_base()}", "--hard-link",
         "--bindmount", str(repo), "--extra-repo", f"deb [trusted=yes] file://{repo} ./",
         "-l", str(log), str(next_deb)],
        capture_output=True, text=True, timeout=1800, check=False)
    text = log.read_text() if log.is_file() else r.stdout + r.stderr
    print(f"\npiuparts: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0 and "PASS: All tests." in text, text[-5000:]
    assert "Can't test upgrade" not in text, text[-3000:]
    assert re.search(rf"hvo-observer.*{re.escape(NEXT_VERSION)}", text), text[-3000:]


def test_an_upgrade_keeps_the_edited_conffile_and_restarts_the_daemon(guest: Guest, next_deb: Path) -> None:
    conf = "/etc/hvo-observer/hvo-observer.toml"
    shutil.copy(next_deb, guest.share / next_deb.name)
    sh(guest, f"sed -i 's/^settle_seconds = .*/settle_seconds = 2.5  # local edit/' {conf}")
    pid = sh(guest, f"systemctl show -P MainPID {UNIT}").strip()
    assert pid != "0"
    sh(guest, f"apt-get install -y -q /run/hvo/{next_deb.name} >/dev/null", timeout=900)
    assert sh(guest, "dpkg-query -W -f '${Version}' hvo-observer").strip() == NEXT_VERSION
    assert "settle_seconds = 2.5  # local edit" in sh(guest, f"cat {conf}")
    script = (f"end=$(( $(date +%s) + {int(WAIT_S)} ))\n"
              f"until [ \"$(systemctl show -P ActiveState {UNIT})\" = active ]; do\n"
              f"  [ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done\n"
              f"systemctl show -P MainPID {UNIT}\n")
    r = guest.run(script, timeout=WAIT_S + 120)
    assert r.exit_code == 0, f"{journal(guest)}\n{r.describe()}"
    assert r.stdout.strip() not in (pid, "0"), "the upgrade did not restart the daemon"
    (guest.share / next_deb.name).unlink()


def test_purge_leaves_no_process_bpf_program_or_file(guest: Guest, installed_root: InstalledRoot) -> None:
    _, before, _ = installed_root
    guest.share.joinpath("bpf_progs.py").write_text(BPF_TRACING_PROGS)
    running = sh(guest, "python3 /run/hvo/bpf_progs.py")
    assert running.strip(), "the daemon's tracing programs should be loaded before the purge"
    sh(guest, "apt-get purge -y -q hvo-observer >/dev/null", timeout=600)
    assert sh(guest, f"systemctl show -P ActiveState {UNIT}").strip() in ("inactive", "")
    procs = sh(guest, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done")
    assert not [ln for ln in procs.splitlines() if "hvo-observer" in ln or "-m observer" in ln], procs
    left = sh(guest, "python3 /run/hvo/bpf_progs.py")
    assert not left.strip(), f"tracing BPF programs left after purge:\n{left}"
    after = set(sh(guest, "cd / && find . -xdev -mindepth 1 | sed 's|^\\./||'").splitlines())
    owned = set(sh(guest, "dpkg-query -L $(dpkg-query -W -f '${binary:Package}\\n') 2>/dev/null | "
                          "sed 's|^/||' | sort -u").splitlines())
    # /lib, /bin, /sbin are links to /usr (merged /usr): dpkg names files by either path
    owned |= {p.replace("usr/", "", 1) for p in owned if p.startswith("usr/")}
    owned |= {f"usr/{p}" for p in owned if not p.startswith("usr/")}
    harness = {f"etc/systemd/system/{p}" for p in (f"{UNIT}.d", f"{UNIT}.d/tcg.conf", "hvo-loop.service",
                                                   "multi-user.target.wants/hvo-loop.service")}
    harness |= {f"etc/systemd/system/{u}" for u in (*DEFAULT_MASK, "serial-getty@ttyS0.service")}
    new = sorted(p for p in after - before - owned - harness if not VOLATILE.search(p)
                 and p not in SKIP_TOP and not p.startswith(tuple(f"{s}/" for s in SKIP_TOP)))
    ours = [p for p in after if "hvo-observer" in p and p not in harness and p not in owned]
    assert not ours, f"files of ours after purge: {ours}"
    assert not new, f"files not in the pristine root, of no package, after purge: {json.dumps(new[:50])}"
