"""The daemon as a subprocess, for live tests: run it as the systemd unit does, scrape it, compare it
with the kernel, and see what kernel objects it holds.

Shared by tests/test_daemon_live.py, tests/test_cli_live.py, tests/test_faults_*.py and
tests/test_http_abuse.py (moved here from test_daemon_live.py). Waiting loops have generous limits
that only turn a hang into a failure message; nothing asserts on time.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from observer.kernel import hugepages, memory_blocks, sysctl, tracefs, vmstat
from observer.kernel.kallsyms import ADDRESSES_FILE
from tests import kernel_state

REPO = Path(__file__).resolve().parents[1]
H2M, H1G = "2048kB", "1048576kB"
FREE = {H2M: 7, H1G: 4095}
PAGE = 4096
WAIT_S = 120.0
# The unit's privileges: root with only CAP_BPF and CAP_PERFMON (so no CAP_DAC_OVERRIDE either).
UNIT_PRIVILEGES = ("setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon", "--")
# The kernel-addresses record made by the harness: ADDRESSES_LOCK (held briefly, exclusive) guards
# making and removing it and lists what the harness created; every process whose daemons use the
# record holds ADDRESSES_USERS shared until it exits, and the last one removes what the list names.
ADDRESSES_LOCK = Path("/run/lock/hvo-observer-kernel-addresses.lock")
ADDRESSES_USERS = Path("/run/lock/hvo-observer-kernel-addresses.users")
_addresses_lock = threading.Lock()
_addresses_held: list[IO[str]] = []  # ADDRESSES_USERS, open while this process uses the record

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, pool sizes, sysctl)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("bcc (Debian's python3-bpfcc) is not importable: run scripts/setup")
    names = {h.name for h in hugepages.read_hstates()}
    if not {H2M, H1G} <= names:
        pytest.skip(f"this kernel lacks the 2 MiB or 1 GiB hstate (has {sorted(names)})")
    if sysctl.read_hvo_sysctl() is None:
        pytest.skip("this kernel has no vm.hugetlb_optimize_vmemmap")
    if vmstat.read_memmap_counters() is None:
        pytest.skip("this kernel has no nr_memmap counters (< 6.11): no byte truth to compare with")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot run the daemon with the unit's capabilities")


@contextmanager
def empty_pools() -> Iterator[None]:
    """Exclusive use of the pools, both emptied; pools and sysctl restored afterwards."""
    skip_unless_possible()
    tracefs.ensure_tracefs()  # what sys-kernel-tracing.mount does for the unit (the daemon may not mount)
    with kernel_state.restored_kernel_state():
        hugepages.set_nr_hugepages(H2M, 0)
        hugepages.set_nr_hugepages(H1G, 0)
        calibrate_full_vmemmap()
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record_kernel_addresses() -> None:
    """What the unit runs before the daemon (``ExecStartPre=-+hvo-observer kernel-addresses --write
    ADDRESSES_FILE``): the addresses /proc/kallsyms shows only to CAP_SYSLOG, which the daemon under
    UNIT_PRIVILEGES lacks, recorded by root for this boot. Without them a daemon on a kernel that may
    randomize its layout is rightly degraded (vmemmap_base unknown).

    Once per process, kept until it exits (a record is valid for the whole boot); a record or
    directory that existed before is left alone, what the harness made is removed by the last process
    using it (another pytest session may still run daemons)."""
    with _addresses_lock:
        if _addresses_held:
            return
        record = Path(ADDRESSES_FILE)
        ADDRESSES_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with ADDRESSES_LOCK.open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            users = ADDRESSES_USERS.open("a")
            fcntl.flock(users, fcntl.LOCK_SH)  # an exclusive holder also holds ADDRESSES_LOCK: no wait
            _addresses_held.append(users)
            atexit.register(_release_kernel_addresses)
            if record.exists():
                return
            lock.seek(0)
            created = [ln for ln in lock.read().splitlines() if ln]
            if not record.parent.exists():
                record.parent.mkdir(mode=0o755)  # the unit's RuntimeDirectoryMode
                created.append(str(record.parent))
            created.insert(0, str(record))  # removed before its directory
            _write_created(lock, created)
            r = subprocess.run(
                [sys.executable, "-m", "observer", "kernel-addresses", "--write", str(record)],
                cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.fail(f"hvo-observer kernel-addresses (the unit's ExecStartPre) failed: "
                            f"{(r.stderr or r.stdout).strip()}")


def _write_created(lock: IO[str], created: list[str]) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write("".join(f"{path}\n" for path in dict.fromkeys(created)))
    lock.flush()


def _release_kernel_addresses() -> None:
    """Stop using the record; the last user removes what the harness made."""
    with _addresses_lock:
        if not _addresses_held:
            return
        users = _addresses_held.pop()
        with ADDRESSES_LOCK.open("a+") as lock, users:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process still uses it
            lock.seek(0)
            for path in map(Path, lock.read().splitlines()):
                if path.is_dir():
                    with suppress(OSError):  # not empty: someone else's files inside
                        path.rmdir()
                else:
                    path.unlink(missing_ok=True)
            _write_created(lock, [])


class Daemon:
    """``python -m observer run`` with the unit's capabilities, on a free loopback port, its JSON API
    on a socket of its own (``api_socket``, in a short temporary directory: a socket path has at most
    107 bytes; the directory is 0755 so that the socket's own mode decides who may connect).

    ``launcher`` replaces ``-m observer`` (e.g. a test wrapper that extends the probe sets);
    ``wrapper`` goes before everything (e.g. ``unshare -m ...``).
    """

    def __init__(self, tmp: Path, *extra: str, env: dict[str, str] | None = None, mode: str = "tracepoint",
                 launcher: Sequence[str] = ("-m", "observer"), wrapper: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log_path = tmp / f"daemon-{self.port}.log"
        self.api_dir = Path(tempfile.mkdtemp(prefix="hvo-api-"))
        self.api_dir.chmod(0o755)
        # removed by stop()/kill(), else when this object goes (or pytest exits): never left in /tmp
        weakref.finalize(self, shutil.rmtree, self.api_dir, ignore_errors=True)
        self.api_socket = self.api_dir / "api.sock"
        record_kernel_addresses()
        cmd = [*wrapper, *UNIT_PRIVILEGES, sys.executable, *launcher, "run", "--mode", mode,
               "--listen", f"127.0.0.1:{self.port}", "--api-socket", str(self.api_socket), *extra]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(  # runs: setpriv unshare
            cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        """GET over TCP; the JSON API (``/api/...``) over the daemon's Unix socket."""
        if path.startswith("/api/"):
            return unix_get(self.api_socket, path, timeout)
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"daemon not healthy after {timeout:.0f} s:\n{self.output()}")

    def scrape(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body)

    def status(self) -> dict[str, object]:
        return json.loads(self.get("/api/v1/status")[1])

    def events_delivered(self) -> int:
        """Sequence number of the newest event in the daemon's log: every event it was handed."""
        return int(json.loads(self.get("/api/v1/events?since=1000000000000000000&limit=0")[1])["next"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()
            shutil.rmtree(self.api_dir, ignore_errors=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.api_dir, ignore_errors=True)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()[-4000:]

    def full_output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()


@contextmanager
def daemon(tmp: Path, *extra: str, env: dict[str, str] | None = None, ready_timeout: float = WAIT_S,
           **kw: object) -> Iterator[Daemon]:
    d = Daemon(tmp, *extra, env=env, **kw)  # type: ignore[arg-type]
    try:
        d.wait_ready(ready_timeout)
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
        shutil.rmtree(d.api_dir, ignore_errors=True)


def unix_get(path: Path, url: str, timeout: float = 10) -> tuple[int, str]:
    """GET ``url`` over the Unix socket ``path``: status and body."""
    import http.client

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))

    conn = Connection("localhost", timeout=timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def parse_metrics(body: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def one(m: Samples, name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


_full_vmemmap: list[int] = []  # the kernel's whole vmemmap, from the last calibration


def calibrate_full_vmemmap() -> int:
    """The kernel's whole vmemmap in pages, measured and not computed: with every pool empty the
    kernel holds no optimized page, so its counters (nr_memmap_pages + nr_memmap_boot_pages) are
    all of it, whatever the memory layout (holes, offline blocks, hot-added or device memory)."""
    pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
    assert not any(pools.values()), f"calibrating the vmemmap needs every pool empty: {pools}"
    counters = vmstat.read_memmap_counters()
    assert counters is not None, "this kernel has no nr_memmap counters (< 6.11)"
    _full_vmemmap[:] = [counters.total]
    return counters.total


def _plain_layout_vmemmap() -> int:
    """The whole vmemmap of a plain layout (every memory block online, RAM in each of its 128 MiB
    sections, no device memory): blocks x 4 KiB pages x 64 bytes of struct page. For guests booted
    with reserved pools, which never see empty pools; any other layout must be calibrated."""
    layout = memory_blocks.read_memory_layout()
    size, sec = layout.block_size_bytes, layout.section_size_bytes

    def has_ram(lo: int) -> bool:
        return any(start < lo + sec and end >= lo for start, end in layout.ram_ranges)

    partial = [b.index for b in layout.blocks
               if not b.online or not all(has_ram(b.index * size + i * sec) for i in range(size // sec))]
    assert layout.ram_ranges and not partial and not layout.device_ranges and not layout.devices, (
        f"no calibration, and the layout is not plain (blocks offline or with a section without RAM "
        f"{partial}, device memory {layout.device_ranges or layout.devices}): empty the pools first "
        f"(calibrate_full_vmemmap)")
    return layout.online_bytes // PAGE * 64 // PAGE


def kernel_saved_pages() -> int:
    """vmemmap pages the kernel saves now: the whole vmemmap minus its counters. The whole comes from
    the last calibration (made whenever the pools are empty, so a layout change between tests is
    followed), or from a plain layout's geometry before any."""
    if not any(h.nr_hugepages for h in hugepages.read_hstates()):
        calibrate_full_vmemmap()
    full = _full_vmemmap[0] if _full_vmemmap else _plain_layout_vmemmap()
    counters = vmstat.read_memmap_counters()
    assert counters is not None
    return full - counters.total


def settled(d: Daemon) -> Samples:
    """Metrics from a quiet moment after everything the test did: the daemon reports
    hvo_reconcile_settled 1 *and* its pool sizes and vmemmap counters equal the kernel's now."""
    deadline = time.monotonic() + WAIT_S
    m: Samples = {}
    while time.monotonic() < deadline:
        m = d.scrape()
        counters = vmstat.read_memmap_counters()
        assert counters is not None
        pools = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
        if (one(m, "hvo_reconcile_settled") == 1
                and one(m, "hvo_memmap_pages", counter="nr_memmap_pages") == counters.memmap_pages
                and one(m, "hvo_memmap_pages", counter="nr_memmap_boot_pages") == counters.memmap_boot_pages
                and all(one(m, "hvo_hugepages", hstate=h, node="0") == pools[h] for h in (H2M, H1G))):
            return m
        time.sleep(0.2)
    pytest.fail(f"the daemon never reported a quiet moment matching the kernel: {m}\n{d.output()}")


def check_exact(m: Samples, pages: dict[str, int], optimized: dict[str, int], step: str) -> None:
    saved = sum(optimized[h] * FREE[h] for h in (H2M, H1G))
    assert kernel_saved_pages() == saved, f"{step}: the kernel did not do what the test expects"
    for h in (H2M, H1G):
        assert one(m, "hvo_hugepages", hstate=h, node="0") == pages[h], step
        assert one(m, "hvo_optimized_hugepages", hstate=h, node="0") == optimized[h], f"{step}: {h}"
    assert one(m, "hvo_vmemmap_saved_bytes", source="kernel") == saved * PAGE, step
    assert one(m, "hvo_vmemmap_saved_bytes", source="expected") == saved * PAGE, step
    assert one(m, "hvo_reconcile_drift_bytes") == 0, step


def set_pool(name: str, count: int) -> None:
    got = hugepages.set_nr_hugepages(name, count)
    if got != count:
        pytest.skip(f"the kernel gave {got} of {count} {name} pages (memory fragmented): "
                    "cannot run the steps")


def total_events(m: Samples) -> int:
    return int(sum(m.get("hvo_events_total", {}).values()))


# --- storms: driving the 2 MiB pool and checking the daemon's books -----------------------------

def seeded_rng() -> random.Random:
    seed = int(os.environ.get("HVO_STORM_SEED") or time.time_ns() % 2**32)
    print(f"\nstorm seed {seed} (HVO_STORM_SEED={seed} replays it)")
    return random.Random(seed)


class Churn:
    """A thread that resizes the 2 MiB pool to size(n) for n = 0, 1, ... until stopped; its errors are
    re-raised by stop(), not lost in the thread."""

    def __init__(self, size: Callable[[int], int]) -> None:
        self._size = size
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            n = 0
            while not self._stop.is_set():
                hugepages.set_nr_hugepages(H2M, self._size(n))
                n += 1
        except BaseException as e:
            self._errors.append(e)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        assert not self._errors, self._errors


class Pool:
    """The 2 MiB pool as a test drove it: allocations and frees the kernel really made.

    Live tests that do not take the pool lock may run meanwhile (another pytest session on the same
    machine): a pool size or sysctl we did not set is noticed (``foreign``).
    """

    def __init__(self) -> None:
        self.pages = self._nr()
        self.hvo = sysctl.read_hvo_sysctl()
        self.allocs = self.frees = 0
        self.foreign: list[str] = []

    @staticmethod
    def _nr() -> int:
        return hugepages.by_name(hugepages.read_hstates(), H2M).nr_hugepages

    def resize(self, target: int) -> None:
        now, hvo = self._nr(), sysctl.read_hvo_sysctl()
        if (now, hvo) != (self.pages, self.hvo):
            self.foreign.append(f"pool {self.pages} -> {now}, sysctl {self.hvo} -> {hvo}")
            self.pages, self.hvo = now, hvo
        got = hugepages.set_nr_hugepages(H2M, target)
        self.allocs += max(0, got - self.pages)
        self.frees += max(0, self.pages - got)
        self.pages = got


def settled_books(d: Daemon) -> tuple[Samples, int]:
    """A quiet moment's metrics and the number of events delivered at that same moment (inferred
    events can still arrive after the model settled: read until nothing moved around the scrape)."""
    for _ in range(60):
        seq = d.events_delivered()
        m = settled(d)
        if d.events_delivered() == seq:
            return m, seq
    pytest.fail(f"events kept arriving at every quiet moment the daemon reported:\n{d.output()}")


def count(m: Samples, event: str, result: str = "ok", hstate: str = H2M) -> int:
    return int(one(m, "hvo_events_total", event=event, hstate=hstate, result=result))


def check_books(before: Samples, after: Samples, delivered: int, pool: Pool) -> int:
    """The pool counts are exact and every record was delivered or counted lost; returns the loss.

    Every record the BPF side counted was either handed to the daemon (its event log's sequence
    number) or counted as lost; events made in user space (tracepoint mode's inferred ones) are
    counted there and never lost: sum(hvo_events_total) == delivered + hvo_events_lost_total."""
    pool.resize(pool.pages)  # notices a change made by someone else since the last step
    if pool.foreign:
        pytest.skip(f"another process changed the pool or the sysctl during the test ({len(pool.foreign)} "
                    f"times, first: {pool.foreign[0]}): run live tests one at a time")
    lost = int(one(after, "hvo_events_lost_total") - one(before, "hvo_events_lost_total"))
    assert count(after, "pool_alloc") - count(before, "pool_alloc") == pool.allocs
    assert count(after, "pool_free") - count(before, "pool_free") == pool.frees
    counted = total_events(after) - total_events(before)
    assert counted == delivered + lost, f"{counted} counted, {delivered} delivered, {lost} lost"
    return lost


# --- kernel objects a process holds -------------------------------------------------------------

_FDINFO_ID = re.compile(r"^(prog_id|map_id|link_id):\s+(\d+)$", re.M)


def held_bpf_ids(pid: int) -> dict[str, set[int]]:
    """BPF programs, maps and links the process ``pid`` holds file descriptors of (/proc/PID/fdinfo)."""
    ids: dict[str, set[int]] = {"prog": set(), "map": set(), "link": set()}
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for kind, n in _FDINFO_ID.findall(text):
            ids[kind.removesuffix("_id")].add(int(n))
    return ids


def live_bpf_ids(kind: str) -> set[int]:
    """Ids of every BPF ``kind`` ("prog", "map", "link") the kernel has now (bpftool)."""
    out = subprocess.run(["bpftool", "-j", kind, "list"], capture_output=True, text=True, check=True).stdout
    return {o["id"] for o in json.loads(out or "[]")}


def leaked_bpf_ids(held: dict[str, set[int]]) -> dict[str, set[int]]:
    """Which of ``held`` still exist, after giving the kernel's deferred release (RCU) a moment."""
    left: dict[str, set[int]] = {}
    for _ in range(100):
        left = {k: ids & live_bpf_ids(k) for k, ids in held.items() if ids}
        if not any(left.values()):
            return {}
        time.sleep(0.05)
    return {k: v for k, v in left.items() if v}


def kill_holding(d: Daemon) -> dict[str, set[int]]:
    """SIGSTOP, note every BPF object the daemon holds, SIGKILL, reap."""
    os.kill(d.pid, signal.SIGSTOP)
    held = held_bpf_ids(d.pid)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(timeout=30)
    d.log.close()
    return held


def wait_for_programs(d: Daemon, at_least: int, timeout: float = WAIT_S) -> None:
    """Until the starting daemon holds ``at_least`` BPF programs (it is attaching them)."""
    deadline = time.monotonic() + timeout
    while len(held_bpf_ids(d.pid)["prog"]) < at_least:
        if d.proc.poll() is not None:
            pytest.fail(f"the daemon exited with {d.proc.returncode} while starting:\n{d.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the daemon held no {at_least} BPF programs after {timeout:.0f} s:\n{d.output()}")
        time.sleep(0.001)


def kprobe_events() -> list[str]:
    """Lines of tracefs kprobe_events (empty when the kernel has no kprobes)."""
    path = tracefs.ensure_tracefs() / "kprobe_events"
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def process_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of ``pid`` in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile|VmHWM):\s+(\d+) kB", text, re.M)}
