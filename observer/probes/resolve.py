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
    try:
        ksyms = facts.kallsyms
    except ObserverError as e:
        return Resolution(spec, mode, None, False, str(e))
    btf = None
    if mode == "fentry":
        try:
            btf = facts.btf
        except ObserverError as e:
            return Resolution(spec, mode, None, False, f"fentry needs BTF: {e}")
    tried: list[str] = []
    for name in spec.targets:
        if mode == "fentry":
            # fentry attaches by BTF id: only the exact, non-inlined symbol will do (no .isra clones).
            if ksyms.has(name) and btf.func_id(name) is not None:
                return Resolution(spec, mode, name, True, "symbol in kallsyms and BTF")
            clones = ksyms.clones(name)
            tried.append(f"{name} (clone {clones[0]}: no BTF)" if clones and not ksyms.has(name) else name)
        else:
            sym = ksyms.resolve(name)
            if sym is not None:
                how = "symbol in kallsyms" if sym == name else f"compiler clone of {name}"
                return Resolution(spec, mode, sym, True, how)
            tried.append(name)
    return Resolution(spec, mode, None, False, "no candidate resolves: " + ", ".join(tried))


def _tracepoint(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    from observer.kernel import tracefs

    missing: list[str] = []
    for target in spec.targets:
        system, _, name = target.partition(":")
        try:
            if tracefs.event_exists(system, name, facts.root):
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
