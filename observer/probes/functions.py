"""Function probes of HVO: the fentry/fexit and kprobe/kretprobe ProbeSets.

The catalog (observer/probes/catalog.py, kind "function") lists symbol candidates per event; this
module decides which one to use on the running kernel (``resolve_spec``), generates one small BPF
wrapper per attached symbol around the handlers of bpf/functions.bpf.c, and attaches them.

Rules that keep events exact across kernel generations:
- the first candidate that resolves wins, so a function and the worker it calls are never both
  probed (optimize/restore would be counted twice);
- handlers that read arguments need the exact symbol: a compiler clone (``.isra``/``.constprop``/
  ``.part``) may have had its arguments changed, and fentry attaches by BTF name, which a clone lacks.
  Return-only handlers (the pool allocators) accept clones in kprobe mode;
- struct layout (sizeof(struct page), offsets of page->private, hstate->order, the folio order byte,
  folio->lru) comes from the running kernel's BTF as -D defines, never from headers.

Pool events come either all from these function probes or all from the tracepoint set
(``pool_from_functions``): the tracepoint set keeps its own set of known pool pfns, so a mix would
break it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from observer.bpf_sources import bpf_source
from observer.errors import ObserverError
from observer.probes.catalog import CATALOG, ProbeSpec
from observer.probes.events import EventType
from observer.probes.page_pfn import VMEMMAP_BASE, page_pfn_cflags
from observer.probes.probeset import Attachment, BaseProbeSet, Resolution

if TYPE_CHECKING:
    from observer.kernel.facts import KernelFacts

log = logging.getLogger(__name__)

BPF_SOURCE = bpf_source("functions.bpf.c")
FUNCTION_MODES = ("fentry", "kprobe")
POOL_EVENTS = frozenset({EventType.POOL_ALLOC, EventType.POOL_FREE})
# Without these two the function modes show nothing of HVO itself; the rest is best effort.
CORE_EVENTS = frozenset({EventType.OPTIMIZE, EventType.RESTORE})
# Functions that did not exist before a version: their absence there is no loss of coverage.
INTRODUCED = {
    "only_alloc_fresh_hugetlb_folio": (6, 7),
    "alloc_pool_huge_folio": (6, 7),
    "hugetlb_vmemmap_optimize_folio": (6, 7),
}
HPG_VMEMMAP_OPTIMIZED = 4  # enum hugetlb_page_flags, unchanged since 5.14

# Symbols that only mark a demote in flight (the per-page demote function is inlined there).
DEMOTE_CONTEXTS = ("demote_pool_huge_page", "demote_store")
REMAP_WALKER = "vmemmap_remap_range"
REMAP_PTE_FUNCS = {EventType.REMAP_FREE: "vmemmap_remap_pte", EventType.REMAP_ALLOC: "vmemmap_restore_pte"}
# Every kernel address (not just a symbol name) the probes need: what `hvo-observer kernel-addresses`
# records for a daemon that cannot see addresses (no CAP_SYSLOG).
ADDRESS_SYMBOLS: tuple[str, ...] = (VMEMMAP_BASE, *REMAP_PTE_FUNCS.values())


@dataclass(frozen=True)
class Handler:
    needs_args: bool  # reads arguments: exact symbols only
    default_ret: str = "int"  # return kind when BTF has no prototype: void|int|long|ptr


HANDLERS: dict[str, Handler] = {
    "fn_optimize": Handler(needs_args=True, default_ret="void"),
    "fn_restore": Handler(needs_args=True),
    "fn_remap": Handler(needs_args=True),
    "fn_pool_alloc": Handler(needs_args=False, default_ret="ptr"),  # return value only
    "fn_pool_free": Handler(needs_args=True, default_ret="void"),
    "fn_demote": Handler(needs_args=True),
}


@dataclass(frozen=True)
class Plan:
    """How one resolved symbol is probed: everything the code generator needs."""

    spec: ProbeSpec
    symbol: str
    handler: str
    params: tuple[tuple[str, str], ...]  # from BTF; () when unknown (kprobe on a clone)
    ret: str  # void|int|long|ptr

    @property
    def nargs(self) -> int:
        return len(self.params)

    @property
    def clone(self) -> bool:
        return "." in self.symbol

    @property
    def variant(self) -> str:
        """Which BPF handlers serve this symbol (the catalog handler, refined by the prototype)."""
        if self.handler == "fn_demote":
            if self.symbol in DEMOTE_CONTEXTS:
                return "demote_ctx"
            return "demote_list" if self.nargs == 3 else "demote_one"
        if self.handler == "fn_remap":
            return "remap_range" if self.symbol == REMAP_WALKER else "remap"
        if self.handler == "fn_pool_alloc":
            return "pool_alloc_ret" if self.clone else "pool_alloc"
        return self.handler.removeprefix("fn_")

    @property
    def has_entry(self) -> bool:
        return self.variant != "pool_alloc_ret"


def function_specs(catalog: tuple[ProbeSpec, ...] = CATALOG) -> list[ProbeSpec]:
    return [s for s in catalog if s.kind == "function"]


# --- resolution -------------------------------------------------------------------------------


def resolve_spec(spec: ProbeSpec, facts: KernelFacts, mode: str) -> tuple[Resolution, Plan | None]:
    """Which symbol of ``spec`` to probe in ``mode`` on this kernel, and why (doctor prints it)."""
    handler = HANDLERS.get(spec.handler)
    if handler is None:
        return Resolution(spec, mode, None, False, f"no function handler {spec.handler!r}"), None
    try:
        ksyms = facts.kallsyms
        btf = facts.btf
    except ObserverError as e:
        return Resolution(spec, mode, None, False, str(e)), None
    if btf is None:
        why = "fentry needs BTF" if mode == "fentry" else "struct offsets come from BTF"
        return Resolution(spec, mode, None, False, f"no /sys/kernel/btf/vmlinux ({why})"), None
    tried: list[str] = []
    for name in spec.targets:
        exact = ksyms.has(name)
        clones = ksyms.clones(name)
        if mode == "fentry" and exact and btf.func_id(name) is None:
            tried.append(f"{name}: in kallsyms but not in BTF (fentry attaches by BTF id)")
            continue
        if exact:
            symbol, how = name, "symbol in kallsyms" + (" and BTF" if mode == "fentry" else "")
        elif clones and mode == "fentry":
            tried.append(f"{name}: only the compiler clone {clones[0]} (not in BTF: no fentry)")
            continue
        elif clones and _needs_args(spec, name, handler):
            tried.append(f"{name}: only the compiler clone {clones[0]}, whose arguments may differ")
            continue
        elif clones:
            symbol, how = clones[0], f"compiler clone {clones[0]} of {name} (return value only)"
        else:
            tried.append(f"{name}: not in kallsyms (inlined, or not in this kernel generation)")
            continue
        plan = _plan(spec, name, symbol, handler, facts)
        if isinstance(plan, str):
            tried.append(f"{name}: {plan}")
            continue
        return Resolution(spec, mode, symbol, True, how + _coverage_note(spec, name)), plan
    absent_here = _not_in_generation(spec, facts)
    if absent_here:
        return Resolution(spec, mode, None, True, absent_here), None
    return Resolution(spec, mode, None, False, "; ".join(tried)), None


def _needs_args(spec: ProbeSpec, name: str, handler: Handler) -> bool:
    return handler.needs_args and not (spec.handler == "fn_demote" and name in DEMOTE_CONTEXTS)


def _not_in_generation(spec: ProbeSpec, facts: KernelFacts) -> str | None:
    """Why an unresolved spec costs nothing here: all its functions are newer than the kernel."""
    since = [INTRODUCED.get(name) for name in spec.targets]
    if any(v is None for v in since) or any(tuple(facts.version[:2]) >= v for v in since if v):
        return None
    first = min(v for v in since if v)
    return f"nothing to probe: {', '.join(spec.targets)} appeared in {first[0]}.{first[1]}"


def _plan(spec: ProbeSpec, name: str, symbol: str, handler: Handler, facts: KernelFacts) -> Plan | str:
    """The plan for one candidate, or why it cannot be used."""
    btf = facts.btf
    params = btf.func_params(name) if symbol == name else None
    if params is None and _needs_args(spec, name, handler):
        return "no prototype in BTF to read its arguments by"
    ret = handler.default_ret if params is None else _ret_kind(btf.func_return(name), handler.default_ret)
    plan = Plan(spec, symbol, spec.handler, tuple(params or ()), ret)
    problem = _check_plan(plan)
    if problem is None and plan.variant == "remap_range":
        pte = REMAP_PTE_FUNCS[spec.event]
        if not facts.kallsyms.address(pte):
            problem = f"the address of {pte} (which tells the direction) is not in kallsyms"
    return plan if problem is None else problem


def _ret_kind(text: str | None, default: str) -> str:
    if text is None:
        return default
    if text == "void":
        return "void"
    if text.endswith("*"):
        return "ptr"
    if text in ("long", "long int", "s64", "ssize_t", "long long"):
        return "long"
    return "int"


def _check_plan(plan: Plan) -> str | None:
    """Arguments the handler relies on, checked against the prototype (a changed API is refused)."""
    params = plan.params
    if plan.variant in ("optimize", "restore", "pool_free", "demote_one", "demote_list"):
        if len(params) < 2 or "hstate" not in params[0][1]:
            return f"unexpected prototype {_proto(params)} (want struct hstate *, struct page/folio *, ...)"
        if plan.variant == "demote_list" and "list_head" not in params[2][1]:
            return f"unexpected prototype {_proto(params)} (want src, dst, struct list_head *)"
    if plan.handler == "fn_remap":
        names = [n for n, _ in params]
        if len(params) < 2 or names[:2] != ["start", "end"]:
            return f"unexpected prototype {_proto(params)} (want start, end, ...)"
        if plan.variant == "remap_range" and (len(params) < 3 or "vmemmap_remap_walk" not in params[2][1]):
            return f"unexpected prototype {_proto(params)} (want start, end, struct vmemmap_remap_walk *)"
    if plan.handler == "fn_pool_alloc" and plan.ret != "ptr":
        return f"returns {plan.ret}, not a page/folio pointer"
    return None


def _proto(params: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    return "(" + ", ".join(f"{t} {n}".strip() for n, t in params) + ")"


def _coverage_note(spec: ProbeSpec, name: str) -> str:
    # 6.7+ without the static worker: the batched list functions call the worker inlined, so the
    # single-folio entry point misses pool grows and shrinks.
    if (
        name in ("hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_restore_folio")
        and name != spec.targets[0]
    ):
        return "; the per-folio worker is inlined: batched (hugetlb_vmemmap_*_folios) calls are not seen"
    return ""


def resolve_mode(
    facts: KernelFacts, mode: str, catalog: tuple[ProbeSpec, ...] = CATALOG
) -> list[tuple[Resolution, Plan | None]]:
    return [resolve_spec(s, facts, mode) for s in function_specs(catalog) if mode in s.modes]


def pool_from_functions(resolved: list[tuple[Resolution, Plan | None]]) -> bool:
    """True when every pool spec resolved (or has nothing to probe in this generation)."""
    pool = [(r, p) for r, p in resolved if r.spec.event in POOL_EVENTS]
    planned = {r.spec.event for r, p in pool if p is not None}
    return all(r.ok for r, _ in pool) and planned == POOL_EVENTS


def mode_blockers(resolutions: list[Resolution]) -> list[Resolution]:
    """The unresolved entries that make a function mode pointless (optimize/restore)."""
    return [r for r in resolutions if r.spec.kind == "function" and r.spec.event in CORE_EVENTS and not r.ok]


# --- BPF text ---------------------------------------------------------------------------------


def layout_cflags(facts: KernelFacts) -> list[str]:
    """Struct layout and the vmemmap base as -D defines, from the running kernel's BTF and kallsyms."""
    btf = facts.btf
    if btf is None:
        raise ObserverError(
            "function probes need the kernel's BTF (/sys/kernel/btf/vmlinux) for struct offsets"
        )
    spage = btf.struct_size("page")
    private = btf.member_offset("page", "private")
    horder = btf.member_offset("hstate", "order")
    forder = btf.member_offset("folio", "_folio_order")
    if forder is None:
        forder = btf.member_offset("folio", "_flags_1")  # 6.2+: order in the low byte (little endian)
    if forder is None and spage is not None:
        forder = spage + (btf.member_offset("page", "compound_order") or 0)  # pre-folio: first tail page
    lru = btf.member_offset("folio", "lru")
    if lru is None:
        lru = btf.member_offset("page", "lru")
    missing = [
        n
        for n, v in (
            ("sizeof(struct page)", spage),
            ("page.private", private),
            ("hstate.order", horder),
            ("folio order", forder),
            ("lru", lru),
        )
        if v is None
    ]
    if missing:
        raise ObserverError(f"function probes: BTF of this kernel lacks {', '.join(missing)}")
    bit = btf.enum_value("hugetlb_page_flags", "HPG_vmemmap_optimized")
    flags = [
        f"-DHVO_FN_PRIVATE_OFF={private}",
        f"-DHVO_FN_OPT_BIT={HPG_VMEMMAP_OPTIMIZED if bit is None else bit}",
        f"-DHVO_FN_HORDER_OFF={horder}",
        f"-DHVO_FN_FORDER_OFF={forder}",
        f"-DHVO_FN_LRU_OFF={lru}",
        f"-DHVO_FN_PAGE_SIZE={facts.page_size}",
    ]
    return flags + page_pfn_cflags(facts, spage)


def remap_cflags(facts: KernelFacts, plans: list[Plan]) -> list[str]:
    """Whether optimize can rely on the remap probe, and the addresses of the walk callbacks that
    give vmemmap_remap_range its direction."""
    flags = []
    if any(p.spec.event == EventType.REMAP_FREE for p in plans):
        flags.append("-DHVO_FN_REMAP_FREE_PROBED")
    for plan in plans:
        if plan.variant == "remap_range":
            fn = REMAP_PTE_FUNCS[plan.spec.event]
            macro = (
                "HVO_FN_REMAP_PTE_ADDR"
                if plan.spec.event == EventType.REMAP_FREE
                else "HVO_FN_RESTORE_PTE_ADDR"
            )
            flags.append(f"-D{macro}={facts.kallsyms.address(fn) or 0:#x}ULL")
    return flags


def _arg(mode: str, i: int) -> str:
    return f"PT_REGS_PARM{i + 1}(ctx)" if mode == "kprobe" else f"hvo_fn_arg(ctx, {i})"


def _ret(mode: str, plan: Plan) -> str:
    raw = "PT_REGS_RC(ctx)" if mode == "kprobe" else f"hvo_fn_arg(ctx, {plan.nargs})"
    return {"int": f"(s64)(s32){raw}", "long": f"(s64){raw}", "ptr": f"(u64){raw}"}.get(plan.ret, "0")


def handler_calls(mode: str, plan: Plan, remap_mask: int = 3) -> tuple[str | None, str]:
    """C expressions (entry, exit) calling the handlers of bpf/functions.bpf.c for one symbol."""
    a = lambda i: _arg(mode, i)  # noqa: E731
    ret = _ret(mode, plan)
    v = plan.variant
    if v == "optimize":
        return (
            f"hvo_fn_optimize_enter({a(0)}, {a(1)})",
            f"hvo_fn_optimize_exit(ctx, {ret}, {int(plan.ret != 'void')})",
        )
    if v == "restore":
        return f"hvo_fn_restore_enter({a(0)}, {a(1)})", f"hvo_fn_restore_exit(ctx, {ret})"
    if v == "remap":
        kind = "HVO_REMAP_FREE" if plan.spec.event == EventType.REMAP_FREE else "HVO_REMAP_ALLOC"
        return f"hvo_fn_remap_enter({kind}, {a(0)}, {a(1)})", f"hvo_fn_remap_exit(ctx, {ret})"
    if v == "remap_range":
        return (
            f"hvo_fn_remap_range_enter({a(0)}, {a(1)}, {a(2)}, {remap_mask})",
            f"hvo_fn_remap_exit(ctx, {ret})",
        )
    if v == "pool_alloc":
        return "hvo_fn_pool_alloc_enter()", f"hvo_fn_pool_alloc_exit(ctx, {ret})"
    if v == "pool_alloc_ret":
        return None, f"hvo_fn_pool_alloc_ret(ctx, {ret})"
    if v == "pool_free":
        return f"hvo_fn_pool_free_enter({a(0)}, {a(1)})", "hvo_fn_pool_free_exit(ctx)"
    if v == "demote_list":
        return f"hvo_fn_demote_list_enter({a(0)}, {a(2)})", f"hvo_fn_demote_list_exit(ctx, {ret})"
    if v == "demote_one":
        return f"hvo_fn_demote_enter({a(0)}, {a(1)})", f"hvo_fn_demote_exit(ctx, {ret})"
    if v == "demote_ctx":
        return "hvo_fn_demote_ctx_enter()", "hvo_fn_demote_ctx_exit()"
    raise ValueError(f"unknown handler variant {v}")


def program_names(mode: str, symbol: str, index: int) -> tuple[str, str]:
    """(entry, exit) BPF function names; fentry ones must be bcc's kfunc__/kretfunc__<symbol>."""
    if mode == "fentry":
        return f"kfunc__{symbol}", f"kretfunc__{symbol}"
    return f"hvo_fn_e{index}", f"hvo_fn_x{index}"


def by_symbol(plans: list[Plan]) -> dict[str, list[Plan]]:
    """Plans grouped by symbol: vmemmap_remap_range may serve both remap events with one program."""
    groups: dict[str, list[Plan]] = {}
    for plan in plans:
        groups.setdefault(plan.symbol, []).append(plan)
    return groups


def wrappers(mode: str, plans: list[Plan]) -> str:
    ctx = "struct pt_regs *ctx" if mode == "kprobe" else "unsigned long long *ctx"
    out = []
    for i, (symbol, group) in enumerate(by_symbol(plans).items()):
        plan = group[0]
        mask = sum(1 if p.spec.event == EventType.REMAP_FREE else 2 for p in group)
        entry, exit_ = handler_calls(mode, plan, mask)
        entry_name, exit_name = program_names(mode, symbol, i)
        events = "+".join(p.spec.event.label for p in group)
        out.append(f"/* {events}: {symbol} {_proto(plan.params)} -> {plan.ret} */")
        if entry is not None:
            out.append(f"int {entry_name}({ctx}) {{ return {entry}; }}")
        out.append(f"int {exit_name}({ctx}) {{ return {exit_}; }}")
    return "\n".join(out) + "\n"


# --- the ProbeSet -----------------------------------------------------------------------------


class FunctionProbeSet(BaseProbeSet):
    """fentry/fexit (mode "fentry") or kprobe/kretprobe (mode "kprobe") probes of the catalog."""

    def __init__(
        self,
        mode: str,
        facts: KernelFacts,
        *,
        pool: bool | None = None,
        catalog: tuple[ProbeSpec, ...] = CATALOG,
    ) -> None:
        if mode not in FUNCTION_MODES:
            raise ObserverError(f"function probes support modes {', '.join(FUNCTION_MODES)}, not {mode!r}")
        self.mode = mode
        self.name = f"functions-{mode}"
        self.facts = facts
        self.resolved = resolve_mode(facts, mode, catalog)
        self.pool = pool_from_functions(self.resolved) if pool is None else pool
        self.plans = [
            p for r, p in self.resolved if p is not None and (self.pool or r.spec.event not in POOL_EVENTS)
        ]

    def resolve(self, facts: KernelFacts) -> list[Resolution]:
        if facts is self.facts:
            return [r for r, _ in self.resolved]
        return [r for r, _ in resolve_mode(facts, self.mode)]

    def bpf_text(self) -> str:
        # Inlined, not #included: bcc rewrites map calls (map.lookup() ...) only in the main text.
        regs = "#include <uapi/linux/ptrace.h>\n" if self.mode == "kprobe" else ""  # struct pt_regs
        return regs + BPF_SOURCE.read_text() + "\n" + wrappers(self.mode, self.plans)

    def cflags(self) -> list[str]:
        return layout_cflags(self.facts) + remap_cflags(self.facts, self.plans)

    def attach(self, bpf: Any) -> list[Attachment]:
        out = []
        for i, (symbol, group) in enumerate(by_symbol(self.plans).items()):
            attach = self._attach_fentry if self.mode == "fentry" else self._attach_kprobe
            ok, reason = attach(bpf, symbol, i, group[0].has_entry)
            out.extend(Attachment(p.spec.event, symbol, self.mode, ok, reason) for p in group)
        # An event none of whose entries resolved is unobserved: say so (hvo_probe_attached 0), once.
        # Alternatives that did not resolve while another entry covers the event are no loss; pool
        # events left to the tracepoint set are not ours to report; the remap workers are observed only
        # where the kernel exposes them (inlined in some builds; their direction needs kallsyms
        # addresses, hidden without CAP_SYSLOG unless recorded at start-up: ADDRESS_SYMBOLS), so their
        # absence degrades nothing.
        covered = ({p.spec.event for p in self.plans} | (POOL_EVENTS - self.pool_events())
                   | {EventType.REMAP_FREE, EventType.REMAP_ALLOC})
        for r in self.resolve(self.facts):
            if not r.ok and r.spec.event not in covered:
                out.append(Attachment(r.spec.event, r.spec.targets[0], self.mode, False, r.reason))
                covered.add(r.spec.event)
        return out

    def _attach_kprobe(self, bpf: Any, symbol: str, index: int, has_entry: bool) -> tuple[bool, str]:
        entry, exit_ = program_names("kprobe", symbol, index)
        try:
            if has_entry:
                bpf.attach_kprobe(event=symbol, fn_name=entry)
            # No maxactive: with it bcc writes a kprobe_events text entry, which a SIGKILLed daemon
            # would leave behind; the kprobe PMU (perf_event_open) dies with the process.
            bpf.attach_kretprobe(event=symbol, fn_name=exit_)
        except Exception as e:  # bcc raises bare Exception
            return False, f"attach failed: {e}"
        return True, "kprobe+kretprobe" if has_entry else "kretprobe"

    def _attach_fentry(self, bpf: Any, symbol: str, index: int, has_entry: bool) -> tuple[bool, str]:
        # bcc attaches kfunc__/kretfunc__ programs itself while loading (BPF.__init__ autoload).
        entry, exit_ = program_names("fentry", symbol, index)
        wanted = [exit_, entry] if has_entry else [exit_]
        attached = set(bpf.kfunc_entry_fds) | set(bpf.kfunc_exit_fds)
        missing = [n for n in wanted if n.encode() not in attached]
        if missing:
            return False, f"not attached: {', '.join(missing)}"
        return True, "fentry+fexit" if has_entry else "fexit"

    def pool_events(self) -> frozenset[EventType]:
        return POOL_EVENTS if self.pool else frozenset()


def probe_sets(mode: str, facts: KernelFacts) -> list[Any]:
    """The sets of a function mode: ours, plus the tracepoint set's pool probes when ours cannot
    see every pool allocation and free on this kernel."""
    sets: list[Any] = [FunctionProbeSet(mode, facts)]
    if not sets[0].pool:
        try:
            from observer.probes import tracepoint
        except ImportError:
            log.warning("%s mode: pool events need the tracepoint set, which is not available", mode)
            return sets
        pool_sets = getattr(tracepoint, "pool_probe_sets", None)
        if pool_sets is not None:
            sets.extend(pool_sets(mode, facts))
        else:
            log.warning("%s mode: no pool events (function probes incomplete, no tracepoint pool set)", mode)
    return sets
