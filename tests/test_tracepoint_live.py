"""Tracepoint mode against the real host kernel: pool events, inferred HVO, aggregates, loss, cleanup.

Every test restores nr_hugepages (2 MiB, 1 GiB), vm.hugetlb_optimize_vmemmap and the THP mode.
Pool changes are made by child processes (``sh``) so events can be matched to their writer; events of
other processes (anything else resizing pools on this machine meanwhile) are reported, not counted.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from observer.kernel import hugepages, sysctl
from observer.kernel.facts import gather
from observer.kernel.vmstat import read_vmstat
from observer.probes.events import Event, EventType, Result
from observer.probes.session import ProbeSession
from tests.daemon_proc import leaked_bpf_ids, live_bpf_ids
from tests.kernel_state import restored_kernel_state

pytestmark = pytest.mark.live

N = 32
NR_2M = "/proc/sys/vm/nr_hugepages"
NR_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
REPO = Path(__file__).resolve().parents[1]

THP_WORKLOAD = textwrap.dedent("""
    import mmap, sys
    size = 256 << 20
    print("ready", flush=True)
    while True:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        for off in range(0, size, 4096):
            m[off] = 1
        m.close()
""")


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, pool sizes)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("bcc (Debian's python3-bpfcc) is not importable: run scripts/setup")
    if not Path(NR_1G).exists():
        pytest.skip("this kernel has no 1 GiB hstate")


@pytest.fixture
def kernel_state() -> Iterator[None]:
    _skip_unless_possible()
    with restored_kernel_state():
        yield


@pytest.fixture
def thp_workload() -> Iterator[int]:
    """A process faulting in and freeing 256 MiB of madvise(MADV_HUGEPAGE) memory in a loop."""
    mode = THP_ENABLED.read_text().split("[")[1].split("]")[0]
    if mode == "never":
        THP_ENABLED.write_text("madvise")
    before = read_vmstat()["thp_fault_alloc"]
    proc = subprocess.Popen([sys.executable, "-c", THP_WORKLOAD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
        assert read_vmstat()["thp_fault_alloc"] > before, "the THP workload got no huge pages"
    finally:
        proc.kill()
        proc.wait()
        if mode == "never":
            THP_ENABLED.write_text("never")


def write_as_child(path: str, value: int) -> int:
    """Write ``value`` to ``path`` from a child ``sh``; returns its pid."""
    proc = subprocess.Popen(["sh", "-c", f"echo {value} > {path}"])
    assert proc.wait() == 0, f"writing {value} to {path} failed"
    return proc.pid


def poll_until(session: ProbeSession, done: Callable[[], bool], limit_s: float = 60.0,
               extra_s: float = 1.0) -> None:
    """Poll until ``done()`` (or ``limit_s`` passed), then ``extra_s`` more to catch surplus events."""
    deadline = time.monotonic() + limit_s
    while not done() and time.monotonic() < deadline:
        session.poll(50)
    end = time.monotonic() + extra_s
    while time.monotonic() < end:
        session.poll(50)


def of(events: list[Event], kind: EventType, pids: set[int], inferred: bool | None = None) -> list[Event]:
    return [e for e in events
            if e.event is kind and e.tgid in pids and (inferred is None or e.inferred is inferred)]


def nr(name: str) -> int:
    return hugepages.by_name(hugepages.read_hstates(), name).nr_hugepages


def grow_and_shrink(session: ProbeSession, events: list[Event]) -> dict[str, int]:
    """Grow the 2 MiB pool by N and the 1 GiB pool by 1, then shrink both back; pids of the writers."""
    base2, base1 = nr("2048kB"), nr("1048576kB")
    pids = {"grow2": write_as_child(NR_2M, base2 + N), "grow1": write_as_child(NR_1G, base1 + 1)}
    if nr("2048kB") != base2 + N or nr("1048576kB") != base1 + 1:
        pytest.skip(f"the kernel could not grow the pools (2 MiB: {nr('2048kB')}, 1 GiB: {nr('1048576kB')}): "
                    "memory too fragmented")
    grow = {pids["grow2"], pids["grow1"]}
    poll_until(session, lambda: len(of(events, EventType.OPTIMIZE, grow)) >= N + 1)
    pids["shrink2"] = write_as_child(NR_2M, base2)
    pids["shrink1"] = write_as_child(NR_1G, base1)
    shrink = {pids["shrink2"], pids["shrink1"]}
    poll_until(session, lambda: len(of(events, EventType.POOL_FREE, shrink)) >= N + 1
               and not session.probe_sets[0].infer.busy)
    return pids


def check_pool_events(events: list[Event], pids: dict[str, int], thp_pid: int) -> None:
    expected = (("grow2", EventType.POOL_ALLOC, 9, N), ("grow1", EventType.POOL_ALLOC, 18, 1),
                ("shrink2", EventType.POOL_FREE, 9, N), ("shrink1", EventType.POOL_FREE, 18, 1))
    for key, kind, order, count in expected:
        mine = of(events, kind, {pids[key]}, inferred=False)
        assert len(mine) == count, f"{key}: {len(mine)} {kind.label} events, expected {count}: {mine[:3]}"
        seen = {(e.order, e.node, e.comm, e.tid, e.result) for e in mine}
        assert seen == {(order, 0, "sh", pids[key], Result.OK)}
    allocs = {e.pfn for e in of(events, EventType.POOL_ALLOC, {pids["grow2"], pids["grow1"]})}
    frees = {e.pfn for e in of(events, EventType.POOL_FREE, {pids["shrink2"], pids["shrink1"]})}
    assert allocs == frees and len(allocs) == N + 1
    assert not [e for e in events if e.tgid == thp_pid], "THP allocations taken for hugetlb pool events"
    others = [e for e in events if e.tgid not in set(pids.values())]
    if others:
        print(f"{len(others)} pool events of other processes (ignored): {others[:3]}")


def check_aggregates(session: ProbeSession, events: list[Event]) -> None:
    agg = session.aggregates()
    assert agg.lost == 0
    seen = collections.Counter((e.event, e.order, e.result) for e in events)
    assert agg.counts == dict(seen)


def test_pool_events_and_inferred_hvo_with_the_sysctl_on(kernel_state: None, thp_workload: int) -> None:
    events: list[Event] = []
    sysctl.write_hvo_sysctl(True)
    with ProbeSession("tracepoint", gather(), events.append) as session:
        print(f"start-up {session.startup_s:.2f} s: {session.timings}")
        assert session.mode == "tracepoint" and all(a.ok for a in session.attachments)
        pids = grow_and_shrink(session, events)
        check_pool_events(events, pids, thp_workload)
        grow, shrink = {pids["grow2"], pids["grow1"]}, {pids["shrink2"], pids["shrink1"]}
        opt = of(events, EventType.OPTIMIZE, grow)
        res = of(events, EventType.RESTORE, shrink)
        print(collections.Counter((e.event.label, e.order, e.result.label, e.tgid) for e in events),
              "unexplained:", session.probe_sets[0].infer.unexplained_pages)
        assert len(opt) == N + 1 and all(e.inferred and e.result is Result.OK for e in opt)
        assert sorted(e.order for e in opt) == [9] * N + [18]
        assert len(res) == N + 1 and all(e.inferred and e.result is Result.OK for e in res)
        assert {e.pfn for e in opt} == {e.pfn for e in res}
        check_aggregates(session, events)


def test_with_the_sysctl_off_optimizations_are_skipped(kernel_state: None, thp_workload: int) -> None:
    events: list[Event] = []
    sysctl.write_hvo_sysctl(False)
    with ProbeSession("tracepoint", gather(), events.append) as session:
        pids = grow_and_shrink(session, events)
        check_pool_events(events, pids, thp_workload)
        opt = of(events, EventType.OPTIMIZE, {pids["grow2"], pids["grow1"]})
        assert len(opt) == N + 1 and {e.result for e in opt} == {Result.SKIPPED}
        assert not of(events, EventType.RESTORE, set(pids.values()))
        check_aggregates(session, events)


def test_pages_present_before_start_are_recognised_when_freed(kernel_state: None) -> None:
    base2, base1 = nr("2048kB"), nr("1048576kB")
    write_as_child(NR_2M, base2 + 4)
    write_as_child(NR_1G, base1 + 1)
    if nr("1048576kB") != base1 + 1:
        pytest.skip("the kernel could not allocate a 1 GiB page: memory too fragmented")
    events: list[Event] = []
    with ProbeSession("tracepoint", gather(), events.append) as session:
        ps = session.probe_sets[0]
        assert ps._known_heads() == ps._scan()  # the BPF set, seeded from /proc/kpageflags
        assert sorted(ps._known_heads().values()).count(18) == base1 + 1
        pid2 = write_as_child(NR_2M, base2)
        pid1 = write_as_child(NR_1G, base1)
        poll_until(session, lambda: len(of(events, EventType.POOL_FREE, {pid2, pid1})) >= 5)
        assert sorted(e.order for e in of(events, EventType.POOL_FREE, {pid2, pid1})) == [9] * 4 + [18]
        assert ps._known_heads() == ps._scan()  # the frees emptied their slots


def test_tiny_ring_buffer_loses_records_but_aggregates_stay_exact(kernel_state: None) -> None:
    events: list[Event] = []
    burst = 200
    with ProbeSession("tracepoint", gather(), events.append, ringbuf_bytes=4096) as session:
        base2 = nr("2048kB")
        pid = write_as_child(NR_2M, base2 + burst)  # no polling meanwhile: the buffer overflows
        if nr("2048kB") != base2 + burst:
            pytest.skip(f"the kernel could not grow the 2 MiB pool by {burst}")
        write_as_child(NR_2M, base2)
        poll_until(session, lambda: not session.probe_sets[0].infer.busy, extra_s=0.5)
        agg = session.aggregates()
        mine = of(events, EventType.POOL_ALLOC, {pid})
        print(f"{len(mine)} of {burst} allocation records received, {agg.lost} records lost")
        assert agg.lost > 0 and len(mine) < burst
        assert agg.counts[(EventType.POOL_ALLOC, 9, Result.OK)] >= burst
        # every record the kernel counted was either dispatched or counted as lost
        assert sum(agg.counts.values()) == len(events) + agg.lost


def _own_bpf_ids(kind: str) -> set[int]:
    """Ids of the BPF programs or maps this process holds (from /proc/self/fdinfo)."""
    key = "prog_id:" if kind == "prog" else "map_id:"
    ids = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith(key):
                    ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def test_close_detaches_everything(kernel_state: None) -> None:
    with ProbeSession("tracepoint", gather()) as session:
        ours = _own_bpf_ids("prog")
        assert len(ours) >= 3 and ours <= live_bpf_ids("prog")
        assert session.attachments
    # a raw tracepoint link, and so its program, is released after an RCU grace period
    assert not leaked_bpf_ids({"prog": ours}), "BPF programs left after close()"
    assert not _own_bpf_ids("prog") and not _own_bpf_ids("map")


HOLDER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from observer.kernel.facts import gather
    from observer.probes.session import ProbeSession
    from tests.test_tracepoint_live import _own_bpf_ids
    s = ProbeSession("tracepoint", gather())
    s.start()
    ids = {"progs": sorted(_own_bpf_ids("prog")), "maps": sorted(_own_bpf_ids("map"))}
    print(json.dumps(ids), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_nothing_is_left_after_the_process_is_killed(kernel_state: None, sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        held = json.loads(proc.stdout.readline())
        assert len(held["progs"]) >= 3 and set(held["progs"]) <= live_bpf_ids("prog")
    finally:
        proc.send_signal(sig)
        proc.wait()
    left = leaked_bpf_ids({"prog": set(held["progs"]), "map": set(held["maps"])})
    assert not left, f"BPF objects left after {sig.name}: {left}"


def test_perf_buffer_output_delivers_and_counts_loss(kernel_state: None) -> None:
    """The perf-buffer path (kernels without BPF ring buffers), forced on this kernel."""
    events: list[Event] = []
    with ProbeSession("tracepoint", gather(), events.append, ringbuf_bytes=4096, output="perfbuf") as session:
        assert session.perfbuf
        base2 = nr("2048kB")
        pid = write_as_child(NR_2M, base2 + 4)
        poll_until(session, lambda: len(of(events, EventType.POOL_ALLOC, {pid})) >= 4, extra_s=0.2)
        assert len(of(events, EventType.POOL_ALLOC, {pid})) == 4
        pid = write_as_child(NR_2M, base2 + 200)  # one page per CPU: overflows
        write_as_child(NR_2M, base2)
        poll_until(session, lambda: not session.probe_sets[0].infer.busy, extra_s=0.5)
        agg = session.aggregates()
        assert agg.lost > 0
        assert sum(agg.counts.values()) == len(events) + agg.lost


def test_a_demote_is_found_by_the_resync_and_its_pages_are_then_known(kernel_state: None) -> None:
    """No tracepoint shows a demote (1 GiB -> 512 x 2 MiB): the pool sizes disagree with the known
    pages, /proc/kpageflags is scanned again, and the 2 MiB pages' frees are then recognised."""
    demote = Path(NR_1G).with_name("demote")
    if not demote.exists():
        pytest.skip("this kernel cannot demote huge pages (before 5.16)")
    events: list[Event] = []
    with ProbeSession("tracepoint", gather(), events.append) as session:
        base2, base1 = nr("2048kB"), nr("1048576kB")
        grow = write_as_child(NR_1G, base1 + 1)
        if nr("1048576kB") != base1 + 1:
            pytest.skip("the kernel could not allocate a 1 GiB page: memory too fragmented")
        poll_until(session, lambda: bool(of(events, EventType.POOL_ALLOC, {grow})), extra_s=0)
        (gig,) = of(events, EventType.POOL_ALLOC, {grow})
        write_as_child(str(demote), 1)
        assert nr("2048kB") == base2 + 512 and nr("1048576kB") == base1
        poll_until(session, lambda: any(e.event is EventType.DEMOTE for e in events), extra_s=0.5)
        demotes = [e for e in events if e.event is EventType.DEMOTE]
        assert [(e.order, e.inferred, e.tgid) for e in demotes] == [(18, True, 0)]
        shrink = write_as_child(NR_2M, base2)
        poll_until(session, lambda: len(of(events, EventType.POOL_FREE, {shrink})) >= 512)
        frees = of(events, EventType.POOL_FREE, {shrink})
        assert len(frees) == 512 and {(e.order, e.inferred) for e in frees} == {(9, False)}
        if demotes[0].pfn == gig.pfn:  # else the kernel demoted another free 1 GiB page (not ours)
            assert {e.pfn for e in frees} == set(range(gig.pfn, gig.pfn + (1 << 18), 512))
