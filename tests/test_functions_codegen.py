"""The BPF text and -D defines the function probes generate for the guest kernels (captured facts),
and a real bcc compile of that text with the matching Debian headers (no load: the host kernel has
no kprobes and refuses fentry; loading is tested in the guests, tests/test_vm_probes.py)."""

from __future__ import annotations

import os
import re

import pytest

from observer.probes import functions as F
from observer.probes.page_pfn import DEFAULT_VMEMMAP_BASE
from tests.function_fixtures import RELEASES, load
from tests.vm.kernels import prepare_kernel

BPF_FUNCS = set(re.findall(r"^static __always_inline \w+ (hvo_fn_\w+)\(", F.BPF_SOURCE.read_text(), re.M))


def _defines(flags: list[str]) -> dict[str, str]:
    return dict((f[2:] + "=").split("=")[:2] for f in flags if f.startswith("-D"))


@pytest.mark.parametrize(
    ("kernel", "horder", "forder"), [("6.1", "40", "81"), ("6.12", "40", "64"), ("sid", "32", "64")]
)
def test_layout_defines_come_from_btf(kernel: str, horder: str, forder: str) -> None:
    facts = load(kernel)
    d = _defines(F.FunctionProbeSet("kprobe", facts).cflags())
    assert d["HVO_SPAGE"] == "64" and d["HVO_FN_PRIVATE_OFF"] == "40" and d["HVO_FN_OPT_BIT"] == "4"
    assert d["HVO_FN_HORDER_OFF"] == horder  # struct hstate lost a field in 7.x
    assert d["HVO_FN_FORDER_OFF"] == forder  # 6.1: folio->_folio_order; later the low byte of _flags_1
    assert d["HVO_VMEMMAP_BASE_ADDR"] == f"{facts.kallsyms.address('vmemmap_base'):#x}ULL"
    assert d["HVO_FN_REMAP_PTE_ADDR"] == f"{facts.kallsyms.address('vmemmap_remap_pte'):#x}ULL"
    assert d["HVO_FN_RESTORE_PTE_ADDR"] == f"{facts.kallsyms.address('vmemmap_restore_pte'):#x}ULL"


def test_without_vmemmap_base_the_default_start_is_used() -> None:
    facts = load("6.1")
    del facts.kallsyms.symbols["vmemmap_base"]
    assert _defines(F.layout_cflags(facts))["HVO_VMEMMAP_BASE"] == f"{DEFAULT_VMEMMAP_BASE:#x}ULL"


def test_fentry_wrappers_follow_the_prototypes() -> None:
    text = F.wrappers("fentry", F.FunctionProbeSet("fentry", load("6.1")).plans)
    # void hugetlb_vmemmap_optimize(h, head): no return value to read
    assert "int kfunc__hugetlb_vmemmap_optimize(unsigned long long *ctx) { return hvo_fn_optimize_enter(" \
        "hvo_fn_arg(ctx, 0), hvo_fn_arg(ctx, 1)); }" in text
    assert "hvo_fn_optimize_exit(ctx, 0, 0)" in text
    # int hugetlb_vmemmap_restore(h, head): the return value follows the 2 arguments, as an int
    assert "hvo_fn_restore_exit(ctx, (s64)(s32)hvo_fn_arg(ctx, 2))" in text
    # one program pair serves both remap directions (mask 3)
    assert text.count("kfunc__vmemmap_remap_range(") == 1
    assert "hvo_fn_remap_range_enter(hvo_fn_arg(ctx, 0), hvo_fn_arg(ctx, 1), hvo_fn_arg(ctx, 2), 3)" in text


def test_kprobe_wrappers_use_registers_and_clones_get_a_return_probe_only() -> None:
    ps = F.FunctionProbeSet("kprobe", load("sid"))
    text = F.wrappers("kprobe", ps.plans)
    assert "hvo_fn_optimize_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx))" in text
    assert "hvo_fn_optimize_exit(ctx, (s64)(s32)PT_REGS_RC(ctx), 1)" in text  # 6.7+ worker returns int
    clone = next(p for p in ps.plans if p.symbol == "only_alloc_fresh_hugetlb_folio.isra.0")
    entry, exit_ = F.handler_calls("kprobe", clone)
    assert entry is None and exit_ == "hvo_fn_pool_alloc_ret(ctx, (u64)PT_REGS_RC(ctx))"


@pytest.mark.parametrize("kernel", sorted(RELEASES))
@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_generated_calls_exist_in_the_bpf_source(kernel: str, mode: str) -> None:
    text = F.wrappers(mode, F.FunctionProbeSet(mode, load(kernel)).plans)
    called = set(re.findall(r"\b(hvo_fn_\w+)\(", text)) - {"hvo_fn_arg"} - {
        n for n in re.findall(r"^int (hvo_fn_\w+)\(", text, re.M)
    }
    assert called and called <= BPF_FUNCS, called - BPF_FUNCS


@pytest.mark.parametrize("kernel", sorted(RELEASES))
@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_bcc_compiles_the_text_without_indirect_calls(
    kernel: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compile (bcc + the kernel's Debian headers) without loading; every map call must have been
    rewritten into a helper call: an indirect call (opcode 0x8d) is what the kernel then rejects."""
    bcc = pytest.importorskip("bcc", reason="bcc (Debian's python3-bpfcc) is not importable: scripts/setup")
    # The Debian headers of that kernel's suite, fetched into the VM tests' cache when not there yet.
    tree = prepare_kernel(kernel).headers
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tree))
    ps = F.FunctionProbeSet(mode, load(kernel))
    body = ps.bpf_text()
    if mode == "fentry":  # bcc would load and attach kfunc__ programs while compiling
        body = body.replace("int kfunc__", "int t_kfunc__").replace("int kretfunc__", "int t_kretfunc__")
    common = (F.BPF_SOURCE.parent / "hvo_common.h").read_text()
    common = common.replace('#include "hvo_event.h"', (F.BPF_SOURCE.parent / "hvo_event.h").read_text())
    b = bcc.BPF(text=(common + body).encode(), cflags=[f"-I{F.BPF_SOURCE.parent}", *ps.cflags()])
    try:
        names = re.findall(r"^int (\w+)\(", body, re.M)
        assert len(names) >= 2 * len(F.by_symbol(ps.plans)) - 1
        for name in names:
            code = b.dump_func(name.encode())
            opcodes = code[::8]
            assert 0x8D not in opcodes, f"{name}: indirect call (a map call bcc did not rewrite)"
    finally:
        b.cleanup()
    assert os.environ["BCC_KERNEL_SOURCE"] == str(tree)
