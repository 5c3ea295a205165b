"""The Prometheus collector and the HTTP API, scraped over real HTTP on 127.0.0.1 (ephemeral port).

The model is fed synthetic events and snapshots (no BPF here: tests/test_daemon_live.py does it for
real); the server, the exposition and the parsing are the production ones.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus.collector import METRICS, Exposition, histogram_buckets, registry
from observer import http_api
from observer.eventlog import EventLog
from observer.http_api import MAX_REQUEST_BYTES, ApiServer
from observer.model import HstateSpec, Model, ProbeState, Runtime
from observer.probes.events import Event, EventType, Result
from observer.probes.session import Aggregates
from observer.report import view_to_json
from observer.snapshot import KernelSnapshot, PoolPages

FULL = 98_304
SPECS = {"2048kB": HstateSpec("2048kB", 9, 7), "1048576kB": HstateSpec("1048576kB", 18, 4095)}


class Backend:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.exposition = Exposition(model.view)
        self.events = EventLog(64)

    def metrics(self, accept: str) -> tuple[bytes, str]:
        return self.exposition.render(accept)

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def status(self) -> dict[str, Any]:
        return view_to_json(self.model.view())


def snapshot(pages_2m: int, opt_2m: int, pages_1g: int, opt_1g: int) -> KernelSnapshot:
    return KernelSnapshot(
        taken_ns=time.monotonic_ns(),
        pools={("2048kB", 0): PoolPages(pages_2m, pages_2m), ("1048576kB", 0): PoolPages(pages_1g, pages_1g)},
        memmap_pages=FULL - opt_2m * 7 - opt_1g * 4095,
        memmap_counters=(0, FULL - opt_2m * 7 - opt_1g * 4095),
        full_memmap_pages=FULL,
        hvo_enabled=True,
    )


def event(kind: EventType, order: int, result: Result = Result.OK, seq: int = 0) -> Event:
    return Event(ts_ns=time.monotonic_ns(), pfn=0x40000 + seq * 512, cgroup_id=1, duration_ns=3000,
                 tgid=42, tid=42, err=12 if result == Result.ERROR else 0, node=0, event=kind, result=result,
                 order=order, inferred=True, comm="sysctl")


@pytest.fixture
def served() -> Iterator[tuple[ApiServer, Backend]]:
    model = Model(SPECS, 4096, settle_seconds=0.05)
    model.set_runtime(Runtime("0.1.0", "6.18.44-test", "tracepoint", "requested", False, (
        ProbeState("kmem:mm_page_alloc", "pool_alloc", "tracepoint", True),
        ProbeState("page_isolation:test_pages_isolated", "pool_alloc", "tracepoint", False, "no such event"),
    )))
    model.take_baseline(snapshot(16, 16, 1, 1))  # a full pool before the daemon started
    backend = Backend(model)
    # the JSON API on the TCP listener too (the config's tcp_api; by default it is on the Unix socket only)
    server = ApiServer(("127.0.0.1", 0), backend, max_clients=4, api=True)
    server.start()
    try:
        yield server, backend
    finally:
        server.stop()


def get(server: ApiServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def scrape(server: ApiServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, ctype, body = get(server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def one(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_scrape_reports_the_baseline_at_once(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    m = scrape(server)
    assert one(m, "hvo_build_info", version="0.1.0", kernel="6.18.44-test", mode="tracepoint") == 1
    assert one(m, "hvo_hugepages", hstate="2048kB", node="0") == 16
    assert one(m, "hvo_optimized_hugepages", hstate="2048kB", node="0") == 16
    assert one(m, "hvo_optimized_hugepages", hstate="1048576kB", node="0") == 1
    assert one(m, "hvo_vmemmap_freeable_pages", hstate="1048576kB") == 4095
    saved = (16 * 7 + 4095) * 4096
    assert one(m, "hvo_vmemmap_saved_bytes", source="expected") == saved
    assert one(m, "hvo_vmemmap_saved_bytes", source="kernel") == saved
    assert one(m, "hvo_vmemmap_saved_bytes", source="expected", hstate="2048kB", node="0") == 16 * 7 * 4096
    assert one(m, "hvo_reconcile_drift_bytes") == 0
    assert one(m, "hvo_baseline_exact") == 1
    assert one(m, "hvo_hvo_enabled") == 1
    assert one(m, "hvo_mode_degraded") == 0
    assert one(m, "hvo_probe_attached", probe="page_isolation:test_pages_isolated", event="pool_alloc",
               mode="tracepoint") == 0
    assert one(m, "hvo_events_total", event="restore", hstate="2048kB", result="error") == 0
    assert one(m, "hvo_events_lost_total") == 0 and one(m, "hvo_resyncs_total") == 0
    assert "process_resident_memory_bytes" in m


def test_every_family_has_the_documented_help(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    _, _, body = get(server, "/metrics")
    helps = {line.split(" ", 3)[2]: line.split(" ", 3)[3] for line in body.splitlines()
             if line.startswith("# HELP hvo_")}
    for name, text in helps.items():
        assert METRICS.get(name) == text.replace("\\\\", "\\"), name
    required = {"hvo_build_info", "hvo_hugepages", "hvo_optimized_hugepages", "hvo_vmemmap_freeable_pages",
                "hvo_vmemmap_saved_bytes", "hvo_reconcile_drift_bytes", "hvo_events_total",
                "hvo_events_lost_total", "hvo_resyncs_total", "hvo_operation_duration_seconds",
                "hvo_probe_attached", "hvo_hvo_enabled", "hvo_mode_degraded"}
    assert required <= set(METRICS)
    assert required - {"hvo_operation_duration_seconds"} <= set(helps)  # no histogram before any duration


def test_events_counts_and_histogram_follow_the_model(served: tuple[ApiServer, Backend]) -> None:
    server, backend = served
    model = backend.model
    for i in range(4):
        ev = event(EventType.RESTORE, 9, seq=i)
        model.on_event(ev)
        backend.events.append(ev, "2048kB")
    failed = event(EventType.RESTORE, 18, Result.ERROR)
    model.on_event(failed)  # the 1 GiB page stays optimized (and in the pool)
    hist = [0] * 64
    hist[11] = 4  # 2048..4095 ns
    agg = Aggregates(counts={(EventType.RESTORE, 9, Result.OK): 4, (EventType.RESTORE, 18, Result.ERROR): 1},
                     hist={(EventType.RESTORE, 9): hist}, lost=0)
    model.observe(snapshot(12, 12, 1, 1), agg)
    time.sleep(0.1)
    model.observe(snapshot(12, 12, 1, 1), agg)
    m = scrape(server)
    assert one(m, "hvo_optimized_hugepages", hstate="2048kB", node="0") == 12
    assert one(m, "hvo_optimized_hugepages", hstate="1048576kB", node="0") == 1
    assert one(m, "hvo_reconcile_settled") == 1 and one(m, "hvo_reconcile_drift_bytes") == 0
    assert one(m, "hvo_events_total", event="restore", hstate="2048kB", result="ok") == 4
    assert one(m, "hvo_events_total", event="restore", hstate="1048576kB", result="error") == 1
    assert one(m, "hvo_operation_duration_seconds_count", op="restore", hstate="2048kB") == 4
    assert one(m, "hvo_operation_duration_seconds_bucket", op="restore", hstate="2048kB", le="2.048e-06") == 0
    assert one(m, "hvo_operation_duration_seconds_bucket", op="restore", hstate="2048kB", le="4.096e-06") == 4
    duration_sum = one(m, "hvo_operation_duration_seconds_sum", op="restore", hstate="2048kB")
    assert duration_sum == pytest.approx(4 * 3072e-9)  # estimated from the bucket midpoint

    status, ctype, body = get(server, "/api/v1/events?since=1&limit=2")
    data = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert [e["seq"] for e in data["events"]] == [2, 3] and data["next"] == 3 and data["missed"] == 0
    assert data["events"][0]["event"] == "restore" and data["events"][0]["hstate"] == "2048kB"

    status, _, body = get(server, "/api/v1/status")
    st = json.loads(body)
    h2m = next(h for h in st["hstates"] if h["name"] == "2048kB")
    assert (h2m["pages"], h2m["optimized"], h2m["expected_saved_bytes"]) == (12, 12, 12 * 7 * 4096)
    assert st["reconcile"]["drift_bytes"] == 0 and st["reconcile"]["settled"] is True
    assert st["saved_bytes"]["expected"] == st["saved_bytes"]["kernel"]
    assert {"event": "restore", "hstate": "1048576kB", "result": "error", "count": 1} in st["events"]


def test_histogram_bucket_conversion() -> None:
    counts = [0] * 64
    counts[0] = 1  # 1 ns
    counts[20] = 2  # ~1 ms
    counts[63] = 1  # beyond the last bound: only +Inf
    buckets, total = histogram_buckets(counts)
    assert buckets[0] == (repr(1024 / 1e9), 1.0)
    assert dict(buckets)[repr((1 << 21) / 1e9)] == 3
    assert buckets[-2][1] == 3 and buckets[-1] == ("+Inf", 4.0)
    assert total == pytest.approx((1 + 2 * 1.5 * (1 << 20) + 1.5 * (1 << 63)) / 1e9)


def test_health_index_and_unknown_paths(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    assert get(server, "/nope")[0] == 404
    assert get(server, "/api/v1/events?since=abc")[0] == 400
    assert "/metrics" in get(server, "/")[2]


def test_openmetrics_on_request(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    status, ctype, body = get(server, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_oversized_request_is_refused_without_reading_it_all(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    status, _, _ = get(server, "/metrics", {"X-Filler": "a" * MAX_REQUEST_BYTES})
    assert status in (413, 414, 431)


def test_headers_dribbled_past_the_deadline_are_dropped(served: tuple[ApiServer, Backend],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline covers the headers too, not only the request line: a client that sends a valid
    request line, then one header byte every 0.1 s, is cut off instead of holding its slot."""
    monkeypatch.setattr(http_api, "HEADER_DEADLINE_S", 0.5)
    server, _ = served
    answer, closed = b"", False
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        s.settimeout(0.1)
        for _ in range(300):  # 30 s of dribbling at most
            try:
                s.sendall(b"x")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: the server closed while we were still sending
                closed = True
                break
            answer += chunk
            if not chunk:
                closed = True
                break
    assert closed and not answer.startswith(b"HTTP/1.0 200"), answer[:80]
    assert get(server, "/metrics")[0] == 200


def test_requests_start_no_thread_each(served: tuple[ApiServer, Backend],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections go to a pool of workers that grows to at most max_clients (4 here) and stays."""
    server, _ = served
    started: list[str] = []
    start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(50):
        assert get(server, "/metrics")[0] == 200
    assert len(started) <= 4, started


def test_clients_beyond_the_limit_get_503_and_the_server_recovers(served: tuple[ApiServer, Backend]) -> None:
    server, _ = served
    idle = []
    # max_clients (one peer gets 3 of the 4): a connection holds a slot once its request has begun (one
    # that has sent nothing waits for its first byte without one), until the header deadline
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        idle.append(s)
    try:
        deadline = time.monotonic() + http_api.HEADER_DEADLINE_S - 1
        status = 0
        while status != 503 and time.monotonic() < deadline:  # accepted in the server thread's own time
            status = get(server, "/healthz")[0]
        assert status == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    status = 0
    while status != 200 and time.monotonic() < deadline:
        status = get(server, "/healthz")[0]
    assert status == 200


def test_stream_delivers_new_events_as_json_lines(served: tuple[ApiServer, Backend]) -> None:
    server, backend = served
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request("GET", "/api/v1/stream")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "application/x-ndjson"
    got: list[dict[str, Any]] = []

    def read() -> None:
        while len(got) < 3:
            line = r.readline()
            if not line:
                return
            got.append(json.loads(line))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(3):
        backend.events.append(event(EventType.OPTIMIZE, 9, seq=i), "2048kB")
    reader.join(timeout=10)
    conn.close()
    assert [(g["type"], g["seq"], g["event"]) for g in got] == [("event", i, "optimize") for i in (1, 2, 3)]


def test_stream_tells_a_slow_reader_what_it_missed() -> None:
    log = EventLog(16)
    for i in range(40):
        log.append(event(EventType.OPTIMIZE, 9, seq=i), "2048kB")
    batch = log.since(0, 100)
    assert batch.missed == 24 and batch.records[0]["seq"] == 25 and batch.next_seq == 40
    assert batch.records[0]["pfn"] == event(EventType.OPTIMIZE, 9, seq=24).pfn  # the 25th, built on read
    assert batch.records[0]["hstate"] == "2048kB" and batch.records[0]["event"] == "optimize"
    assert log.since(40, 10).records == [] and log.since(99, 10).next_seq == 40


def test_readme_documents_every_metric() -> None:
    """Issue 5: every metric the exporter serves is documented in the README's metric table."""
    from pathlib import Path

    from exporters.prometheus.collector import METRICS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in METRICS if f"| `{name}` |" not in readme]
    assert not missing, f"README's metric table lacks {missing}"


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_exposition_is_the_registry_encoding_of_the_current_model(accept: str) -> None:
    from prometheus_client.exposition import choose_encoder

    model = Model(SPECS, 4096, settle_seconds=0.05)
    model.take_baseline(snapshot(16, 16, 1, 1))
    exposition = Exposition(model.view, process=False)
    encoder, content_type = choose_encoder(accept)

    def fresh() -> bytes:
        return encoder(registry(model.view, process=False))

    body, ctype = exposition.render(accept)
    assert (body, ctype) == (fresh(), content_type)
    assert exposition.render(accept)[0] is body  # nothing changed: the encoded body is reused

    model.on_event(event(EventType.RESTORE, 9))
    model.observe(snapshot(15, 15, 1, 1), Aggregates(counts={(EventType.RESTORE, 9, Result.OK): 1}))
    changed = exposition.render(accept)[0]
    assert changed != body and changed == fresh()
    assert b'hvo_hugepages{hstate="2048kB",node="0"} 15.0' in changed

    with_process = Exposition(model.view).render(accept)[0]
    assert with_process.startswith(changed.removesuffix(b"# EOF\n"))
    assert b"process_resident_memory_bytes" in with_process
    assert with_process.count(b"# EOF") == (1 if "openmetrics" in accept else 0)


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_exposition_reencodes_only_changed_series_and_stays_the_full_encoding(accept: str) -> None:
    """Aggregates that move a few slots at a time (a busy kernel), pools on several nodes that change
    now and then, series that appear: after every change the body is byte for byte the encoder's
    output for the whole registry, and only the series that changed were encoded again."""
    import random

    from prometheus_client.exposition import choose_encoder

    from observer.probes.events import HIST_BUCKETS

    encoder, _ = choose_encoder(accept)
    encoded: list[int] = []

    def counting(collector: Any) -> bytes:
        encoded.append(sum(len(m.samples) for m in collector.collect()))
        return encoder(collector)

    model = Model(SPECS, 4096, settle_seconds=0.05)
    model.take_baseline(snapshot(16, 16, 1, 1))
    exposition = Exposition(model.view, process=False)
    exposition_encoder = choose_encoder

    def render() -> bytes:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("exporters.prometheus.collector.choose_encoder",
                       lambda a: (counting, exposition_encoder(a)[1]))
            return exposition.render(accept)[0]

    rng = random.Random(7)
    counts: dict[Any, int] = {}
    hist: dict[Any, list[int]] = {}
    timed = (EventType.OPTIMIZE, EventType.RESTORE)
    for step in range(60):
        for _ in range(rng.randrange(1, 3)):
            key = (rng.choice(list(EventType)[1:]), rng.choice((9, 18)), rng.choice(list(Result)))
            counts[key] = counts.get(key, 0) + rng.randrange(1, 50)
        op_key = (rng.choice(timed), rng.choice((9, 18)))
        hist.setdefault(op_key, [0] * HIST_BUCKETS)[rng.randrange(10, 30)] += 1
        pages = 16 + (step // 10)  # the pools change every tenth step
        model.observe(snapshot(pages, 16, 1, 1), Aggregates(counts=dict(counts),
                                                            hist={k: list(v) for k, v in hist.items()}))
        encoded.clear()
        body = render()
        assert body == encoder(registry(model.view, process=False)), f"step {step}"
        total = sum(len(m.samples) for m in registry(model.view, process=False).collect())
        # the first body encodes every sample; later ones the always-encoded runtime and reconcile
        # gauges (~12), one histogram series (30) and the counters that moved, not the ~170 samples
        assert sum(encoded) == total if step == 0 else sum(encoded) < total / 3, f"step {step}: {encoded}"
