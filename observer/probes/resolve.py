"""Decide, without loading anything, which catalog entries can be probed on this kernel in a mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from observer.probes.catalog import CATALOG, ProbeSpec
from observer.probes.functions import resolve_spec
from observer.probes.probeset import Resolution
from observer.probes.tracepoint import resolve_event_spec

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts


def resolve(catalog: tuple[ProbeSpec, ...], facts: KernelFacts, mode: str) -> list[Resolution]:
    """One Resolution per catalog entry that lists ``mode``."""
    return [resolve_one(spec, facts, mode) for spec in catalog if mode in spec.modes]


def resolve_one(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    if spec.kind == "function":
        return _function(spec, facts, mode)
    # tracepoints and the vmemmap counters: the tracepoint set's own rules
    return resolve_event_spec(spec, facts, mode)


def _function(spec: ProbeSpec, facts: KernelFacts, mode: str) -> Resolution:
    # The function probes' own rules: clones only for return-only handlers, functions newer than
    # the kernel, prototypes checked against BTF.
    return resolve_spec(spec, facts, mode)[0]


def resolve_all(facts: KernelFacts, mode: str) -> list[Resolution]:
    return resolve(CATALOG, facts, mode)
