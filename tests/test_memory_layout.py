"""Present sections, RAM maps and the calibrated full vmemmap on big-host layouts (sysfs/proc trees).

The trees have the shape of a 2 GiB-block guest (RAM below 4 GiB ending inside a block, offline
blocks, a hot-added DIMM, device memory); their truth is counted here section by section from the
RAM ranges, independently of observer/kernel/memory_blocks.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from observer import geometry
from observer.errors import KernelFactError
from observer.kernel import memory_blocks
from observer.vmemmap_truth import FullVmemmap

GIB = 1 << 30
MIB = 1 << 20
SECTION = 128 * MIB
BLOCK = 2 * GIB
# RAM below 4 GiB ends at 2,688 MiB (max-ram-below-4g), inside block 1 (2-4 GiB); 72 GiB in all.
LOW_END = 2688 * MIB
RAM = [(0x1000, 0x9FBFF), (0x100000, LOW_END - 1), (4 * GIB, 4 * GIB + 72 * GIB - LOW_END - 1)]


def make_tree(root: Path, ram: list[tuple[int, int]], offline: set[int] = frozenset(),
              nodes: int = 2, iomem_extra: str = "", privileged: bool = True) -> None:
    mem = root / "sys/devices/system/memory"
    mem.mkdir(parents=True)
    (mem / "block_size_bytes").write_text(f"{BLOCK:x}\n")
    blocks = sorted({a // BLOCK + i for a, b in ram for i in range((b // BLOCK) - (a // BLOCK) + 1)})
    for i, b in enumerate(blocks):
        (mem / f"memory{b}").mkdir()
        (mem / f"memory{b}/state").write_text("offline\n" if b in offline else "online\n")
        node = root / f"sys/devices/system/node/node{i * nodes // len(blocks)}"
        node.mkdir(parents=True, exist_ok=True)
        (node / f"memory{b}").mkdir()
    lines = ["00000000-00000fff : Reserved"]
    for a, b in ram:
        lines.append(f"{a:08x}-{b:08x} : System RAM" if privileged else "00000000-00000000 : System RAM")
    (root / "proc").mkdir()
    (root / "proc/iomem").write_text("\n".join(lines) + "\n" + iomem_extra)
    fw = root / "sys/firmware/memmap"
    for i, (a, b) in enumerate(ram):
        (fw / str(i)).mkdir(parents=True)
        (fw / f"{i}/start").write_text(f"{a:#x}\n")
        (fw / f"{i}/end").write_text(f"{b:#x}\n")
        (fw / f"{i}/type").write_text("System RAM\n")


def sections_of(ram: list[tuple[int, int]]) -> int:
    """Independent count: sections holding at least one byte of RAM."""
    present = set()
    for a, b in ram:
        s = a
        while s <= b:
            present.add(s // SECTION)
            s = (s // SECTION + 1) * SECTION
    return len(present)


def test_partly_present_block_counts_present_sections(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM)
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert layout.ram_source == "/proc/iomem"
    assert layout.present_sections == sections_of(RAM) == 21 + 555  # 72 GiB - 2,688 MiB above 4 GiB
    # the old formula (online blocks x vmemmap per block) also counts the absent sections of block 1
    # (5 of 16 present) and of the last block (11 of 16): 16 sections, 8,192 pages of phantom savings
    old = layout.online_bytes // 4096 * 64 // 4096
    assert old == 37 * 16 * 512 == 303104
    assert old - geometry.baseline_memmap_pages(layout, 64, 4096) == (11 + 5) * 512
    assert geometry.baseline_memmap_pages(layout, 64, 4096) == sections_of(RAM) * 512


def test_offline_blocks_keep_their_memmap(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM, offline={20, 21})
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert sum(not b.online for b in layout.blocks) == 2
    assert geometry.baseline_memmap_pages(layout, 64, 4096) == sections_of(RAM) * 512


def test_unprivileged_iomem_falls_back_to_the_firmware_map(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM, privileged=False)
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert layout.ram_source == "/sys/firmware/memmap"
    assert layout.present_sections == sections_of(RAM)


def test_iomem_parser_and_device_memory(tmp_path: Path) -> None:
    pmem = "1280000000-137fffffff : Persistent Memory\n  1280000000-137fffffff : namespace0.0\n"
    make_tree(tmp_path, RAM, iomem_extra=pmem + "1400000000-147fffffff : System RAM (kmem)\n")
    ram, device = memory_blocks.parse_iomem((tmp_path / "proc/iomem").read_text())
    assert ram[-1] == (0x1400000000, 0x147FFFFFFF)
    assert [name for _, name in device] == ["Persistent Memory", "namespace0.0"]
    with pytest.raises(KernelFactError, match="malformed /proc/iomem line 2"):
        memory_blocks.parse_iomem("00000000-00000fff : Reserved\ngarbage\n")


def test_hot_add_changes_the_probe_and_the_prediction(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM)
    before = memory_blocks.layout_probe(tmp_path)
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    dimm = (80 * GIB, 81 * GIB - 1)
    (tmp_path / "sys/devices/system/memory/memory40").mkdir()
    (tmp_path / "sys/devices/system/memory/memory40/state").write_text("offline\n")
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write(f"{dimm[0]:x}-{dimm[1]:x} : System RAM\n")
    assert memory_blocks.layout_probe(tmp_path) != before
    added = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert added.change_key() != layout.change_key()
    assert added.present_sections - layout.present_sections == sections_of([dimm]) == 8


def test_calibration_wins_and_unknown_after_a_layout_change(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    make_tree(tmp_path, RAM)
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    truth = FullVmemmap(64, 4096, settle_ns=1000)
    predicted = sections_of(RAM) * 512
    assert truth.full_pages(layout, predicted - 700, False, 0) == predicted  # no calibration yet
    # pools empty, counters 512 pages above the prediction (memory the layout does not show)
    kernel = predicted + 512
    assert truth.full_pages(layout, kernel, True, 0) == predicted  # not yet settled
    with caplog.at_level(logging.WARNING):
        for t in (2000, 3000, 4000):
            assert truth.full_pages(layout, kernel, True, t) == kernel
    assert sum("trusting the kernel" in r.message for r in caplog.records) == 1
    assert truth.full_pages(layout, kernel - 7, False, 5000) == kernel
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write(f"{80 * GIB:x}-{81 * GIB - 1:x} : System RAM\n")
    (tmp_path / "sys/devices/system/memory/memory40").mkdir()
    changed = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert truth.full_pages(changed, kernel + 4096, False, 6000) is None  # not a wrong figure


def test_agreeing_calibration_follows_the_layout(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM)
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    truth = FullVmemmap(64, 4096, settle_ns=0)
    predicted = sections_of(RAM) * 512
    truth.full_pages(layout, predicted, True, 0)
    assert truth.full_pages(layout, predicted, True, 1) == predicted and truth.calibration is not None
    (tmp_path / "sys/devices/system/memory/memory40").mkdir()
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write(f"{80 * GIB:x}-{81 * GIB - 1:x} : System RAM\n")
    added = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert truth.full_pages(added, predicted, False, 2) == predicted + 8 * 512


def test_device_memory_leaves_the_prediction_unknown_until_calibrated(tmp_path: Path) -> None:
    make_tree(tmp_path, RAM, iomem_extra="1280000000-137fffffff : Persistent Memory\n")
    layout = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    truth = FullVmemmap(64, 4096, settle_ns=0)
    assert truth.full_pages(layout, 1, False, 0) is None
    truth.full_pages(layout, 400_000, True, 0)
    assert truth.full_pages(layout, 400_000, True, 1) == 400_000
    # RAM hot-added later: its memmap on top of what the calibration found (device memory included)
    (tmp_path / "sys/devices/system/memory/memory40").mkdir()
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write(f"{80 * GIB:x}-{81 * GIB - 1:x} : System RAM\n")
    added = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert truth.full_pages(added, 1, False, 2) == 400_000 + 8 * 512
    # the device memory changes (a namespace reconfigured): unknown until the pools are empty again
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write("1280000000-137fffffff : Persistent Memory\n  1280000000-137fffffff : namespace0.0\n")
    changed = memory_blocks.read_memory_layout(tmp_path, "x86_64")
    assert truth.full_pages(changed, 1, False, 3) is None


def test_counter_deltas_without_the_hot_added_memmap(tmp_path: Path) -> None:
    from observer.kernel.vmstat import MemmapCounters
    from observer.vmemmap_truth import hotplug_neutral_counters

    make_tree(tmp_path, RAM)
    live = [MemmapCounters(1000, sections_of(RAM) * 512)]
    read = hotplug_neutral_counters(lambda: live[0], tmp_path, 64, 4096)
    assert read() == live[0]
    # a 1 GiB DIMM is hot-added (8 sections: +4,096 memmap pages) while 3 x 2 MiB pages are restored
    (tmp_path / "sys/devices/system/memory/memory40").mkdir()
    with (tmp_path / "proc/iomem").open("a") as f:
        f.write(f"{80 * GIB:x}-{81 * GIB - 1:x} : System RAM\n")
    live[0] = MemmapCounters(1000 + 4096 + 3 * 7, sections_of(RAM) * 512)
    assert read().total - (1000 + sections_of(RAM) * 512) == 3 * 7


# Captured in a Debian 6.12 guest (tests/test_vm_bighost.py): 2 GiB blocks, RAM below 4 GiB ending at
# 2,688 MiB, 2 GiB of memmap= pmem at 70 GiB; empty pools, so the counters are the whole vmemmap.
BIGHOST = Path(__file__).parent / "fixtures/bighost-6.12"


def test_captured_big_host_prediction_equals_the_kernel() -> None:
    from observer.kernel import vmstat

    root = BIGHOST / "calibrate"
    layout = memory_blocks.read_memory_layout(root, "x86_64")
    counters = vmstat.read_memmap_counters(root)
    assert counters is not None and counters.total == 281_088
    assert layout.block_size_bytes == 2 * GIB and {b.node for b in layout.blocks} == {0, 1}
    assert geometry.baseline_memmap_pages(layout, 64, 4096) == counters.total
    assert layout.online_bytes // 4096 * 64 // 4096 - counters.total == 5_632  # main 91c7916's formula
    assert [name for _, name in layout.device_ranges] == ["Persistent Memory (legacy)"]


def test_captured_big_host_after_fsdax_offline_online_and_hot_add() -> None:
    from observer.kernel import vmstat

    before = memory_blocks.read_memory_layout(BIGHOST / "calibrate", "x86_64")
    root = BIGHOST / "hotadded"
    layout = memory_blocks.read_memory_layout(root, "x86_64")
    counters = vmstat.read_memmap_counters(root)
    assert counters is not None
    dimm = (2 * GIB // SECTION) * 512  # a 2 GiB DIMM: 16 sections of 512 memmap pages
    assert geometry.baseline_memmap_pages(layout, 64, 4096) == 281_088 + dimm
    assert counters.total - geometry.baseline_memmap_pages(layout, 64, 4096) == 8_192  # the fsdax memmap
    assert layout.node_of_pfn(72 * GIB // 4096) == 1 and before.node_of_pfn(72 * GIB // 4096) is None
    assert layout.change_key() != before.change_key() and layout.device_key != before.device_key
