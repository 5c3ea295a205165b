"""Decide, without loading anything, which catalog entries can be probed on this kernel in a mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from observer.errors import ObserverError
from observer.probes.catalog import CATALOG, ProbeSpec
from observer.probes.probeset import Resolution

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts


def resolve(catalog: tuple[ProbeSpec, ...], facts: KernelFacts, mode: str) -> list[Resolution]:
    """One Resolution per catalog entry that lists ``mode``."""
    return [resolve_one(spec, facts, mode) for spec in catalog if mode in spec.modes]


def resolve_one(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    if spec.kind == "function":
        return _function(spec, facts, mode)
    if spec.kind == "tracepoint":
        return _tracepoint(spec, facts, mode)
    return _counter(spec, facts, mode)


def _function(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    # The function probes' own rules: clones only for return-only handlers, functions newer than
    # the kernel, prototypes checked against BTF.
    from observer.probes.functions import resolve_spec

    return resolve_spec(spec, facts, mode)[0]


def _tracepoint(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    from observer.kernel import tracefs
    from observer.probes.tracepoint import raw_args_problem

    missing: list[str] = []
    for target in spec.targets:
        system, _, name = target.partition(":")
        try:
            if tracefs.event_exists(system, name, facts.root):
                problem = raw_args_problem(facts, target)
                if problem is not None:
                    return Resolution(spec, mode, None, False, problem)
                return Resolution(spec, mode, target, True, "tracepoint exists")
        except ObserverError as e:
            return Resolution(spec, mode, None, False, str(e))
        missing.append(target)
    return Resolution(spec, mode, None, False, "no such tracepoint: " + ", ".join(missing))


def _counter(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    from observer.kernel import sysctl, vmstat

    try:
        counters = vmstat.read_memmap_counters(facts.root)
        hvo_sysctl = sysctl.read_hvo_sysctl(facts.root)
    except ObserverError as e:
        return Resolution(spec, mode, None, False, str(e))
    if counters is None:
        return Resolution(spec, mode, None, False, "no nr_memmap_pages in /proc/vmstat (kernel < 6.11)")
    if hvo_sysctl is None:
        return Resolution(spec, mode, None, False, "no vm.hugetlb_optimize_vmemmap (kernel without HVO)")
    return Resolution(spec, mode, ",".join(spec.targets), True, "inferred from vmemmap counters")


def resolve_all(facts: KernelFacts, mode: str) -> list[Resolution]:
    return resolve(CATALOG, facts, mode)
