"""Exact numbers under load: an event storm, and a ring buffer too small on purpose (host, tracepoint mode).

The bookkeeping identity checked after each storm (tests/daemon_proc.check_books): every record the
BPF side counted was either handed to the daemon or counted as lost,

    sum(hvo_events_total) == events handed to the daemon + hvo_events_lost_total

and the in-kernel pool counts equal what the test did to the pool, whatever was lost. The random
seed is printed (set HVO_STORM_SEED to replay a run).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from observer.kernel import sysctl
from tests.daemon_proc import (
    H1G,
    H2M,
    Daemon,
    Pool,
    check_books,
    check_exact,
    count,
    daemon,
    empty_pools,
    one,
    seeded_rng,
    set_pool,
    settled,
    settled_books,
)

pytestmark = pytest.mark.live

STEPS = 1000
MAX_PAGES = 64
PAGE = 4096


def test_a_storm_of_random_pool_steps_ends_exact(tmp_path: Path) -> None:
    rng = seeded_rng()
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        with daemon(tmp_path, "--recent-events", "16") as d:  # a small log: delivery is counted by seq
            before, seq0 = settled_books(d)
            pool = Pool()
            t0 = time.monotonic()
            for _ in range(STEPS):
                pool.resize(rng.randint(0, MAX_PAGES))
            storm_s = time.monotonic() - t0
            after, seq = settled_books(d)
            delivered = seq - seq0
            print(f"{STEPS} steps in {storm_s:.1f} s: {pool.allocs} allocations, {pool.frees} frees, "
                  f"{delivered} events delivered, resyncs {one(after, 'hvo_resyncs_total'):.0f}")
            counts = {k: v for k, v in after["hvo_events_total"].items() if v}
            print(f"counts {counts}, drift {one(after, 'hvo_reconcile_drift_bytes'):.0f}, optimized "
                  f"{one(after, 'hvo_optimized_hugepages', hstate=H2M, node='0'):.0f} of {pool.pages}")
            check_exact(after, {H2M: pool.pages, H1G: 0}, {H2M: pool.pages, H1G: 0}, "after the storm")
            lost = check_books(before, after, delivered, pool)
            if lost:
                assert one(after, "hvo_resyncs_total") >= 1, "records were lost but the model never resynced"
            else:
                # Nothing lost: every allocation was judged once (optimize ok or skipped), and the
                # inferred events add up to what is optimized now. Which page of a busy window was
                # optimized is inferred from a counter delta: with the sysctl on, "skipped" here is a
                # misattribution (reported, not failed: infer.py documents the ambiguity).
                opt = count(after, "optimize") - count(before, "optimize")
                skipped = count(after, "optimize", "skipped") - count(before, "optimize", "skipped")
                assert opt + skipped == pool.allocs
                assert opt - (count(after, "restore") - count(before, "restore")) == pool.pages
                assert count(after, "restore", "error") == 0
                assert one(after, "hvo_resyncs_total") == 0, d.output()
                print(f"{skipped} of {pool.allocs} allocations inferred as skipped (misattributed)")
            assert d.stop() == 0


def burst_while_stopped(d: Daemon, pool: Pool, target: int) -> None:
    """Resize the pool while the daemon cannot read its ring buffer (SIGSTOP): records pile up."""
    os.kill(d.pid, signal.SIGSTOP)
    try:
        pool.resize(target)
    finally:
        os.kill(d.pid, signal.SIGCONT)


def test_a_ring_buffer_too_small_loses_records_counts_them_and_resyncs(tmp_path: Path) -> None:
    rng = seeded_rng()
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        # One page of ring buffer holds 51 records of 72 bytes (+ 8 bytes of header each).
        with daemon(tmp_path, "--ring-buffer-bytes", str(PAGE), "--recent-events", "16") as d:
            before, seq0 = settled_books(d)
            pool = Pool()
            burst_while_stopped(d, pool, 256)
            if pool.pages != 256:
                pytest.skip(f"the kernel gave {pool.pages} of 256 2 MiB pages (memory fragmented)")
            m, seq = settled_books(d)
            lost = check_books(before, m, seq - seq0, pool)
            assert lost >= 256 - PAGE // 80, "a stopped reader must lose most of 256 records"
            assert one(m, "hvo_resyncs_total") >= 1
            reason = d.status()["reconcile"]["last_resync"]["reason"]  # type: ignore[index]
            assert "lost" in reason, reason
            check_exact(m, {H2M: 256, H1G: 0}, {H2M: 256, H1G: 0}, "after the first loss")

            # Keep churning with the tiny buffer, starving the reader now and then (each starved
            # step swings the pool by at least 128 pages: more records than the buffer holds).
            resyncs, lost_before = one(m, "hvo_resyncs_total"), lost
            for step in range(200):
                if step % 20 == 0:
                    swing = 0 if pool.pages >= 128 else rng.randint(pool.pages + 128, 256)
                    burst_while_stopped(d, pool, swing)
                else:
                    pool.resize(rng.randint(0, 256))
            m, seq = settled_books(d)
            lost = check_books(before, m, seq - seq0, pool)
            print(f"{pool.allocs} allocations, {pool.frees} frees, {lost} records lost, "
                  f"{one(m, 'hvo_resyncs_total'):.0f} resyncs")
            assert lost > lost_before and one(m, "hvo_resyncs_total") > resyncs
            check_exact(m, {H2M: pool.pages, H1G: 0}, {H2M: pool.pages, H1G: 0}, "after the churn")
            set_pool(H2M, 0)
            check_exact(settled(d), {H2M: 0, H1G: 0}, {H2M: 0, H1G: 0}, "after emptying the pool")
            assert d.stop() == 0
