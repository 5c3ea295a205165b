"""Test launcher: ``python -m tests.extra_catalog run ...`` is ``hvo-observer run ...`` with extra
catalog entries, to see how the daemon copes with probes that cannot be attached.

The entries come from the JSON file named by $HVO_TEST_EXTRA_CATALOG:
``[{"event": "optimize", "kind": "tracepoint", "targets": ["hvo_test:no_such_event"]}, ...]``.
They are resolved exactly as the real catalog is (observer.probes.resolve.resolve_one) by one more
ProbeSet, registered through the documented extension point PROBESET_FACTORIES; an entry that does
not resolve becomes a failed Attachment with the resolver's reason, as a missing kernel symbol would.
Nothing else of the daemon is touched.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observer.errors import ObserverError
from observer.probes.catalog import ProbeSpec
from observer.probes.events import EventType
from observer.probes.probeset import PROBESET_FACTORIES, Attachment, BaseProbeSet, Resolution
from observer.probes.resolve import resolve_one

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

ENV = "HVO_TEST_EXTRA_CATALOG"


def load_specs(path: str) -> list[ProbeSpec]:
    try:
        entries = json.loads(Path(path).read_text())
        # A function entry uses the real handler of its event, so that only the symbol is missing.
        return [ProbeSpec(EventType[e["event"].upper()], e["kind"], tuple(e["targets"]),
                          f"fn_{e['event']}" if e["kind"] == "function" else "test_extra",
                          frozenset(e.get("modes", ("fentry", "kprobe", "tracepoint"))), "test entry")
                for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ObserverError(f"${ENV} {path}: {e}") from None


class ExtraCatalogSet(BaseProbeSet):
    name = "test_extra_catalog"

    def __init__(self, mode: str, facts: KernelFacts, specs: list[ProbeSpec]) -> None:
        self.mode, self.facts, self.specs = mode, facts, specs

    def resolve(self, facts: KernelFacts) -> list[Resolution]:
        return [resolve_one(s, facts, self.mode) for s in self.specs if self.mode in s.modes]

    def bpf_text(self) -> str:
        return ""

    def attach(self, bpf: Any) -> list[Attachment]:
        out = []
        for r in self.resolve(self.facts):
            # Only unresolvable entries are simulated: one that resolves is a misuse of this hook.
            reason = r.reason if not r.ok else f"resolves to {r.target}: this test hook attaches nothing"
            out.append(Attachment(r.spec.event, r.spec.targets[0], self.mode, False, reason))
        return out


def probe_sets(mode: str, facts: KernelFacts) -> list[ExtraCatalogSet]:
    return [ExtraCatalogSet(mode, facts, load_specs(os.environ[ENV]))]


def main() -> int:
    for mode, modules in PROBESET_FACTORIES.items():
        PROBESET_FACTORIES[mode] = (*modules, "tests.extra_catalog")
    from observer.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
