"""``hvo-observer bench``: it measures every figure, prints the table and writes valid JSON.

The figures themselves are not asserted (no timing assertions in tests): the full run's numbers
go into the README with the machine they came from.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from observer.bench import BENCHES, FIGURES, Figure, median_interval

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "observer", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def check_report(report: dict[str, Any], out: str, names: list[str]) -> None:
    assert set(report["machine"]) >= {"nproc", "memory_bytes", "kernel", "cpu", "python"}
    assert report["machine"]["nproc"] >= 1 and report["machine"]["memory_bytes"] > 0
    figures = {f["name"]: f for f in report["figures"]}
    assert sorted(figures) == sorted(names)
    for name, f in figures.items():
        assert isinstance(f["value"], int | float) and math.isfinite(f["value"]) and f["value"] > 0, (name, f)
        if f["target"] is None:
            assert f["pass"] is None, name
        else:
            assert f["target"]["op"] in ("<=", ">=") and f["pass"] in (True, False), name
            limit = f["target"]["value"]
            assert f["pass"] == (f["value"] <= limit if f["target"]["op"] == "<=" else f["value"] >= limit)
        row = next((ln for ln in out.splitlines() if ln.startswith(f["label"])), None)
        assert row is not None, f"no table row for {f['label']!r}:\n{out}"
        if f["interval"] is None:
            assert f["verdict"] == {True: "pass", False: "FAIL", None: "-"}[f["pass"]], name
        assert row.rstrip().endswith(f["verdict"]), row
    met = sum(f["verdict"] == "pass" for f in figures.values())
    assert f"{met} of {sum(f['pass'] is not None for f in figures.values())} targets met" in out


def test_the_median_interval_is_the_binomial_one_of_order_statistics() -> None:
    values = [float(v) for v in range(30, 0, -1)]  # any order
    assert median_interval(values) == (10.0, 21.0)  # the 10th and 21st of 30: 95.7 % coverage
    assert median_interval([float(v) for v in range(1, 10)]) == (2.0, 8.0)  # 9 values: 96.1 %
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # even min..max covers only 93.8 %


def test_a_target_inside_the_interval_makes_the_verdict_unsure() -> None:
    def fig(value: float, interval: tuple[float, float] | None) -> Figure:
        return Figure("r", "ratio", value, "x", ("<=", 1.03), interval=interval)

    assert fig(1.02, (1.01, 1.025)).verdict == "pass"
    assert fig(1.02, (0.98, 1.06)).verdict == "unsure" and fig(1.02, (0.98, 1.06)).passed is True
    assert fig(1.08, (1.04, 1.12)).verdict == "FAIL"
    assert fig(1.08, None).verdict == "FAIL"
    assert Figure("x", "x", None, "x", ("<=", 1.0)).verdict == "n/a"


def test_in_process_figures_need_no_privileges(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = bench("--quick", "--only", "scrape,decode", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["quick"] is True
    check_report(report, r.stdout, [*FIGURES["scrape"], *FIGURES["decode"]])
    assert report["figures"][0]["detail"]["nodes"] == 64 and report["figures"][0]["detail"]["hstates"] == 2


@pytest.mark.live
def test_quick_bench_measures_every_figure(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the daemon figures need root (BPF, pool sizes)")
    pytest.importorskip("bcc", reason="bcc (Debian's python3-bpfcc) is not importable: run scripts/setup")
    out = tmp_path / "bench.json"
    r = bench("--quick", "--force", "--json", str(out))
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads(out.read_text())
    names = [n for b in BENCHES for n in FIGURES[b]]
    check_report(report, r.stdout, names)
    figures = {f["name"]: f for f in report["figures"]}
    pool = figures["overhead_pool_ratio"]["detail"]
    assert pool["pairs"] == len(pool["cpu_ratios"]) == len(pool["wall_ratios"]) >= 2
    assert pool["daemon_cpu_s_per_run"] > 0 and pool["quiet_wait_s_median"] >= 0.5  # one window at least
    assert figures["startup_s"]["detail"]["mode"] in ("fentry", "kprobe", "tracepoint")
    assert figures["private_memory_mib"]["value"] < figures["rss_mib"]["value"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--only", "scrape,warp"], "hvo-observer: bad --only 'scrape,warp': unknown benchmark warp (choose"),
    (["--only", ","], "hvo-observer: bad --only ',': unknown benchmark (none)"),
    (["--only", "guest"], "hvo-observer: bad --only 'guest': unknown benchmark guest (choose"),
    (["--only", "overhead_pool"], "hvo-observer: bad --only: overhead_pool resizes the 2 MiB pool and turns "
                                  "HVO on: add --force"),
    (["--pool-pages", "0"], "hvo-observer: bad --pool-pages 0: expected 1 to 100000"),
    (["--pool-pages", "many"], "hvo-observer: argument --pool-pages: invalid int value: 'many'"),
    (["--mode", "ebpf"], "hvo-observer: bad --mode 'ebpf': choose auto, fentry, kprobe or tracepoint"),
    (["--pairs", "5"], "hvo-observer: bad --pairs '5': expected BLOCKS,RUNS, e.g. 5,5 (1 to 100 each)"),
    (["--pairs", "0,3"], "hvo-observer: bad --pairs '0,3': expected BLOCKS,RUNS"),
    (["--cycles", "0"], "hvo-observer: bad --cycles 0: expected 1 to 100"),
    (["--json", "/nonexistent-dir/out.json"],
     "hvo-observer: bad --json /nonexistent-dir/out.json: directory /nonexistent-dir does not exist"),
])
def test_bad_flags_are_one_line_errors(flags: list[str], message: str) -> None:
    r = bench(*flags, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(message), r.stderr
