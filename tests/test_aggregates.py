"""The in-kernel aggregates: their kernel memory at a big host's CPU count, and counters that never go
down (tracepoint mode's gigantic candidates are counted once accepted, never retracted from a count).

The map sizes are read from the kernel (/proc/self/fdinfo of the loaded maps) and computed here, as
the kernel sizes per-CPU maps: once per possible CPU, round_up(value_size, 8) per entry.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from observer.probes.events import EventType, Result
from observer.probes.session import ProbeSession
from tests.test_probes_tracepoint import GIG, HOST, probe_set

BIG_HOST_CPUS = 384
TARGET_BYTES = 8 << 20
PERCPU_TYPES = {5, 6, 10, 21}  # percpu_hash, percpu_array, lru_percpu_hash, percpu_cgroup_storage

# struct hvo_event (bpf/hvo_event.h), packed here rather than with the product's encoder
RECORD = struct.Struct("<QQQQIIiIBBBB16s")
FLAG_UNCOUNTED = 2


def _own_maps() -> list[dict[str, int]]:
    maps = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-map":
                continue
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        info = {k: int(v) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
                if v.strip().lstrip("-").isdigit()}
        maps[info["map_id"]] = info
    return list(maps.values())


@pytest.mark.live
def test_bpf_maps_fit_8_mib_at_384_possible_cpus() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    pytest.importorskip("bcc", reason="bcc (Debian's python3-bpfcc) is not importable: run scripts/setup")
    session = ProbeSession("tracepoint")
    session.start()
    try:
        maps = _own_maps()
    finally:
        session.close()
    assert maps, "no BPF map fds found in this process"
    total = 0
    for m in maps:
        if m["map_type"] in PERCPU_TYPES:
            total += (m["value_size"] + 7) // 8 * 8 * m["max_entries"] * BIG_HOST_CPUS
        else:
            total += m["memlock"]
    print(f"BPF maps at {BIG_HOST_CPUS} possible CPUs: {total / 2**20:.2f} MiB ({len(maps)} maps)")
    assert total <= TARGET_BYTES, [(m["map_type"], m["value_size"], m["max_entries"]) for m in maps]


def _record(event: EventType, pfn: int, order: int, flags: int) -> ctypes.Array[ctypes.c_char]:
    data = RECORD.pack(1, pfn, 1, 0, 7, 7, 0, 0, int(event), int(Result.OK), order, flags, b"sh")
    return ctypes.create_string_buffer(data, len(data))


def _session_with(ps: object) -> ProbeSession:
    session = ProbeSession("tracepoint", on_event=lambda e: None)
    session.probe_sets = [ps]  # type: ignore[list-item]
    session._observers = [ps.observe]  # type: ignore[attr-defined]
    return session


def test_a_retracted_gigantic_candidate_never_lowers_a_count() -> None:
    ps = probe_set(HOST)  # the fixture has no /proc/kpageflags: the candidate is never confirmed
    ps._forget = lambda pfn, order: None  # type: ignore[method-assign]  # no BPF set here
    session = _session_with(ps)
    buf = _record(EventType.POOL_ALLOC, GIG, 18, FLAG_UNCOUNTED)  # as bpf/pool_tracepoints.bpf.c emits it
    assert session._on_ring(None, ctypes.addressof(buf), len(buf)) == 0
    ps._candidates[GIG] = (ps._candidates[GIG][0], 0.0)  # its deadline passed
    session._flush_pending()
    assert ps.retracted == 1
    assert all(n >= 0 for n in session._user_counts.values()), session._user_counts
    assert session._user_counts.get((EventType.POOL_ALLOC, 18, Result.OK), 0) == 0


def test_an_accepted_gigantic_candidate_counts_once() -> None:
    ps = probe_set(HOST)
    session = _session_with(ps)
    alloc = _record(EventType.POOL_ALLOC, GIG, 18, FLAG_UNCOUNTED)
    free = _record(EventType.POOL_FREE, GIG, 18, 0)  # counted by the BPF program
    for buf in (alloc, free):
        assert session._on_ring(None, ctypes.addressof(buf), len(buf)) == 0
    session._flush_pending()  # the free confirmed the candidate: both are dispatched now
    assert session._user_counts == {(EventType.POOL_ALLOC, 18, Result.OK): 1}


@pytest.mark.parametrize("accept", ["text/plain", "application/openmetrics-text; version=1.0.0"])
def test_a_body_from_cached_sections_equals_a_fresh_encoding(accept: str) -> None:
    """Exposition re-encodes only the sections whose inputs changed; the body must be what encoding
    the whole view gives (prometheus_client's own encoder over one registry)."""
    from prometheus_client.exposition import choose_encoder

    from exporters.prometheus.collector import Exposition, registry
    from observer.bench_workloads import simulated_model
    from observer.probes.aggregates import Aggregates

    model = simulated_model(hstates=2, nodes=4)
    exposition = Exposition(model.view, process=False)
    encoder, _ = choose_encoder(accept)
    for step in range(3):
        view = model.view()
        body, _ = exposition.render(accept)
        assert body == encoder(registry(lambda v=view: v, process=False)), step
        counts = {k: n + step + 1 for k, n in view.counts.items()}  # the kernel got busy: counters move
        model.observe(model.snapshot, Aggregates(counts, dict(view.hist), 0))
