"""SIGKILL, the signal nobody can handle: during attach and during churn. Nothing may be left in the
kernel (BPF programs, maps, links, kprobe events) and a restarted daemon must be exact.

What the killed daemon held is read from /proc/PID/fdinfo while it is stopped (SIGSTOP), so the
list is complete at the moment of the SIGKILL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from observer.kernel import hugepages, sysctl
from tests.daemon_proc import (
    H1G,
    H2M,
    Churn,
    Daemon,
    check_exact,
    daemon,
    empty_pools,
    held_bpf_ids,
    kill_holding,
    kprobe_events,
    leaked_bpf_ids,
    one,
    set_pool,
    settled,
    wait_for_programs,
)

pytestmark = pytest.mark.live


def allocations(d: Daemon) -> float:
    return one(d.scrape(), "hvo_events_total", event="pool_alloc", hstate=H2M, result="ok")


def test_sigkill_during_attach_leaves_nothing_and_a_restart_is_exact(tmp_path: Path) -> None:
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        set_pool(H2M, 16)
        set_pool(H1G, 1)
        kprobes_before = kprobe_events()
        killed_before_ready = 0
        # The first program appears when attaching begins; all three when it is nearly done (the
        # known-pages seed and the baseline are still to come).
        for at_least in (1, 1, 3):
            d = Daemon(tmp_path)
            wait_for_programs(d, at_least)
            held = kill_holding(d)
            assert held["prog"], "the daemon was killed before it loaded anything"
            killed_before_ready += "ready:" not in d.output()
            assert not leaked_bpf_ids(held), f"left after SIGKILL during attach: {leaked_bpf_ids(held)}"
            assert kprobe_events() == kprobes_before
        assert killed_before_ready >= 1, "every kill came after READY: the test did not kill during attach"
        with daemon(tmp_path) as d:
            m = d.scrape()  # no settling needed: these pools existed before the daemon started
            check_exact(m, {H2M: 16, H1G: 1}, {H2M: 16, H1G: 1}, "restarted after SIGKILL during attach")
            assert one(m, "hvo_baseline_exact") == 1
            assert d.stop() == 0


def test_sigkill_during_churn_leaves_nothing_and_a_restart_is_exact(tmp_path: Path) -> None:
    churn = Churn(lambda n: (n * 37) % 97)
    with empty_pools():
        sysctl.write_hvo_sysctl(True)
        kprobes_before = kprobe_events()
        try:
            with daemon(tmp_path) as first:
                churn.start()
                while allocations(first) < 200:
                    time.sleep(0.05)
                held = kill_holding(first)
            assert held["prog"] and held["map"]
            assert not leaked_bpf_ids(held), f"left after SIGKILL during churn: {leaked_bpf_ids(held)}"
            assert kprobe_events() == kprobes_before
            with daemon(tmp_path) as second:  # started while the churn goes on
                seen = allocations(second)
                while allocations(second) < seen + 200:
                    time.sleep(0.05)
                churn.stop()
                pages = hugepages.by_name(hugepages.read_hstates(), H2M).nr_hugepages
                check_exact(settled(second), {H2M: pages, H1G: 0}, {H2M: pages, H1G: 0},
                            "restarted during churn")
                held = held_bpf_ids(second.pid)
                assert second.stop() == 0
            assert not leaked_bpf_ids(held), f"left after SIGTERM: {leaked_bpf_ids(held)}"
        finally:
            churn.stop()
