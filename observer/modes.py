"""Which probe modes this kernel allows, each with the reason when it does not.

fentry/fexit gives typed arguments and return values (preferred); kprobe/kretprobe is the fallback;
tracepoint mode works where neither does (pool events from kmem tracepoints, attached as raw
tracepoints, optimize/restore inferred from counters). Availability is decided by real trials, not by
version numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from observer.errors import ObserverError
from observer.kernel import bpf_trial, tracefs
from observer.kernel.facts import KernelFacts
from observer.kernel.files import read_int, under
from observer.kernel.kconfig import enabled
from observer.probes.page_pfn import vmemmap_base_problem

MODES = ("fentry", "kprobe", "tracepoint")  # best first
# Functions an fentry trial attaches to (briefly): an HVO one when the kernel has it, else a
# function every kernel has.
_FENTRY_TRIAL_FUNCS = ("hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize", "vfs_read")


@dataclass(frozen=True)
class ModeSupport:
    available: bool
    reason: str  # why not; "" when available


def fentry_support(facts: KernelFacts) -> ModeSupport:
    if facts.btf is None:
        return ModeSupport(False, "the kernel has no BTF (/sys/kernel/btf/vmlinux): fentry needs it")
    for func in _FENTRY_TRIAL_FUNCS:
        func_id = facts.btf.func_id(func)
        if func_id is not None:
            ok, reason = bpf_trial.try_fentry(func_id)
            return ModeSupport(ok, reason)
    return ModeSupport(False, "no function to attach a trial fentry program to was found in BTF")


def kprobe_support(facts: KernelFacts) -> ModeSupport:
    pmu = under(facts.root, "/sys/bus/event_source/devices/kprobe/type")
    if pmu.exists():
        # The PMU may exist and still be refused to us (perf_event_paranoid, capabilities): try it.
        return ModeSupport(*bpf_trial.try_kprobe_event(read_int(pmu)))
    tracing = tracefs.tracefs_dir(facts.root)
    if tracing is not None and (tracing / "kprobe_events").exists():
        return ModeSupport(True, "")
    if enabled(facts.kconfig, "CONFIG_KPROBES") is False:
        return ModeSupport(False, "the kernel is built without kprobes (CONFIG_KPROBES is not set)")
    return ModeSupport(False, "the kernel offers no kprobe interface (no kprobe PMU, no kprobe_events)")


def tracepoint_support(facts: KernelFacts) -> ModeSupport:
    try:
        facts.tracefs()
    except ObserverError as e:
        return ModeSupport(False, str(e))
    for event in ("mm_page_alloc", "mm_page_free"):
        if not tracefs.event_exists("kmem", event, facts.root):
            return ModeSupport(False, f"the kernel has no kmem:{event} tracepoint")
    return ModeSupport(*bpf_trial.try_raw_tracepoint("mm_page_alloc"))


def mode_support(facts: KernelFacts) -> dict[str, ModeSupport]:
    return {"fentry": fentry_support(facts), "kprobe": kprobe_support(facts),
            "tracepoint": tracepoint_support(facts)}


def mode_limits(facts: KernelFacts, mode: str) -> list[str]:
    """What ``mode`` cannot see on this kernel whatever attaches: each a reason the daemon runs
    degraded (hvo_mode_degraded, doctor, explain)."""
    limits = []
    if mode == "tracepoint" and facts.memmap_counters() is None:
        limits.append("tracepoint mode cannot infer optimize/restore: the kernel has no nr_memmap_pages/"
                      "nr_memmap_boot_pages in /proc/vmstat (6.11+), so optimized pages stay at the "
                      "start-up estimate")
    problem = vmemmap_base_problem(facts)
    if problem:
        limits.append(problem + " (events carry no node)")
    return limits


def best_mode(support: dict[str, ModeSupport]) -> tuple[str | None, str]:
    """The best available mode and why the better ones were passed over."""
    passed = []
    for mode in MODES:
        if support[mode].available:
            why = "; ".join(passed)
            return mode, f"{mode} chosen" + (f" ({why})" if why else "")
        passed.append(f"{mode}: {support[mode].reason}")
    return None, "no probe mode is available: " + "; ".join(passed)
