"""What a mode cannot see on a kernel, whatever attaches: each makes the daemon degraded with a reason
(hvo_mode_degraded, doctor, explain). Kernel trees are the host-6.18 fixture with one fact changed:
/proc/kallsyms (vmemmap_base missing, kernel text randomized or not), /proc/config.gz, /proc/vmstat."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from observer import doctor, modes
from observer.kernel.facts import KernelFacts
from observer.probes.session import ProbeSession

HOST = Path(__file__).parent / "fixtures" / "host-6.18"
FIXED_TEXT = 0xFFFFFFFF81000000  # x86-64 kernel text without KASLR
RANDOM_TEXT = 0xFFFFFFFF9A200000


def tree(tmp_path: Path, text: int | None, vmemmap_base: int | None, randomize_memory: bool = True,
         memmap_counters: bool = True) -> KernelFacts:
    root = tmp_path / "root"
    shutil.copytree(HOST, root)
    kallsyms = root / "proc/kallsyms"
    lines = [line for line in kallsyms.read_text().splitlines()
             if line.split()[2:3] not in (["_text"], ["vmemmap_base"])]
    if text is not None:
        lines.append(f"{text:016x} T _text")
    if vmemmap_base is not None:
        lines.append(f"{vmemmap_base:016x} D vmemmap_base")
    kallsyms.write_text("\n".join(lines) + "\n")
    config = gzip.decompress((root / "proc/config.gz").read_bytes()).decode()
    config += "CONFIG_RANDOMIZE_MEMORY=y\n" if randomize_memory else "# CONFIG_RANDOMIZE_MEMORY is not set\n"
    (root / "proc/config.gz").write_bytes(gzip.compress(config.encode()))
    if not memmap_counters:  # a kernel before 6.11
        vmstat = root / "proc/vmstat"
        vmstat.write_text("".join(line + "\n" for line in vmstat.read_text().splitlines()
                                  if not line.startswith("nr_memmap")))
    return KernelFacts(root=root)


def node_map_cflags(facts: KernelFacts) -> list[str]:
    session = ProbeSession("fentry", facts=facts)
    return session._node_cflags()


@pytest.mark.parametrize("mode", ["fentry", "kprobe", "tracepoint"])
def test_unknown_vmemmap_base_on_a_randomized_kernel_degrades_and_publishes_no_node(
        tmp_path: Path, mode: str) -> None:
    facts = tree(tmp_path, text=RANDOM_TEXT, vmemmap_base=None)
    limits = modes.mode_limits(facts, mode)
    assert any("vmemmap_base" in why and "KASLR" in why for why in limits), limits
    assert node_map_cflags(facts) == []  # no pfn->node map: events carry no node rather than a guess


def test_hidden_kernel_text_counts_as_maybe_randomized(tmp_path: Path) -> None:
    facts = tree(tmp_path, text=None, vmemmap_base=None)
    assert any("may randomize" in why for why in modes.mode_limits(facts, "fentry"))


@pytest.mark.parametrize(("text", "base", "randomize"), [
    (FIXED_TEXT, None, True),  # booted without KASLR (direct vmlinux boot): the fixed base is right
    (RANDOM_TEXT, None, False),  # no CONFIG_RANDOMIZE_MEMORY
    (RANDOM_TEXT, 0xFFFFD8C000000000, True),  # the base is known
])
def test_known_or_fixed_vmemmap_base_is_not_degraded(tmp_path: Path, text: int, base: int | None,
                                                     randomize: bool) -> None:
    facts = tree(tmp_path, text=text, vmemmap_base=base, randomize_memory=randomize)
    assert modes.mode_limits(facts, "fentry") == []
    assert any(f.startswith("-DHVO_BLOCK_PFN_SHIFT=") for f in node_map_cflags(facts))


def test_tracepoint_mode_without_memmap_counters_is_degraded(tmp_path: Path) -> None:
    facts = tree(tmp_path, text=FIXED_TEXT, vmemmap_base=None, memmap_counters=False)
    limits = modes.mode_limits(facts, "tracepoint")
    assert len(limits) == 1 and "nr_memmap_pages" in limits[0] and "optimize/restore" in limits[0], limits
    assert modes.mode_limits(facts, "fentry") == []  # the function probes see optimize/restore
    with_counters = tree(tmp_path / "b", text=FIXED_TEXT, vmemmap_base=None)
    assert modes.mode_limits(with_counters, "tracepoint") == []


def test_doctor_names_the_limits(tmp_path: Path) -> None:
    facts = tree(tmp_path, text=RANDOM_TEXT, vmemmap_base=None, memmap_counters=False)
    r = doctor.report(facts)
    r["mode_limits"] = {"tracepoint": modes.mode_limits(facts, "tracepoint")}  # the fixture allows no mode
    text = doctor._human(r)
    assert "tracepoint  degraded: tracepoint mode cannot infer optimize/restore" in text
    assert "degraded: vmemmap_base is unknown" in text


def test_explain_names_the_daemons_degraded_reasons() -> None:
    from observer.commands import explain
    from tests.test_cli_units import FakeFacts, _doc

    why = "tracepoint mode cannot infer optimize/restore: the kernel has no nr_memmap_pages"
    doc = {**_doc(), "degraded": True, "degraded_reasons": [why]}
    [finding] = [f for f in explain.Explainer(doc, FakeFacts()).report()["findings"] if f["id"] == "degraded"]
    assert why in finding["evidence"]


def test_without_nodes_an_hstate_on_several_nodes_is_published_with_node_unknown() -> None:
    """Events without a node (pfns unknown): hvo_optimized_hugepages and the per-node expected savings
    must not split a multi-node hstate by a guessed node; pool sizes per node (sysfs) stay."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from exporters.prometheus.collector import registry
    from observer.bench_workloads import simulated_model
    from observer.model import Runtime

    model = simulated_model(hstates=2, nodes=3)
    model.set_runtime(Runtime("t", "6.18", "fentry", "", True, (), nodes_known=False))
    view = model.view()
    m: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    body = generate_latest(registry(lambda: view, process=False)).decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            m.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    for h in ("2048kB", "1048576kB"):
        optimized = {dict(k)["node"]: n for k, n in m["hvo_optimized_hugepages"].items()
                     if dict(k)["hstate"] == h}
        assert list(optimized) == ["unknown"], optimized
        assert optimized["unknown"] == sum(p.optimized for p in view.pools if p.hstate == h)
        pools = {dict(k)["node"] for k in m["hvo_hugepages"] if dict(k)["hstate"] == h}
        assert pools == {"0", "1", "2"}
    saved = {dict(k).get("node") for k in m["hvo_vmemmap_saved_bytes"]}
    assert saved == {None, "unknown"}


def test_without_nodes_status_and_top_show_no_split_by_node() -> None:
    """The same model through /api/v1/status (the JSON), `status` and `top`: per node the pool
    sizes, the optimized pages and their savings only for the hstate as a whole."""
    from rich.console import Console

    from observer.bench_workloads import simulated_model
    from observer.commands import status, top
    from observer.model import Runtime
    from observer.report import view_to_json

    model = simulated_model(hstates=2, nodes=3)
    model.set_runtime(Runtime("t", "6.18", "fentry", "", True, (), nodes_known=False))
    view = model.view()
    doc = view_to_json(view)
    for h in doc["hstates"]:
        pools = [p for p in view.pools if p.hstate == h["name"]]
        assert h["optimized"] == sum(p.optimized for p in pools) > 0
        assert [(n["node"], n["pages"], n["optimized"], n["expected_saved_bytes"]) for n in h["nodes"]] == \
            [(p.node, p.pages, None, None) for p in pools]
    doc.update(source="daemon", daemon="api.sock", events_available=True, uptime_seconds=60,
               recent_failures=[])
    rows = [line.split() for line in status.human(doc).splitlines()
            if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert len(rows) == 6 and all(r[4] == "?" and "unknown" in r for r in rows), rows
    console = Console(width=160, record=True)
    console.print(top._pools_table(doc))
    table = [line.split() for line in console.export_text().splitlines() if line.split()[:1] == ["2048kB"]]
    assert [r[1] for r in table] == ["0", "1", "2", "all"], table
    assert all(r[5] == "?" for r in table[:3]) and table[3][5] == str(doc["hstates"][0]["optimized"])
