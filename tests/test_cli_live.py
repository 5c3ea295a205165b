"""status, events, top and explain run as an on-call engineer runs them, against a real daemon
(``python -m observer run``, tracepoint mode, the unit's capabilities) on this host, while the test
grows and shrinks the 2 MiB pool. ``top`` runs in a real terminal (tmux) and its screen is read back.

Pools and the HVO sysctl are put back by tests/kernel_state.py; the pools lock is shared with the
other live tests. Waiting loops have generous limits that only turn a hang into a failure; nothing
asserts on time.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from observer.kernel import hugepages, sysctl, vmstat
from tests.daemon_proc import (
    H2M,
    PAGE,
    REPO,
    WAIT_S,
    Daemon,
    empty_pools,
    free_port,
    held_bpf_ids,
    kernel_saved_pages,
    leaked_bpf_ids,
    set_pool,
)
from tests.kernel_state import restored_kernel_state

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def pools() -> Iterator[None]:
    """Exclusive use of the pools for this module (shared lock); both empty at the start, put back after."""
    with empty_pools():
        yield


@pytest.fixture(scope="module")
def daemon(pools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The daemon's address: its API socket."""
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        d.wait_ready()
        yield str(d.api_socket)
        assert d.proc.poll() is None, f"the daemon died during the tests:\n{d.output()}"
    finally:
        d.stop()


# --- helpers ------------------------------------------------------------------------------------
def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    r = subprocess.run([sys.executable, "-m", "observer", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=WAIT_S, check=False, env=env)
    if check:
        assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stderr}"
        assert "Traceback" not in r.stderr
    return r


def wait_for(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"never saw {what}; last: {last!r}")


def settled_status(addr: str) -> dict[str, Any]:
    """``status --json`` from a quiet moment after everything the test did: the daemon says settled,
    and its pools and vmemmap counters are the ones the kernel shows now."""

    def probe() -> dict[str, Any] | None:
        doc = json.loads(cli("status", "--json", "--daemon", addr).stdout)
        counters = vmstat.read_memmap_counters()
        kernel = {h.name: h.nr_hugepages for h in hugepages.read_hstates()}
        ok = (doc["source"] == "daemon" and doc["reconcile"]["settled"] and counters is not None
              and (doc["memmap"]["nr_memmap_pages"], doc["memmap"]["nr_memmap_boot_pages"])
              == (counters.memmap_pages, counters.memmap_boot_pages)
              and all(h["pages"] == kernel[h["name"]] for h in doc["hstates"]))
        return doc if ok else None

    return wait_for("a settled status matching the kernel", probe)


def hstate(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(h for h in doc["hstates"] if h["name"] == name)


def events_json(addr: str, *flags: str, since: float) -> list[dict[str, Any]]:
    """``events --json`` lines of events that happened after ``since`` (unix time)."""
    out = cli("events", "--json", "--daemon", addr, *flags).stdout
    return [r for r in map(json.loads, out.splitlines()) if r["unix_time"] >= since]


def own_comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


class LineReader:
    """Lines of a child's pipe as they come, with a deadline (raw reads: select() cannot see data
    already sitting in a Python buffer)."""

    def __init__(self, pipe: Any) -> None:
        self.fd = pipe.fileno()
        self.buf = b""

    def until(self, what: str, done: Callable[[list[str]], bool]) -> list[str]:
        lines: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while not done(lines):
            if b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                lines.append(line.decode())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"never saw {what}; got {lines[-20:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    pytest.fail(f"the command ended before {what}; got {lines[-20:]}")
                self.buf += chunk
        return lines


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# --- status -------------------------------------------------------------------------------------
def test_status_follows_the_pool(daemon: str) -> None:
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        set_pool(H2M, 4)
        doc = settled_status(daemon)
        h = hstate(doc, H2M)
        assert (h["pages"], h["optimized"], h["freeable_vmemmap_pages"]) == (4, 4, 7)
        assert h["expected_saved_bytes"] == 4 * 7 * PAGE
        assert [(n["node"], n["pages"], n["optimized"]) for n in h["nodes"]] == [(0, 4, 4)]
        assert doc["saved_bytes"] == {"expected": 28 * PAGE, "kernel": kernel_saved_pages() * PAGE}
        assert doc["saved_bytes"]["kernel"] == 28 * PAGE  # the 1 GiB pool is empty
        assert doc["reconcile"]["drift_bytes"] == 0 and doc["reconcile"]["events_lost"] == 0
        assert doc["mode"] == "tracepoint" and doc["hvo_enabled"] is True
        assert doc["events_available"] and doc["recent_failures"] == []

        screen = cli("status", "--daemon", daemon).stdout
        rows = {line.split()[0]: line.split() for line in screen.splitlines() if line.strip()}
        assert rows[H2M] == [H2M, "0", "4", "4", "0", "4", "7", "0.11", "MiB", "(28", "pages)"]
        assert rows["mode"][:2] == ["mode", "tracepoint,"]
        assert "savings    expected 0.11 MiB (28 pages), kernel 0.11 MiB (28 pages)" in screen
        assert "drift      +0.00 MiB (+0 pages) at the last quiet moment (settled)" in screen
        assert "failures   none" in screen

        set_pool(H2M, 1)
        h = hstate(settled_status(daemon), H2M)
        assert (h["pages"], h["optimized"], h["expected_saved_bytes"]) == (1, 1, 7 * PAGE)


def test_status_without_daemon_uses_the_counters(pools: None) -> None:
    port = free_port()
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        set_pool(H2M, 2)
        doc = json.loads(cli("status", "--json", "--daemon", f"127.0.0.1:{port}").stdout)
        assert doc["source"] == "kernel" and doc["events_available"] is False
        assert doc["daemon_error"].startswith(f"no daemon at 127.0.0.1:{port} (connection refused)")
        h = hstate(doc, H2M)
        assert (h["pages"], h["optimized"]) == (2, 2)  # the only split of the counters
        assert doc["saved_bytes"] == {"expected": 14 * PAGE, "kernel": kernel_saved_pages() * PAGE}

        screen = cli("status", "--daemon", f"127.0.0.1:{port}").stdout
        assert f"daemon     none: no daemon at 127.0.0.1:{port} (connection refused)" in screen
        assert "events     unavailable (no daemon)" in screen
        assert "savings    expected 0.05 MiB (14 pages), kernel 0.05 MiB (14 pages)" in screen


# --- events -------------------------------------------------------------------------------------
def test_events_filters(daemon: str) -> None:
    pid, comm = os.getpid(), own_comm()
    settled_status(daemon)  # nothing left in flight from earlier tests
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        set_pool(H2M, 0)
        start = time.time()
        set_pool(H2M, 3)
        settled_status(daemon)  # the inferred optimize events are out

        allocs = events_json(daemon, "--pid", str(pid), "--event", "pool_alloc", "--hstate", "2M",
                             "--node", "0", "--result", "ok", since=start)
        assert len(allocs) == 3
        assert all((r["event"], r["hstate"], r["node"], r["tgid"], r["result"]) ==
                   ("pool_alloc", H2M, 0, pid, "ok") for r in allocs)
        optimized = events_json(daemon, "--comm", comm, "--event", "optimize", since=start)
        assert sorted(r["pfn"] for r in optimized) == sorted(r["pfn"] for r in allocs)
        assert all(r["result"] == "ok" and r["inferred"] and r["comm"] == comm for r in optimized)
        assert events_json(daemon, "--pid", str(pid), "--result", "error,skipped", since=start) == []
        assert events_json(daemon, "--pid", str(pid), "--hstate", "1G", since=start) == []

        lines = cli("events", "--daemon", daemon, "--pid", str(pid), "--event", "pool_alloc",
                    "-n", "3").stdout.splitlines()
        assert lines[0].split() == ["TIME", "EVENT", "HSTATE", "NODE", "PFN", "TASK", "DURATION", "RESULT"]
        assert [line.split()[1:] for line in lines[1:]] == [
            ["pool_alloc", H2M, "0", f"{r['pfn']:#x}", f"{comm}[{pid}]", "-", "ok"] for r in allocs]


def test_events_filters_checked_against_the_daemons_kernel(daemon: str) -> None:
    r = cli("events", "--daemon", daemon, "--hstate", "16M", check=False)
    assert r.returncode == 2 and r.stderr.strip() == (
        "hvo-observer: bad --hstate '16M': this kernel's hstates are 2048kB, 1048576kB")
    r = cli("events", "--daemon", daemon, "--node", "5", check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "hvo-observer: bad --node '5': this host's NUMA nodes are 0"


def test_events_follow_prints_live_lines(daemon: str) -> None:
    pid = os.getpid()
    env = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    proc = subprocess.Popen([sys.executable, "-m", "observer", "events", "--follow", "--json",
                             "--daemon", daemon, "--pid", str(pid), "--event", "pool_alloc,pool_free"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        LineReader(proc.stderr).until("the follow notice",
                                      lambda ls: any("following events" in x for x in ls))
        with restored_kernel_state():
            sysctl.write_hvo_sysctl(True)
            set_pool(H2M, 0)
            set_pool(H2M, 2)
            out = LineReader(proc.stdout)
            got = out.until("2 live pool_alloc lines", lambda ls: len(ls) >= 2)
            records = [json.loads(x) for x in got]
            assert [(r["event"], r["tgid"], r["hstate"]) for r in records] == [("pool_alloc", pid, H2M)] * 2
            set_pool(H2M, 0)
            got = out.until("2 live pool_free lines", lambda ls: len(ls) >= 2)
            assert sorted(json.loads(x)["pfn"] for x in got) == sorted(r["pfn"] for r in records)
    finally:
        rc = _stop(proc)
    assert rc == 0, proc.stderr.read()


def test_events_without_daemon_attach_own_probes(pools: None) -> None:
    pid = os.getpid()
    env = {k: v for k, v in os.environ.items() if k != "HVO_OBSERVER_ADDR"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "observer", "events", "--daemon", f"127.0.0.1:{port}",
                             "--pid", str(pid)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = LineReader(proc.stderr)
    try:
        notes = err.until("probes attached", lambda ls: any("probes attached" in x for x in ls))
        assert any(f"no daemon at 127.0.0.1:{port} (connection refused)" in x and "attaching own probes" in x
                   for x in notes)
        with restored_kernel_state():
            sysctl.write_hvo_sysctl(False)
            set_pool(H2M, 0)
            set_pool(H2M, 2)
            lines = LineReader(proc.stdout).until(
                "2 pool_alloc lines", lambda ls: sum(" pool_alloc " in x for x in ls) >= 2)
            assert lines[0].split()[:3] == ["TIME", "EVENT", "HSTATE"]
            allocs = [x.split() for x in lines if " pool_alloc " in x]
            assert all(a[2] == H2M and a[5] == f"{own_comm()}[{pid}]" for a in allocs)
        held = held_bpf_ids(proc.pid)
        assert held["prog"], "the session holds no BPF program?"
    finally:
        rc = _stop(proc)
    assert rc == 0
    assert "probes detached" in proc.stderr.read()
    assert leaked_bpf_ids(held) == {}


# --- explain ------------------------------------------------------------------------------------
def test_explain_finds_hvo_off_while_pages_were_allocated(daemon: str) -> None:
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(False)
        set_pool(H2M, 0)
        set_pool(H2M, 3)
        settled_status(daemon)
        r = json.loads(cli("explain", "--json", "--daemon", daemon).stdout)
        findings = {f["id"]: f for f in r["findings"]}
        f = findings["hvo-off-at-allocation"]
        assert "2048kB: 3 of 3 pages not optimized (3 x 7 = 21 pages, 0.08 MiB not freed)" in f["evidence"]
        assert "vm.hugetlb_optimize_vmemmap = 0 now" in f["evidence"] and "optimize skipped" in f["evidence"]
        assert "echo 1 > /proc/sys/vm/hugetlb_optimize_vmemmap" in f["action"]
        assert r["promised_saved_bytes"] - r["kernel_saved_bytes"] == r["difference_bytes"] == 21 * PAGE
        assert "ok" not in findings
        human = cli("explain", "--daemon", daemon).stdout
        assert "HVO was off while pages were allocated (21 vmemmap pages, 0.08 MiB not freed)" in human

        sysctl.write_hvo_sysctl(True)  # the pages already allocated stay as they are
        settled_status(daemon)
        r = json.loads(cli("explain", "--json", "--daemon", daemon).stdout)
        f = next(f for f in r["findings"] if f["id"] == "hvo-off-at-allocation")
        assert "2048kB: 3 of 3 pages not optimized" in f["evidence"]
        assert "vm.hugetlb_optimize_vmemmap = 1 now" in f["evidence"]
        assert f["action"].startswith("HVO is on now") and "re-allocate" in f["action"]

        set_pool(H2M, 0)
        set_pool(H2M, 2)
        settled_status(daemon)
        r = json.loads(cli("explain", "--json", "--daemon", daemon).stdout)
        assert [f["id"] for f in r["findings"]] == ["ok"], r["findings"]
        assert r["difference_bytes"] == 0 and r["kernel_saved_bytes"] == 14 * PAGE


# --- top ----------------------------------------------------------------------------------------
class Tmux:
    """A detached tmux session of a fixed size on a private server socket."""

    def __init__(self, command: str, width: int = 120, height: int = 40) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed")
        self.base = ["tmux", "-L", f"hvo-cli-test-{os.getpid()}"]
        self.name = "top"
        subprocess.run([*self.base, "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        "-c", str(REPO), command], check=True, timeout=30)
        self.socket = subprocess.run([*self.base, "display", "-p", "#{socket_path}"], capture_output=True,
                                     text=True, check=True, timeout=30).stdout.strip()

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", self.name, *keys], check=True, timeout=30)

    def wait(self, what: str, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        size = subprocess.run([*self.base, "display", "-p", "-t", self.name,
                               "#{window_width}x#{window_height}"],
                              capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        pytest.fail(f"never saw {what} in tmux ({size}); the screen:\n{screen}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30, check=False)
        Path(self.socket).unlink(missing_ok=True)  # tmux leaves its socket file behind


def _top_command(addr: str) -> str:
    env = "env -u HVO_OBSERVER_ADDR -u COLUMNS -u LINES TERM=xterm-256color"  # size from the pane
    return f"{env} {sys.executable} -m observer top --daemon {addr} --interval 0.5; echo EXIT=$?; sleep 600"


def _cells(screen: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first`` (panel borders removed)."""
    for line in screen.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} on the screen:\n{screen}")


def test_top_screen_and_q(daemon: str) -> None:
    with restored_kernel_state():
        sysctl.write_hvo_sysctl(True)
        set_pool(H2M, 0)
        set_pool(H2M, 2)
        settled_status(daemon)
        tmux = Tmux(_top_command(daemon))
        try:
            tmux.wait("top's pools table", "expected saved MiB")

            def two_pages() -> str | None:
                screen = tmux.screen()
                return screen if _cells(screen, H2M)[:7] == [H2M, "0", "2", "2", "0", "2", "7"] else None

            screen = wait_for("2 optimized pages on top's screen", two_pages)
            assert f"hvo-observer top - {daemon} - kernel " in screen and "mode tracepoint" in screen
            assert "HVO on" in screen and "q quits" in screen
            for col in ("rate/s", "p50", "p90", "p99"):
                assert col in screen
            assert _cells(screen, "pool_alloc")[0:2] == ["pool_alloc", H2M]
            assert _cells(screen, "savings") == ["savings", "expected", "0.05", "MiB", "(14", "pages)",
                                                 "kernel", "0.05", "MiB", "(14", "pages)"]
            assert _cells(screen, "drift")[1:4] == ["+0.00", "MiB", "(+0"]
            tmux.keys("q")
            screen = tmux.wait("top to quit on q", "EXIT=")
            assert "EXIT=0" in screen
            assert "rate/s" not in screen  # the alternate screen is gone: the terminal is back
        finally:
            tmux.close()


def test_top_without_daemon_in_a_terminal(pools: None) -> None:
    port = free_port()
    tmux = Tmux(_top_command(f"127.0.0.1:{port}"))
    try:
        screen = tmux.wait("top's error", "EXIT=")
        text = " ".join(screen.split())  # the pane wraps the long line
        assert f"hvo-observer: no daemon at 127.0.0.1:{port} (connection refused)" in text
        assert "EXIT=2" in text
    finally:
        tmux.close()
