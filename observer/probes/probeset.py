"""The contract between the probe session and the code that contributes BPF programs.

A probe mode ("fentry", "kprobe", "tracepoint") is a list of ``ProbeSet``s. The session
(observer/probes/session.py) asks each one for its BPF source and cflags, compiles everything as
ONE bcc program (so all sets share the maps of bpf/hvo_common.h, which the session includes first),
then calls ``attach(bpf)`` on each. Decoded kernel events are shown to every set (``observe``, which
may retract a candidate), and events a set makes in user space (inferred optimize/restore, verified
candidates) are collected with ``pending``; the session counts those in the aggregates.

Where the sets come from: ``PROBESET_FACTORIES[mode]`` names modules exposing
``probe_sets(mode: str, facts: KernelFacts) -> list[ProbeSet]``.
  - "tracepoint": observer.probes.tracepoint
  - "fentry", "kprobe": observer.probes.functions

Rules for a set's BPF text: return the source itself, do NOT ``#include`` a file that uses bcc map
syntax (``m.lookup()``, ``m.update()``, ``events.ringbuf_output()``): bcc rewrites those only in the
program text, an included file compiles to an invalid indirect call ("unknown opcode 8d"). The
session puts bpf/hvo_common.h inline first (plain-C headers such as hvo_event.h may be included;
``-I bpf/`` is set). Do not define the shared maps (`events`, `counts`, `hist`, `lost`) and
emit every record with ``hvo_emit(ctx, &e)`` after ``hvo_event_init(&e, type, order, pfn)``; prefix
your own maps and functions with the set's name to avoid clashes; no struct access through kernel
headers (take offsets from BTF as -D defines in ``cflags()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from observer.probes.events import Event, EventType

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts
    from observer.probes.catalog import ProbeSpec

MODES: tuple[str, ...] = ("fentry", "kprobe", "tracepoint")

PROBESET_FACTORIES: dict[str, tuple[str, ...]] = {
    "tracepoint": ("observer.probes.tracepoint",),
    "fentry": ("observer.probes.functions",),
    "kprobe": ("observer.probes.functions",),
}


@dataclass(frozen=True, slots=True)
class Resolution:
    """Whether one catalog entry can be probed in one mode on this kernel, and why (doctor prints it)."""

    spec: ProbeSpec
    mode: str
    target: str | None  # the symbol / "system:event" / counter that will be used
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attach attempt made by a ProbeSet."""

    event: EventType
    target: str
    mode: str
    ok: bool
    reason: str


@runtime_checkable
class ProbeSet(Protocol):
    name: str

    def resolve(self, facts: KernelFacts) -> list[Resolution]:
        """What this set would attach to on this kernel (no side effects)."""
        ...

    def bpf_text(self) -> str:
        """BPF C source (bcc). hvo_common.h is already included by the session."""
        ...

    def cflags(self) -> list[str]:
        """Extra -D/-I flags (e.g. BTF offsets, gfp bit values)."""
        ...

    def attach(self, bpf: Any) -> list[Attachment]:
        """Fill own maps, attach own programs to the loaded ``bcc.BPF``; never raise for one failed target."""
        ...

    def observe(self, event: Event) -> bool:
        """Sees every decoded kernel event (of all sets), in order, before it is dispatched.

        Return False to retract an event this set emitted as a mere candidate: the session drops
        it and takes it out of the aggregates (the set may re-emit it later through ``pending``,
        which is how a set defers an event until it is verified).
        """
        ...

    def pending(self, now_ns: int) -> list[Event]:
        """User-space-made events that are due at ``now_ns`` (CLOCK_MONOTONIC); the session counts
        them in the aggregates and dispatches them."""
        ...

    def close(self) -> None:
        """Release user-space resources (BPF detach is the session's job)."""
        ...


class BaseProbeSet:
    """No-op defaults for the optional hooks; subclass it and override what you need."""

    name = "base"

    def cflags(self) -> list[str]:
        return []

    def observe(self, event: Event) -> bool:
        return True

    def pending(self, now_ns: int) -> list[Event]:
        return []

    def close(self) -> None:
        return None
