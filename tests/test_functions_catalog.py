"""Resolution of the function catalog against facts captured from the guest kernels (Debian 6.1,
6.12, sid 7.2): which symbol each event uses per mode, and why the others are refused."""

from __future__ import annotations

import pytest

from observer.kernel.kallsyms import Kallsyms
from observer.probes import functions as F
from observer.probes.catalog import CATALOG, ProbeSpec
from observer.probes.events import EventType
from tests.function_fixtures import FIXTURES, RELEASES, FixtureBtf, FixtureFacts, load

OPT, RES, PA, PF, DEM = (EventType.OPTIMIZE, EventType.RESTORE, EventType.POOL_ALLOC, EventType.POOL_FREE,
                         EventType.DEMOTE)  # fmt: skip

# 6.7+: the per-folio worker, and the single-folio entry point around it (7.x reaches the worker's
# body from there through a .part clone)
FOLIO_OPT = ["__hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize_folio"]
# kernel -> mode -> event -> targets chosen (one per catalog entry of that event; None: nothing to probe)
EXPECTED = {
    "6.1": {
        "fentry": {OPT: ["hugetlb_vmemmap_optimize", None], RES: ["hugetlb_vmemmap_restore"],
                   PA: [None, "alloc_fresh_huge_page"], PF: ["update_and_free_page"], DEM: ["demote_store"]},
        "kprobe": {OPT: ["hugetlb_vmemmap_optimize", None], RES: ["hugetlb_vmemmap_restore"],
                   PA: [None, "alloc_fresh_huge_page"], PF: ["update_and_free_page"], DEM: ["demote_store"]},
    },
    "6.12": {
        "fentry": {OPT: FOLIO_OPT, RES: ["__hugetlb_vmemmap_restore_folio"],
                   PA: ["alloc_pool_huge_folio", "alloc_fresh_hugetlb_folio"],
                   PF: ["__update_and_free_hugetlb_folio"], DEM: ["demote_store"]},
        "kprobe": {OPT: FOLIO_OPT, RES: ["__hugetlb_vmemmap_restore_folio"],
                   PA: ["alloc_pool_huge_folio", "alloc_fresh_hugetlb_folio"],
                   PF: ["__update_and_free_hugetlb_folio"], DEM: ["demote_store"]},
    },
    "sid": {
        "fentry": {OPT: FOLIO_OPT, RES: ["__hugetlb_vmemmap_restore_folio"],
                   PA: ["alloc_pool_huge_folio", "alloc_surplus_hugetlb_folio"],
                   PF: ["__update_and_free_hugetlb_folio"], DEM: ["demote_pool_huge_page"]},
        "kprobe": {OPT: FOLIO_OPT, RES: ["__hugetlb_vmemmap_restore_folio"],
                   PA: ["only_alloc_fresh_hugetlb_folio.isra.0", "alloc_surplus_hugetlb_folio"],
                   PF: ["__update_and_free_hugetlb_folio"], DEM: ["demote_pool_huge_page"]},
    },
}  # fmt: skip


@pytest.mark.parametrize("kernel", sorted(EXPECTED))
@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_resolution_per_generation(kernel: str, mode: str) -> None:
    resolved = F.resolve_mode(load(kernel), mode)
    got: dict[EventType, list[str | None]] = {}
    for r, plan in resolved:
        assert r.ok, f"{r.spec.event.label}: {r.reason}"
        assert (plan is None) == (r.target is None)
        got.setdefault(r.spec.event, []).append(r.target)
    for event, targets in EXPECTED[kernel][mode].items():
        assert got[event] == targets, event.label
    # the remap workers are inlined in all three builds: both directions share the walker
    assert got[EventType.REMAP_FREE] == got[EventType.REMAP_ALLOC] == ["vmemmap_remap_range"]
    assert F.pool_from_functions(resolved)


def test_generation_too_old_for_a_function_is_no_gap() -> None:
    r, plan = F.resolve_spec(_spec(PA, "fn_pool_alloc"), load("6.1"), "kprobe")
    assert r.ok and plan is None and "appeared in 6.7" in r.reason


def test_clone_refused_where_arguments_are_read() -> None:
    text = "ffffffff81000000 t hugetlb_vmemmap_optimize.isra.0\nffffffff81000100 T hugetlb_vmemmap_restore\n"
    facts = load("6.1", kallsyms_text=text)
    for mode, why in (("kprobe", "arguments may differ"), ("fentry", "not in BTF")):
        r, plan = F.resolve_spec(_spec(OPT, "fn_optimize"), facts, mode)
        assert not r.ok and plan is None
        assert "hugetlb_vmemmap_optimize.isra.0" in r.reason and why in r.reason, r.reason


def test_return_only_handler_takes_a_clone_in_kprobe_mode_only() -> None:
    facts = load("sid")
    spec = next(s for s in CATALOG if s.targets[0] == "only_alloc_fresh_hugetlb_folio")
    r, plan = F.resolve_spec(spec, facts, "kprobe")
    assert plan is not None and plan.variant == "pool_alloc_ret" and not plan.has_entry
    r, plan = F.resolve_spec(spec, facts, "fentry")  # the clone has no BTF: the next candidate
    assert r.ok and r.target == "alloc_pool_huge_folio"
    assert plan is not None and plan.variant == "pool_alloc" and plan.has_entry


def test_unresolved_entry_names_every_candidate() -> None:
    facts = load("6.12", kallsyms_text="ffffffff81000000 T vfs_read\n")
    r, _ = F.resolve_spec(_spec(RES, "fn_restore"), facts, "kprobe")
    assert not r.ok
    for name in _spec(RES, "fn_restore").targets:
        assert name in r.reason
    assert F.mode_blockers([r]) == [r]


def test_missing_pool_function_hands_pool_events_to_the_tracepoints() -> None:
    text = (FIXTURES / RELEASES["sid"] / "kallsyms").read_text()
    text = "\n".join(ln for ln in text.splitlines() if "alloc_surplus_hugetlb_folio" not in ln)
    resolved = F.resolve_mode(load("sid", kallsyms_text=text), "fentry")
    assert not F.pool_from_functions(resolved)
    ps = F.FunctionProbeSet("fentry", load("sid", kallsyms_text=text))
    assert not ps.pool and not {p.spec.event for p in ps.plans} & F.POOL_EVENTS


def test_prototype_mismatch_is_refused() -> None:
    facts = load("6.1")
    facts.btf.data["funcs"]["hugetlb_vmemmap_optimize"]["params"] = [["folio", "struct folio *"]]
    r, plan = F.resolve_spec(_spec(OPT, "fn_optimize"), facts, "fentry")
    assert not r.ok and plan is None and "unexpected prototype" in r.reason


def _spec(event: EventType, handler: str) -> ProbeSpec:
    return next(s for s in CATALOG if s.event == event and s.handler == handler and s.kind == "function")


# Older generations, not bootable here: synthetic facts from the prototypes in the kernel sources
# (/work/shared/notes/kernel-hvo.md), to pin which candidate each generation gets.
H, P, F_ = ("h", "struct hstate *"), ("head", "struct page *"), ("folio", "struct folio *")
SYNTHETIC = {
    "5.15.0": {
        "free_huge_page_vmemmap": ([H, P], "void"), "alloc_huge_page_vmemmap": ([H, P], "int"),
        "vmemmap_remap_free": ([("start", "long unsigned int"), ("end", "long unsigned int"),
                                ("reuse", "long unsigned int")], "int"),
        "alloc_fresh_huge_page": ([H, ("gfp_mask", "gfp_t")], "struct page *"),
        "__update_and_free_page": ([H, P], "void"),
    },
    "6.6.0": {
        "hugetlb_vmemmap_optimize": ([H, P], "void"), "hugetlb_vmemmap_restore": ([H, P], "int"),
        "alloc_fresh_hugetlb_folio": ([H, ("gfp_mask", "gfp_t")], "struct folio *"),
        "__update_and_free_hugetlb_folio": ([H, F_], "void"),
        "demote_free_hugetlb_folio": ([H, F_], "int"),
    },
    "6.11.0": {
        "__hugetlb_vmemmap_optimize_folio": ([H, F_, ("vmemmap_pages", "struct list_head *")], "int"),
        "__hugetlb_vmemmap_restore_folio": ([H, F_, ("flags", "long unsigned int")], "int"),
        "demote_free_hugetlb_folios": ([("src", "struct hstate *"), ("dst", "struct hstate *"),
                                        ("src_list", "struct list_head *")], "long int"),
    },
}  # fmt: skip


def _synthetic(release: str) -> FixtureFacts:
    funcs = SYNTHETIC[release]
    text = "".join(f"ffffffff8100{i:04x} t {name}\n" for i, name in enumerate(funcs))
    data = {"funcs": {n: {"params": p, "ret": r} for n, (p, r) in funcs.items()}, "structs": {}, "enums": {}}
    return FixtureFacts(release, Kallsyms.parse(text), FixtureBtf(data))


@pytest.mark.parametrize(
    ("release", "event", "target", "variant"),
    [
        ("5.15.0", OPT, "free_huge_page_vmemmap", "optimize"),
        ("5.15.0", RES, "alloc_huge_page_vmemmap", "restore"),
        ("5.15.0", EventType.REMAP_FREE, "vmemmap_remap_free", "remap"),
        ("5.15.0", PF, "__update_and_free_page", "pool_free"),
        ("6.6.0", OPT, "hugetlb_vmemmap_optimize", "optimize"),
        ("6.6.0", DEM, "demote_free_hugetlb_folio", "demote_one"),
        ("6.6.0", PF, "__update_and_free_hugetlb_folio", "pool_free"),
        ("6.11.0", OPT, "__hugetlb_vmemmap_optimize_folio", "optimize"),
        ("6.11.0", DEM, "demote_free_hugetlb_folios", "demote_list"),
    ],
)
def test_older_generations(release: str, event: EventType, target: str, variant: str) -> None:
    facts = _synthetic(release)
    for mode in ("fentry", "kprobe"):
        resolved = [(r, p) for r, p in F.resolve_mode(facts, mode) if r.spec.event == event]
        chosen = [(r.target, p.variant) for r, p in resolved if p is not None]
        assert (target, variant) in chosen, resolved
