"""Kernel addresses for a daemon without CAP_SYSLOG: /proc/kallsyms shows it every address as 0, and the
unit's privileged start-up step (``hvo-observer kernel-addresses``) records the few the probes need.

Fixture tree tests/fixtures/hidden-6.1: the captured 6.1 guest kallsyms (tests/fixtures/functions) with
every address zeroed, as a process without CAP_SYSLOG reads it, a boot_id, and the record
run/hvo-observer/kernel-addresses of that boot holding the real addresses. The live tests write a
record on the host as root and read it back under setpriv without CAP_SYSLOG.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from observer.errors import KernelFactError
from observer.kernel.facts import KernelFacts
from observer.kernel.kallsyms import ADDRESSES_FILE, Kallsyms, RecordedAddresses, load_kallsyms, read_boot_id
from observer.probes import functions as F
from tests.function_fixtures import FIXTURES as FUNCTION_FIXTURES
from tests.function_fixtures import RELEASES, FixtureFacts, load

HIDDEN = Path(__file__).parent / "fixtures" / "hidden-6.1"
VISIBLE = Kallsyms.parse((FUNCTION_FIXTURES / RELEASES["6.1"] / "kallsyms").read_text())
RECORD = HIDDEN / ADDRESSES_FILE.lstrip("/")
ENTRY_POINT = Path(sys.executable).parent / "hvo-observer"


def hidden_copy(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(HIDDEN, root)
    return root


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "observer.kernel.kallsyms"]


def facts_with(ks: Kallsyms) -> FixtureFacts:
    """The 6.1 guest's facts (BTF included) with this kallsyms."""
    facts = load("6.1")
    facts.kallsyms = ks
    return facts


def probes(facts: FixtureFacts, mode: str) -> set[tuple[str, str | None, bool]]:
    return {(r.spec.event.label, r.target, r.ok) for r, _ in F.resolve_mode(facts, mode)}


def test_fixture_is_hidden_and_the_record_holds_the_probes_addresses() -> None:
    hidden = Kallsyms.read(HIDDEN)
    assert not hidden.addresses_visible and set(hidden.symbols) == set(VISIBLE.symbols)
    rec = RecordedAddresses.parse(RECORD.read_text(), RECORD)
    assert rec.boot_id == read_boot_id(HIDDEN)
    assert rec.addresses == {n: VISIBLE.address(n) for n in F.ADDRESS_SYMBOLS}


def test_hidden_addresses_are_filled_from_this_boots_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ks = load_kallsyms(HIDDEN)
    for name in F.ADDRESS_SYMBOLS:
        assert ks.address(name) == VISIBLE.address(name) != 0, name
    # Only what was recorded: everything else stays hidden (never guessed).
    assert ks.address("hugetlb_vmemmap_optimize") == 0
    [line] = records(caplog)
    assert line.levelno == logging.INFO and str(RECORD) in line.getMessage()
    assert "vmemmap_base, vmemmap_remap_pte, vmemmap_restore_pte from" in line.getMessage()


def test_one_address_is_filled_from_the_record_without_parsing_all_of_kallsyms() -> None:
    ks = load_kallsyms(HIDDEN, only=("vmemmap_base",))  # what tracepoint mode asks for
    assert ks.symbols == {"vmemmap_base": (VISIBLE.address("vmemmap_base"), "D")}
    assert KernelFacts(root=HIDDEN).kernel_address("vmemmap_base") == VISIBLE.address("vmemmap_base") != 0


@pytest.mark.parametrize("mode", ["kprobe", "fentry"])
def test_filled_addresses_give_the_same_probes_as_root(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    as_root = probes(load("6.1"), mode)
    filled = facts_with(load_kallsyms(HIDDEN))
    assert probes(filled, mode) == as_root
    assert {("remap_free", F.REMAP_WALKER, True), ("remap_alloc", F.REMAP_WALKER, True)} <= as_root
    caplog.set_level(logging.WARNING)
    d = dict((f[2:] + "=").split("=")[:2] for f in F.FunctionProbeSet(mode, filled).cflags())
    assert d["HVO_VMEMMAP_BASE_ADDR"] == f"{VISIBLE.address('vmemmap_base'):#x}ULL"
    assert d["HVO_FN_REMAP_PTE_ADDR"] == f"{VISIBLE.address('vmemmap_remap_pte'):#x}ULL"
    assert d["HVO_FN_RESTORE_PTE_ADDR"] == f"{VISIBLE.address('vmemmap_restore_pte'):#x}ULL"
    assert not [r for r in caplog.records if "no vmemmap_base" in r.getMessage()]


def test_without_a_record_the_remap_probes_and_vmemmap_base_are_missing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What the record fixes: the same hidden kallsyms alone loses the remap probes and vmemmap_base."""
    root = hidden_copy(tmp_path)
    (root / ADDRESSES_FILE.lstrip("/")).unlink()
    caplog.set_level(logging.INFO)
    facts = facts_with(load_kallsyms(root))
    [line] = records(caplog)
    assert line.levelno == logging.WARNING and "there is no" in line.getMessage()
    assert str(root / ADDRESSES_FILE.lstrip("/")) in line.getMessage()
    assert ("remap_free", None, False) in probes(facts, "kprobe")
    F.layout_cflags(facts)
    assert [r for r in caplog.records if "no vmemmap_base in kallsyms" in r.getMessage()]


def test_a_record_from_an_earlier_boot_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = hidden_copy(tmp_path)
    (root / "proc/sys/kernel/random/boot_id").write_text("0b7c1d2e-0000-4000-8000-000000000001\n")
    caplog.set_level(logging.INFO)
    ks = load_kallsyms(root)
    assert all(ks.address(n) == 0 for n in F.ADDRESS_SYMBOLS)
    [line] = records(caplog)
    msg = line.getMessage()
    assert line.levelno == logging.WARNING and "stale" in msg
    assert str(root / ADDRESSES_FILE.lstrip("/")) in msg
    assert "5f0c6a43-2d7e-4b8e-9c1a-6e2f3b4d5a69" in msg and "0b7c1d2e-0000-4000-8000-000000000001" in msg


@pytest.mark.parametrize(("text", "why"), [
    ("", "no boot_id line"),
    ("ffffffffb8c13d50 vmemmap_base\n", "line 1: expected 'boot_id <id>' first"),
    ("boot_id 5f0c6a43-2d7e-4b8e-9c1a-6e2f3b4d5a69\nzzzz vmemmap_base\n", "line 2: expected '<hex address>"),
    ("boot_id 5f0c6a43-2d7e-4b8e-9c1a-6e2f3b4d5a69\nffffffffb8c13d50\n", "line 2: expected '<hex address>"),
    ("\x00\x01binary\n", "line 1: expected 'boot_id <id>' first"),
])
def test_a_malformed_record_is_one_line_naming_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, why: str) -> None:
    root = hidden_copy(tmp_path)
    path = root / ADDRESSES_FILE.lstrip("/")
    path.write_text(text)
    with pytest.raises(KernelFactError, match=f"^malformed {path}: ") as e:
        RecordedAddresses.parse(text, path)
    assert why in str(e.value) and "\n" not in str(e.value)
    caplog.set_level(logging.INFO)
    ks = load_kallsyms(root)  # the daemon goes on without them: no traceback
    assert all(ks.address(n) == 0 for n in F.ADDRESS_SYMBOLS)
    [line] = records(caplog)
    assert line.levelno == logging.WARNING and f"malformed {path}" in line.getMessage()
    assert why in line.getMessage() and "\n" not in line.getMessage() and line.exc_info is None


def test_visible_addresses_are_used_as_they_are(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = hidden_copy(tmp_path)
    shutil.copy(FUNCTION_FIXTURES / RELEASES["6.1"] / "kallsyms", root / "proc/kallsyms")
    (root / ADDRESSES_FILE.lstrip("/")).write_text("not read\n")  # malformed, and never opened
    caplog.set_level(logging.INFO)
    ks = load_kallsyms(root)
    assert ks.symbols == VISIBLE.symbols
    [line] = records(caplog)
    assert line.levelno == logging.INFO and line.getMessage() == "kernel addresses: from /proc/kallsyms"


def test_record_round_trip_and_fill_only_hidden() -> None:
    rec = RecordedAddresses("b", {"vmemmap_base": 0xFFFFFFFFB8C13D50, "gone": 0xFFFFFFFF81000000})
    assert RecordedAddresses.parse(rec.format(), Path("x")) == rec
    ks = Kallsyms.parse("0000000000000000 D vmemmap_base\nffffffff81000010 T visible\n")
    assert ks.fill_hidden({**rec.addresses, "visible": 0xFFFFFFFF81000020}) == ["vmemmap_base"]
    assert ks.address("visible") == 0xFFFFFFFF81000010 and not ks.has("gone")  # only zeros, only known


# --- live: the command on the host, and a reader without CAP_SYSLOG --------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="CAP_SYSLOG (root) is needed to see kernel addresses")
NOT_HIDDEN = "this kernel shows addresses without CAP_SYSLOG (kptr_restrict=0, perf_event_paranoid<=1)"
NO_SYSLOG = ["setpriv", "--bounding-set=-syslog", "--inh-caps=-syslog"]


def cli(*args: str, drop_syslog: bool = False) -> subprocess.CompletedProcess[str]:
    if not ENTRY_POINT.exists():
        pytest.skip(f"{ENTRY_POINT} is missing: install the project (scripts/setup)")
    setpriv = NO_SYSLOG if drop_syslog else []
    return subprocess.run([*setpriv, str(ENTRY_POINT), *args],  # runs: setpriv
                          capture_output=True, text=True, timeout=120, check=False)


def perf_shows_addresses() -> bool:
    """kptr_restrict=0 with perf_event_paranoid<=1 shows addresses to everyone: no hiding to test."""
    return (Path("/proc/sys/kernel/kptr_restrict").read_text().strip() == "0"
            and int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) <= 1)


@pytest.mark.live
@needs_root
def test_command_records_the_hosts_addresses_for_a_reader_without_cap_syslog(tmp_path: Path) -> None:
    if perf_shows_addresses():
        pytest.skip(NOT_HIDDEN)
    out = tmp_path / "kernel-addresses"
    r = cli("kernel-addresses", "--write", str(out))
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    host = Kallsyms.read()
    rec = RecordedAddresses.parse(out.read_text(), out)
    assert rec.boot_id == read_boot_id()
    wanted = (*F.ADDRESS_SYMBOLS, "_text")  # _text: whether the layout is randomized (page_pfn.py)
    assert rec.addresses == {n: host.address(n) for n in wanted if host.has(n)} != {}
    # The daemon's reader, as the unit runs it: no CAP_SYSLOG, so /proc/kallsyms is all zeros.
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
              "from observer.kernel.kallsyms import Kallsyms, load_kallsyms\n"
              "print(Kallsyms.read().addresses_visible)\n"
              f"ks = load_kallsyms(recorded={str(out)!r})\n"
              f"print(*(f'{{n}}={{ks.address(n)}}' for n in {list(rec.addresses)!r}))\n")
    r = subprocess.run([*NO_SYSLOG, sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    visible, line, filled = r.stdout.splitlines()
    assert visible == "False" and f"from {out} (recorded this boot)" in line
    assert filled == " ".join(f"{n}={a}" for n, a in rec.addresses.items())


@pytest.mark.live
@needs_root
def test_command_without_cap_syslog_fails_in_one_line(tmp_path: Path) -> None:
    if perf_shows_addresses():
        pytest.skip(NOT_HIDDEN)
    out = tmp_path / "kernel-addresses"
    r = cli("kernel-addresses", "--write", str(out), drop_syslog=True)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr == ("hvo-observer: /proc/kallsyms shows every address as 0 to this process: run as root "
                        "with CAP_SYSLOG (and kernel.kptr_restrict below 2)\n")


@needs_root
def test_command_unwritable_target_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "kernel-addresses"
    r = cli("kernel-addresses", "--write", str(target))
    assert r.returncode == 2
    assert r.stderr == f"hvo-observer: cannot write {target}: No such file or directory\n"
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
