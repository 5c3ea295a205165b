"""``hvo-observer bench``: what the daemon costs on this machine, against the project's targets.

Figures (``--only`` takes these names):
  startup          spawn of ``hvo-observer run`` to READY=1 (compile + attach + baseline), median
  memory           the running daemon's private (anonymous) memory and total RSS; the kernel memory of
                   its BPF maps at 384 possible CPUs (from each loaded map's fdinfo)
  idle_cpu         the daemon's CPU time while nothing happens, in % of one core
  scrape           GET /metrics latency p50/p99, real HTTP server, simulated model of 2 hstates x 64 nodes;
                   p99 again with the aggregates read and observed before each GET (shared BPF arrays:
                   the same at 384 possible CPUs as here); p99 again while a hostile local client holds
                   200 idle connections to the metrics listener and 20 unread streams on the API socket
  decode           events/s through the probe session's ring-buffer callback (replayed records); the
                   daemon's whole per-event path (model, JSON record, event log) is shown alongside
  overhead_pool    growing and shrinking the 2 MiB pool by 1,000 pages, daemon attached vs. detached:
                   median of paired ratios of the workload's own CPU time (what the probes add in its
                   context, unaffected by other load on the machine), and of its wall time
  overhead_faults  writing 1 GiB of fresh 4 KiB pages (a page fault each), attached vs. detached

overhead_pool resizes the 2 MiB pool and turns vm.hugetlb_optimize_vmemmap on: on a production host
that is a change to the machine, so it runs only with --force, and never while the pool is in use
(pages taken, reserved or surplus). Both are restored afterwards (also on Ctrl-C), and it waits for
the pool lock the live tests use. Nothing here asserts: the table says which figures meet their
targets; the exit code is 0 whenever every figure could be measured (1 when one could not).
The same figure in QEMU guests (fentry and kprobe modes) comes from the test harness:
``python -m tests.bench_guest`` in a source tree.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from observer import __version__
from observer.errors import ObserverError

BENCHES = ("startup", "memory", "idle_cpu", "scrape", "decode", "overhead_pool", "overhead_faults")
DAEMON_BENCHES = {"startup", "memory", "idle_cpu", "overhead_pool", "overhead_faults"}
POOL_BENCHES = {"overhead_pool"}  # they resize a huge page pool: --force only
# benchmark -> the figures it reports (JSON "name"s)
FIGURES: dict[str, tuple[str, ...]] = {
    "startup": ("startup_s",),
    "memory": ("private_memory_mib", "rss_mib", "bpf_map_mib_384cpu"),
    "idle_cpu": ("idle_cpu_pct",),
    "scrape": ("scrape_p50_ms", "scrape_p99_ms", "scrape_384cpu_p99_ms", "scrape_hostile_p99_ms"),
    "decode": ("decode_events_per_s", "pipeline_events_per_s"),
    "overhead_pool": ("overhead_pool_ratio", "overhead_pool_wall_ratio"),
    "overhead_faults": ("overhead_faults_ratio", "overhead_faults_wall_ratio"),
}


@dataclass(frozen=True)
class Plan:
    pool_pages: int = 1000
    pool_cycles: int = 3  # grow+shrink cycles per timed run: one takes only ~40 ms of CPU
    blocks: int = 15  # daemon starts of the paired overhead runs (attached first, then detached first)
    reps: int = 2  # paired runs per block: few, so that the two runs of a pair are close in time
    fault_bytes: int = 1 << 30
    startup_samples: int = 5
    settle_s: float = 5.0  # running before memory is read
    idle_s: float = 60.0
    scrapes: int = 2000
    decode_events: int = 1_000_000


FULL = Plan()
QUICK = Plan(pool_pages=100, pool_cycles=1, blocks=2, reps=1, fault_bytes=128 << 20,
             startup_samples=2, settle_s=1.0, idle_s=5.0, scrapes=200, decode_events=100_000)


@dataclass
class Figure:
    name: str
    label: str
    value: float | None
    unit: str
    target: tuple[str, float] | None = None  # ("<=", 1.02) or (">=", 200000)
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    interval: tuple[float, float] | None = None  # 95 % confidence interval of a median (paired runs)

    @property
    def passed(self) -> bool | None:
        """The value against the target (for a median ratio: the median, as the target is stated)."""
        if self.target is None or self.value is None:
            return None
        return _meets(self.value, self.target)

    @property
    def verdict(self) -> str:
        """pass/FAIL, or "unsure" when the interval has values on both sides of the target: the runs
        scatter too much to tell, whatever the median says."""
        if self.passed is None:
            return "-" if self.value is not None else "n/a"
        if self.interval is not None and self.target is not None:
            lo, hi = (_meets(v, self.target) for v in self.interval)
            if lo != hi:
                return "unsure"
        return "pass" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = None if self.target is None else {"op": self.target[0], "value": self.target[1]}
        out["interval"] = None if self.interval is None else list(self.interval)
        out["pass"] = self.passed
        out["verdict"] = self.verdict
        return out


def _meets(value: float, target: tuple[str, float]) -> bool:
    op, limit = target
    return value <= limit if op == "<=" else value >= limit


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: order statistics k and n+1-k, with k the
    largest such that P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (n = 30: the 10th and 21st of 30,
    95.7 %). None for fewer than 6 values (no such k)."""
    n, s = len(values), sorted(values)
    tail, below, k = (1 - level) / 2, 0.0, 0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return (s[k - 1], s[n - k]) if k else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="short run (fewer pages, pairs and samples): checks the machinery, not the figures")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure, with details, as JSON")
    p.add_argument("--only", metavar="NAME,...", help=f"run only these: {', '.join(BENCHES)}")
    p.add_argument("--mode", default="auto", metavar="MODE",
                   help="probe mode of the daemon under test: auto (default), fentry, kprobe, tracepoint")
    p.add_argument("--pool-pages", type=int, metavar="N", help="pages per grow/shrink (default 1000)")
    p.add_argument("--pairs", metavar="BLOCKS,RUNS",
                   help="overhead pairing: daemon starts, and paired runs per start "
                        f"(default {FULL.blocks},{FULL.reps})")
    p.add_argument("--cycles", type=int, metavar="N",
                   help=f"grow+shrink cycles per timed pool run (default {FULL.pool_cycles})")
    p.add_argument("--force", action="store_true",
                   help="also run overhead_pool, which resizes the 2 MiB pool and turns HVO on (restored "
                        "afterwards); refused while the pool is in use")


def run(args: argparse.Namespace) -> int:
    selected = _selected(args.only, args.force)
    if args.mode not in ("auto", "fentry", "kprobe", "tracepoint"):
        raise ObserverError(f"bad --mode {args.mode!r}: choose auto, fentry, kprobe or tracepoint")
    plan = QUICK if args.quick else FULL
    plan = _tuned(plan, args)
    if args.json is not None and not args.json.parent.is_dir():
        raise ObserverError(f"bad --json {args.json}: directory {args.json.parent} does not exist")
    if args.only is None and not args.force:
        _progress(f"not running {', '.join(sorted(POOL_BENCHES))}: it resizes the 2 MiB pool (--force)")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    figures: list[Figure] = []
    t0 = time.monotonic()
    if "scrape" in selected:
        figures += _scrape(plan)
    if "decode" in selected:
        figures += _decode(plan)
    if selected & DAEMON_BENCHES:
        figures += _daemon_benches(plan, selected, args.mode)
    report = {
        "version": __version__, "started": started, "seconds": round(time.monotonic() - t0, 1),
        "quick": args.quick, "plan": asdict(plan), "machine": machine(),
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "figures": [f.to_json() for f in figures],
    }
    print(table(figures, report))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise ObserverError(f"cannot write --json {args.json}: {e.strerror or e}") from None
    return 1 if any(f.value is None for f in figures) else 0


def _tuned(plan: Plan, args: argparse.Namespace) -> Plan:
    changes: dict[str, int] = {}
    if args.pool_pages is not None:
        if not 1 <= args.pool_pages <= 100_000:
            raise ObserverError(f"bad --pool-pages {args.pool_pages}: expected 1 to 100000")
        changes["pool_pages"] = args.pool_pages
    if getattr(args, "cycles", None) is not None:
        if not 1 <= args.cycles <= 100:
            raise ObserverError(f"bad --cycles {args.cycles}: expected 1 to 100")
        changes["pool_cycles"] = args.cycles
    if getattr(args, "pairs", None) is not None:
        blocks, _, runs = args.pairs.partition(",")
        if not (blocks.isdigit() and runs.isdigit() and 1 <= int(blocks) <= 100 and 1 <= int(runs) <= 100):
            raise ObserverError(f"bad --pairs {args.pairs!r}: expected BLOCKS,RUNS, e.g. 5,5 (1 to 100 each)")
        changes["blocks"], changes["reps"] = int(blocks), int(runs)
    return Plan(**{**asdict(plan), **changes})


def _selected(only: str | None, force: bool) -> set[str]:
    if only is None:
        return set(BENCHES) - (set() if force else POOL_BENCHES)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = sorted(names - set(BENCHES))
    if unknown or not names:
        raise ObserverError(f"bad --only {only!r}: unknown benchmark {', '.join(unknown) or '(none)'} "
                            f"(choose from {', '.join(BENCHES)})")
    forced = sorted(names & POOL_BENCHES)
    if forced and not force:
        raise ObserverError(f"bad --only: {', '.join(forced)} resizes the 2 MiB pool and turns HVO on: "
                            "add --force (never on a host whose pool is in use)")
    return names


def pool_in_use() -> str:
    """Why the 2 MiB pool must not be resized now ("" when it may): pages taken by a process,
    reserved for a mapping, or surplus (overcommitted) pages belong to someone."""
    from observer.bench_workloads import H2M
    from observer.kernel import hugepages

    h = next((h for h in hugepages.read_hstates() if h.name == H2M), None)
    if h is None:
        return "this kernel has no 2 MiB huge page pool"
    used = h.nr_hugepages - h.free_hugepages
    if used or h.resv_hugepages or h.surplus_hugepages:
        return (f"the {H2M} pool is in use ({used} of {h.nr_hugepages} pages taken, {h.resv_hugepages} "
                f"reserved, {h.surplus_hugepages} surplus)")
    return ""


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q * len(s) + 0.5) - 1))]


# --- in-process figures -------------------------------------------------------------------------

def _scrape(plan: Plan) -> list[Figure]:
    from observer.bench_workloads import scrape_latencies

    _progress(f"scrape: {plan.scrapes} GETs of /metrics (2 hstates x 64 nodes)")
    times, size, series = scrape_latencies(plan.scrapes)
    detail = {"requests": len(times), "body_bytes": size, "series": series, "hstates": 2, "nodes": 64}
    return [
        Figure("scrape_p50_ms", "GET /metrics p50 (2 hstates x 64 nodes)", _pct(times, 0.5) * 1e3, "ms",
               None, detail=detail),
        Figure("scrape_p99_ms", "GET /metrics p99 (2 hstates x 64 nodes)", _pct(times, 0.99) * 1e3, "ms",
               ("<=", 10.0), detail=detail),
        _scrape_percpu(plan),
        _scrape_hostile(plan),
    ]


def _scrape_percpu(plan: Plan) -> Figure:
    from observer.bench_workloads import scrape_latencies
    from observer.bpf_footprint import BIG_HOST_CPUS, AggregateReads

    reads = AggregateReads()
    _progress(f"scrape: {plan.scrapes} GETs of /metrics, each after an aggregate read and a model change")
    times, _, _ = scrape_latencies(plan.scrapes, before_each=reads)
    return Figure("scrape_384cpu_p99_ms", f"aggregate read + GET /metrics p99, {BIG_HOST_CPUS} CPUs",
                  _pct(times, 0.99) * 1e3, "ms", ("<=", 10.0),
                  detail={"requests": len(times), "cpus": BIG_HOST_CPUS,
                          "count_slots": reads.layout.count_slots, "hist_slots": reads.layout.hist_slots,
                          "p50_ms": round(_pct(times, 0.5) * 1e3, 3)})


HOSTILE_IDLE, HOSTILE_STREAMS = 200, 20
# The hostile local client, a process of its own: idle connections to the metrics listener (reopened
# whenever the server drops one) and event streams on the API socket that it never reads.
_HOSTILE = """
import select, socket, sys, time
port, path, n_idle, n_streams = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(n_idle)]
streams = []
for _ in range(n_streams):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"GET /api/v1/stream HTTP/1.0\\r\\n\\r\\n")
    streams.append(s)
print("ready", flush=True)
while True:
    for s in select.select(idle, [], [], 0.2)[0]:  # readable: the server closed it
        idle.remove(s)
        s.close()
        idle.append(socket.create_connection(("127.0.0.1", port)))
"""


def _scrape_hostile(plan: Plan) -> Figure:
    """GET /metrics p99 while a hostile local client holds HOSTILE_IDLE idle connections to the
    metrics listener and HOSTILE_STREAMS unread event streams on the API socket (the daemon's two
    listeners, on the simulated model): idle connections take no request slot and streams have a
    budget of their own, so the scrape should not notice."""
    import http.client
    import subprocess
    import tempfile

    from observer.bench_workloads import _Backend, simulated_model
    from observer.http_api import ApiServer, UnixApiServer

    backend = _Backend(simulated_model())
    label = f"GET /metrics p99, {HOSTILE_IDLE} idle connections + {HOSTILE_STREAMS} streams held"
    with tempfile.TemporaryDirectory(prefix="hvo-bench-") as tmp:
        tcp = ApiServer(("127.0.0.1", 0), backend, max_clients=16)
        unix = UnixApiServer(Path(tmp) / "api.sock", backend, max_clients=16)
        tcp.start()
        unix.start()
        port = tcp.server_address[1]
        argv = [str(port), str(unix.path), str(HOSTILE_IDLE), str(HOSTILE_STREAMS)]
        hostile = subprocess.Popen([sys.executable, "-c", _HOSTILE, *argv], stdout=subprocess.PIPE, text=True)
        times: list[float] = []
        statuses: dict[int, int] = {}
        try:
            assert hostile.stdout is not None
            if hostile.stdout.readline().strip() != "ready":
                return _missing("scrape_hostile_p99_ms", "the hostile client could not connect")
            time.sleep(0.5)  # its streams are being served (or refused) before timing starts
            _progress(f"scrape: {plan.scrapes} GETs of /metrics while a local client holds "
                      f"{HOSTILE_IDLE} idle connections and {HOSTILE_STREAMS} unread streams")
            for _ in range(plan.scrapes):
                t0 = time.perf_counter()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    conn.request("GET", "/metrics")
                    r = conn.getresponse()
                    r.read()
                    status = r.status
                except (OSError, http.client.HTTPException):
                    status = 0  # closed or broken without an answer
                finally:
                    conn.close()
                times.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            hostile.kill()
            hostile.wait()
            tcp.stop()
            unix.stop()
    ok = statuses.get(200, 0)
    return Figure("scrape_hostile_p99_ms", label, _pct(times, 0.99) * 1e3 if ok == len(times) else None, "ms",
                  ("<=", 10.0), note="" if ok == len(times) else f"answers: {statuses}",
                  detail={"requests": len(times), "statuses": statuses, "idle": HOSTILE_IDLE,
                          "streams": HOSTILE_STREAMS, "p50_ms": round(_pct(times, 0.5) * 1e3, 3)})


def _decode(plan: Plan) -> list[Figure]:
    from observer.bench_workloads import decode_rate

    _progress(f"decode: {plan.decode_events:,} replayed records")
    rate = max(decode_rate(plan.decode_events, pipeline=False) for _ in range(3))
    full = max(decode_rate(plan.decode_events // 4, pipeline=True) for _ in range(3))
    return [
        Figure("decode_events_per_s", "event decode (ring-buffer callback, replayed)", rate, "events/s",
               (">=", 200_000.0), detail={"records": plan.decode_events, "best_of": 3}),
        Figure("pipeline_events_per_s", "event -> model + event log (daemon's path)", full, "events/s",
               None, detail={"records": plan.decode_events // 4, "best_of": 3}),
    ]


# --- figures of the daemon on this host ---------------------------------------------------------

def _daemon_benches(plan: Plan, selected: set[str], mode: str) -> list[Figure]:
    wanted = selected & DAEMON_BENCHES
    why = _cannot_run_daemon()
    if why:
        return [_missing(name, why) for bench in sorted(wanted) for name in FIGURES[bench]]
    from observer import bench_workloads as w

    figures: list[Figure] = []
    startups: list[float] = []
    chosen = [""]
    with w.daemon_workdir() as tmp, w.pool_lock() as lock_note, w.KernelGuard():
        busy = pool_in_use() if wanted & POOL_BENCHES else ""
        if busy:  # checked under the lock: a test resizing the pool has finished and restored it
            raise ObserverError(f"refusing overhead_pool: {busy}")
        workdir = Path(tmp)

        def start() -> w.DaemonProcess:
            d = w.DaemonProcess(mode, workdir).start()
            startups.append(d.ready_s)
            chosen[0] = d.chosen_mode
            return d

        if wanted & {"overhead_pool", "overhead_faults"}:
            figures += _overhead(plan, wanted, start, lock_note)
        while "startup" in wanted and len(startups) < plan.startup_samples:
            _progress(f"startup: sample {len(startups) + 1}/{plan.startup_samples}")
            start().stop()
        if "startup" in wanted:
            figures.append(Figure("startup_s", f"start-up to READY ({chosen[0]} mode)",
                                  statistics.median(startups), "s", ("<=", 2.0),
                                  detail={"samples": [round(s, 3) for s in startups]}))
        if wanted & {"memory", "idle_cpu"}:
            figures += _steady(plan, wanted, start)
    for f in figures:
        f.detail.setdefault("mode", chosen[0])
    return figures


def _cannot_run_daemon() -> str:
    if os.geteuid() != 0:
        return "needs root (BPF, pool sizes)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (Debian's python3-bpfcc) is not importable"
    return ""


def _missing(name: str, why: str) -> Figure:
    return Figure(name, name, None, "", None, note=why)


def _overhead(plan: Plan, wanted: set[str], start: Callable[[], Any], lock_note: str) -> list[Figure]:
    """Paired runs: in each block the daemon is started for ``reps`` runs (each once the daemon is quiet),
    then stopped for as many (the order alternates between blocks); pair i of a block is (attached run
    i, detached run i). Right before every timed run, in both arms, ``fault_bytes`` are touched untimed:
    in a VM, free page reporting hands memory idle for 2 s back to the hypervisor and touching it again
    costs a host fault per page, which would make a run's cost depend on how long it waited (the
    attached arm waits for a quiet daemon); warmed, the run finds the memory it will use backed."""
    from observer.bench_workloads import H2M, grow_shrink, touch_pages
    from observer.kernel import hugepages, sysctl

    if "overhead_pool" in wanted and sysctl.read_hvo_sysctl() is not None:
        sysctl.write_hvo_sysctl(True)  # the cost with HVO at work: every page optimized and restored
    base = hugepages.by_name(hugepages.read_hstates(), H2M).nr_hugepages
    workloads = {"pool": lambda: grow_shrink(plan.pool_pages, base, plan.pool_cycles),
                 "faults": lambda: touch_pages(plan.fault_bytes)}
    keys = [k for k in workloads if f"overhead_{k}" in wanted]

    def measure(d: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in keys:
            out[f"{k}_quiet_wait_s"] = d.wait_quiet() if d else 0.0
            touch_pages(plan.fault_bytes)
            c0 = d.cpu_ns() if d else 0
            out[k] = workloads[k]()
            out[f"{k}_daemon_cpu"] = (d.cpu_ns() - c0) / 1e9 if d else 0.0
        return out

    measure()  # warm-up: compaction, page cache, first-touch effects
    attached: list[dict[str, Any]] = []
    detached: list[dict[str, Any]] = []
    for block in range(plan.blocks):
        _progress(f"overhead: block {block + 1}/{plan.blocks} ({plan.reps} paired runs)")
        for with_daemon in ((True, False) if block % 2 == 0 else (False, True)):  # cancel slow drifts
            if with_daemon:
                d = start()
                try:
                    attached += [measure(d) for _ in range(plan.reps)]
                finally:
                    d.stop()
            else:
                detached += [measure() for _ in range(plan.reps)]
    labels = {"pool": f"2 MiB pool grow+shrink by {plan.pool_pages:,} pages",  # x pool_cycles per run
              "faults": f"{plan.fault_bytes >> 20:,} MiB of 4 KiB page faults"}
    limits = {"pool": 1.02, "faults": 1.03}
    figures = []
    for k in keys:
        pairs = list(zip(attached, detached, strict=True))
        cpu = [a[k].cpu / d[k].cpu for a, d in pairs]
        wall = [a[k].wall / d[k].wall for a, d in pairs]
        detail: dict[str, Any] = {
            "pairs": len(pairs), "cpu_ratios": [round(r, 4) for r in cpu],
            "wall_ratios": [round(r, 4) for r in wall],
            "attached_median_cpu_s": round(statistics.median(a[k].cpu for a in attached), 5),
            "detached_median_cpu_s": round(statistics.median(d[k].cpu for d in detached), 5),
            "attached_median_wall_s": round(statistics.median(a[k].wall for a in attached), 5),
            "detached_median_wall_s": round(statistics.median(d[k].wall for d in detached), 5),
            "daemon_cpu_s_per_run": round(statistics.median(a[f"{k}_daemon_cpu"] for a in attached), 5),
            "quiet_wait_s_median": round(statistics.median(a[f"{k}_quiet_wait_s"] for a in attached), 2),
        }
        detail["cpu_ratio_quartiles"] = [round(q, 4) for q in (statistics.quantiles(cpu, n=4) if len(cpu) > 1
                                                               else cpu)]
        if k == "pool":
            detail["cycles_per_run"] = plan.pool_cycles
        if lock_note:
            detail["note"] = lock_note
        figures += [
            Figure(f"overhead_{k}_ratio", f"{labels[k]}, workload CPU time attached/detached",
                   statistics.median(cpu), "x", ("<=", limits[k]), detail=detail,
                   interval=median_interval(cpu)),
            Figure(f"overhead_{k}_wall_ratio", f"{labels[k]}, wall time attached/detached",
                   statistics.median(wall), "x", None, detail=detail, interval=median_interval(wall)),
        ]
    return figures


def _bpf_maps(pid: int) -> Figure:
    from observer.bpf_footprint import BIG_HOST_CPUS, map_memory, process_maps

    maps = process_maps(pid)
    detail = {"maps": [{"id": m.map_id, "type": m.map_type, "per_cpu": m.per_cpu, "entries": m.max_entries,
                        "value_size": m.value_size, "mib": round(m.bytes_at(BIG_HOST_CPUS) / 2**20, 3)}
                       for m in maps],
              "here_mib": round(map_memory(maps, os.cpu_count() or 1) / 2**20, 3)}
    return Figure("bpf_map_mib_384cpu", f"BPF map memory at {BIG_HOST_CPUS} possible CPUs",
                  map_memory(maps, BIG_HOST_CPUS) / 2**20, "MiB", ("<=", 8.0), detail=detail)


def _steady(plan: Plan, wanted: set[str], start: Callable[[], Any]) -> list[Figure]:
    d = start()
    figures = []
    try:
        _progress(f"memory: running {plan.settle_s:.0f} s, 10 scrapes")
        time.sleep(plan.settle_s)
        for _ in range(10):
            d.get("/metrics")
        mem = d.memory_kib()
        if "memory" in wanted:
            detail = {k: round(v / 1024, 1) for k, v in mem.items()}
            figures += [
                Figure("private_memory_mib", "private (anonymous) memory, running", mem["RssAnon"] / 1024,
                       "MiB", ("<=", 50.0), detail=detail),
                Figure("rss_mib", "total RSS (incl. shared libraries' file pages)", mem["VmRSS"] / 1024,
                       "MiB", None, detail=detail),
                _bpf_maps(d.pid),
            ]
        if "idle_cpu" in wanted:
            _progress(f"idle_cpu: {plan.idle_s:.0f} s without pool activity")
            c0, t0 = d.cpu_ns(), time.monotonic_ns()
            time.sleep(plan.idle_s)
            c1, t1 = d.cpu_ns(), time.monotonic_ns()
            pct = 100 * (c1 - c0) / (t1 - t0)
            figures.append(Figure("idle_cpu_pct", "idle CPU, % of one core", pct, "%", ("<=", 0.5),
                                  detail={"window_s": plan.idle_s, "cpu_s_per_minute": round(pct * 0.6, 3)}))
    finally:
        d.stop()
    return figures


# --- output -------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0]) * 1024
    return {"nproc": len(os.sched_getaffinity(0)), "memory_bytes": mem, "kernel": platform.release(),
            "cpu": cpu, "python": platform.python_version()}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "events/s":
        return f"{value:,.0f}/s"
    return f"{value:.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def table(figures: list[Figure], report: dict[str, Any]) -> str:
    m = report["machine"]
    quick = " --quick" if report["quick"] else ""
    head = (f"hvo-observer {report['version']} bench{quick}: {m['cpu'] or '?'}, {m['nproc']} CPUs, "
            f"{m['memory_bytes'] / 2**30:.0f} GiB, kernel {m['kernel']}, load "
            f"{report['loadavg']['before'][0]:.2f} -> {report['loadavg']['after'][0]:.2f}")
    rows = [("figure", "value", "target", "result")]
    for f in figures:
        target = "" if f.target is None else f"{f.target[0]} {_fmt(f.target[1], f.unit)}"
        label = f.label if f.value is not None else f"{f.label}: {f.note}"
        value = _fmt(f.value, f.unit)
        if f.interval is not None:
            value += f" (95% CI {f.interval[0]:.3f}-{f.interval[1]:.3f})"
        rows.append((label, value, target, f.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head, ""]
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    verdicts = [f.verdict for f in figures if f.passed is not None]
    unsure = verdicts.count("unsure")
    why = f", {unsure} unsure (the 95% interval of the median straddles the target)" if unsure else ""
    lines += ["", f"{verdicts.count('pass')} of {len(verdicts)} targets met{why}"]
    return "\n".join(lines)
