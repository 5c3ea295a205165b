"""Every program that the product, the tests and the VM harness run is installed by scripts/setup.

A machine where packages were once installed by hand hides a missing install step: the suite passes
there and fails on a fresh Debian 12 machine. This test reads the code instead of trusting the
machine: it collects the program of every ``subprocess``/``os.exec*`` call and every ``shutil.which``
look-up in observer/, exporters/ and tests/ (statically, with the AST) and of the units' Exec*=
lines, finds the Debian package that ships each program, and requires that package to be in
scripts/setup's PACKAGES or in Debian's required base system (``debootstrap --variant=minbase``).

A call whose program cannot be read from the code (an argv built at run time, a wrapper's
parameter) must say what it runs in a comment on the call: ``# runs: qemu-system-x86_64``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("observer", "exporters", "tests")
SETUP = REPO / "scripts" / "setup"
PATH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
RUNS = re.compile(r"#\s*runs:\s*([^#]+)")
SUBPROCESS_FUNCS = {"run", "Popen", "check_output", "check_call", "call"}


@dataclass(frozen=True)
class Call:
    """A program one line of code runs (``program`` is None when the code does not tell)."""

    where: str
    program: str | None


def _assignments(tree: ast.AST) -> dict[str, list[ast.expr]]:
    """Values bound to each plain name and ``self.<name>`` anywhere in a file (assignments, and the
    items of ``for name in (literal, ...)``)."""
    found: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        pairs: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(node, ast.Assign):
            pairs = [(t, node.value) for t in node.targets]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs = [(node.target, node.value)]
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.List | ast.Tuple):
            pairs = [(node.target, item) for item in node.iter.elts]
        for t, value in pairs:
            if isinstance(t, ast.Name):
                found.setdefault(t.id, []).append(value)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                found.setdefault("self." + t.attr, []).append(value)
    return found


def _imports(tree: ast.AST, path: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Names imported from the repository's own modules: name -> (module file, name there)."""
    found: dict[str, tuple[Path, str]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        parts = (node.module or "").split(".") if node.module else []
        module = (base if node.level else root).joinpath(*parts)
        source = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
        if source.is_file():
            for alias in node.names:
                found[alias.asname or alias.name] = (source, alias.name)
    return found


class _Resolver:
    """What program an argv expression names, following a file's own constants and the constants it
    imports from the repository's modules."""

    def __init__(self, path: Path, root: Path, tree: ast.AST | None = None) -> None:
        self.path, self.root = path, root
        self.tree = tree if tree is not None else ast.parse(path.read_text(), filename=str(path))
        self.values = _assignments(self.tree)
        self.imported = _imports(self.tree, path, root)

    def _named(self, node: ast.expr) -> list[ast.expr] | None:
        if isinstance(node, ast.Name):
            if node.id in self.values:
                return self.values[node.id]
            if node.id in self.imported:
                source, name = self.imported[node.id]
                other = _Resolver(source, self.root)
                values = other.values.get(name)
                # Constants only: a literal needs no further look-up in the other module.
                if values and all(isinstance(v, ast.Constant | ast.List | ast.Tuple) for v in values):
                    return values
            return None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return self.values.get("self." + node.attr)
        return None

    def program(self, node: ast.expr, depth: int = 0) -> set[str] | None:
        """Programs a single string-valued expression may name; None when the code does not tell."""
        if depth > 8:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value.split()[0]} if node.value.strip() else None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys" \
                and node.attr == "executable":
            return {sys.executable}
        if isinstance(node, ast.BoolOp | ast.IfExp):
            parts = node.values if isinstance(node, ast.BoolOp) else [node.body, node.orelse]
            return _union(parts, lambda part: self.program(part, depth + 1))
        if isinstance(node, ast.Call) and _is_which(node) and node.args:
            return self.program(node.args[0], depth + 1)
        wraps_one = isinstance(node, ast.Call) and len(node.args) == 1
        if wraps_one and isinstance(node.func, ast.Name) and node.func.id in ("str", "Path"):
            return self.program(node.args[0], depth + 1)
        named = self._named(node)
        return _union(named, lambda value: self.program(value, depth + 1)) if named else None

    def argv(self, node: ast.expr, depth: int = 0) -> set[str] | None:
        """Programs an argv expression (a list, a tuple, or a name bound to one) may start with."""
        if depth > 8:
            return None
        if isinstance(node, ast.List | ast.Tuple):
            out: set[str] = set()
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    got = self.argv(element.value, depth + 1)
                    if got is None:
                        return None
                    out |= got - {""}
                    if "" not in got:  # the starred part is never empty: it names the program
                        return out
                    continue
                got = self.program(element, depth + 1)
                return None if got is None else out | got
            return out | {""}  # may be empty
        if isinstance(node, ast.IfExp):
            return _union([node.body, node.orelse], lambda part: self.argv(part, depth + 1))
        named = self._named(node)
        if named:
            return _union(named, lambda value: self.argv(value, depth + 1))
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # shell=True command line
            return self.program(node, depth + 1)
        return None


def _union(nodes: Iterable[ast.expr], resolve: Callable[[ast.expr], set[str] | None]) -> set[str] | None:
    """All that ``resolve`` finds in ``nodes``; None when any of them does not tell."""
    out: set[str] = set()
    for node in nodes:
        got = resolve(node)
        if got is None:
            return None
        out |= got
    return out


def _is_which(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "which" and isinstance(f.value, ast.Name) \
        and f.value.id == "shutil"


def _runs_program(call: ast.Call) -> str | None:
    """'argv' for calls whose first argument is an argv, 'program' for ``shutil.which``, else None."""
    f = call.func
    if _is_which(call):
        return "program"
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        if f.value.id == "subprocess" and f.attr in SUBPROCESS_FUNCS:
            return "argv"
        if f.value.id == "os" and (f.attr.startswith("exec") or f.attr.startswith("spawn")):
            return "program"
    return None


def _argv_wrappers(tree: ast.AST) -> dict[str, ast.Call]:
    """Functions of a file that run their ``*args`` as an argv (``def run(*argv): subprocess.run([*argv])``
    or ``[str(a) for a in argv]``): name -> the subprocess call inside. Their callers name the program."""
    found: dict[str, ast.Call] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.args.vararg is None:
            continue
        star = fn.args.vararg.arg
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and _runs_program(node) == "argv" and node.args \
                    and _starts_with(node.args[0], star):
                found[fn.name] = node
    return found


def _program_list_wrappers(tree: ast.AST) -> dict[str, ast.Call]:
    """Functions that look up or run each of their ``*args`` (``def need(*tools): for t in tools:
    shutil.which(t)``): name -> the call inside. Each positional argument of a caller is a program."""
    found: dict[str, ast.Call] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.args.vararg is None:
            continue
        for loop in ast.walk(fn):
            if not (isinstance(loop, ast.For) and isinstance(loop.iter, ast.Name)
                    and loop.iter.id == fn.args.vararg.arg and isinstance(loop.target, ast.Name)):
                continue
            for node in ast.walk(loop):
                if isinstance(node, ast.Call) and _runs_program(node) == "program" and node.args \
                        and isinstance(node.args[0], ast.Name) and node.args[0].id == loop.target.id:
                    found[fn.name] = node
    return found


def _starts_with(argv: ast.expr, name: str) -> bool:
    """Whether an argv expression starts with the items of the variable ``name``."""
    if isinstance(argv, ast.Name):
        return argv.id == name
    if isinstance(argv, ast.ListComp):
        return isinstance(argv.generators[0].iter, ast.Name) and argv.generators[0].iter.id == name
    if isinstance(argv, ast.List | ast.Tuple) and argv.elts:
        first = argv.elts[0]
        return isinstance(first, ast.Starred) and isinstance(first.value, ast.Name) and first.value.id == name
    return False


def program_calls(path: Path, root: Path = REPO) -> list[Call]:
    """The programs that one Python file runs or looks up (``where`` relative to ``root``)."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    resolver = _Resolver(path, root, tree)
    wrappers = _argv_wrappers(tree)
    lists = _program_list_wrappers(tree)
    inside_wrappers = {id(call) for call in (*wrappers.values(), *lists.values())}
    rel = path.relative_to(root)
    calls: list[Call] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside_wrappers:
            continue
        kind = _runs_program(node)
        if kind is None and isinstance(node.func, ast.Name) and node.func.id in (*wrappers, *lists):
            kind = "program"
        if kind is None:
            continue
        where = f"{rel}:{node.lineno}"
        if isinstance(node.func, ast.Name) and node.func.id in lists:
            for arg in node.args:
                got = resolver.program(arg)
                calls += [Call(where, None)] if got is None else [Call(where, p) for p in sorted(got)]
            continue
        span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
        declared = [m.group(1).split() for line in span if (m := RUNS.search(line))]
        if declared:
            calls += [Call(where, p) for names in declared for p in names]
            continue
        arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
        got = None if arg is None else (resolver.argv(arg) if kind == "argv" else resolver.program(arg))
        if got is None:
            calls.append(Call(where, None))
        else:
            calls += [Call(where, p) for p in sorted(got - {""})]
    return calls


def unit_programs(path: Path, root: Path = REPO) -> list[Call]:
    """The programs a systemd unit's Exec*= lines run, except the project's own entry point."""
    calls = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        key, sep, value = line.partition("=")
        if not sep or not key.strip().startswith("Exec") or not value.strip():
            continue
        program = value.strip().lstrip("-+!@:").split()[0]
        if Path(program).name != "hvo-observer":
            calls.append(Call(f"{path.relative_to(root)}:{n}", program))
    return calls


def all_program_calls() -> list[Call]:
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py") if "fixtures" not in p.parts)
    units = sorted((REPO / "systemd").glob("*.service"))
    return [c for f in files for c in program_calls(f)] + [c for u in units for c in unit_programs(u)]


def setup_packages() -> set[str]:
    """The Debian packages in scripts/setup's PACKAGES=(...) array."""
    m = re.search(r"^PACKAGES=\(([^)]*)\)", SETUP.read_text(), re.M)
    assert m, f"{SETUP}: no PACKAGES=(...) line"
    return set(m.group(1).split())


def _executable(program: str) -> Path | None:
    candidates = [Path(program)] if "/" in program else [Path(d) / program for d in PATH_DIRS]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _owner(path: Path) -> str | None:
    """The Debian package that ships ``path`` (merged-/usr aware), or None."""
    names = {str(path), str(path.resolve())}
    for name in list(names):
        for short, long in (("/bin/", "/usr/bin/"), ("/sbin/", "/usr/sbin/"), ("/lib/", "/usr/lib/")):
            if name.startswith(long):
                names.add(short + name[len(long):])
            elif name.startswith(short):
                names.add(long + name[len(short):])
    for name in sorted(names):
        r = subprocess.run(["dpkg-query", "-S", name], capture_output=True, text=True, check=False)
        for line in r.stdout.splitlines():
            pkgs, _, owned = line.partition(": ")
            if owned == name:
                return pkgs.split(",")[0].split(":")[0].strip()
    return None


def _base_system(package: str) -> bool:
    """True for packages every Debian 12 root has: Essential, or Priority required."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Essential} ${Priority}", package], capture_output=True,
                       text=True, check=False)
    return r.returncode == 0 and bool({"yes", "required"} & set(r.stdout.split()))


def problems(calls: list[Call], packages: set[str]) -> list[str]:
    """One line per call whose program setup does not provide."""
    out = []
    venv = Path(sys.prefix)
    for call in calls:
        if call.program is None:
            out.append(f"{call.where}: cannot tell which program this runs: write its argv literally or "
                       f"add a '# runs: PROGRAM' comment")
            continue
        if call.program == sys.executable:
            continue
        exe = _executable(call.program)
        if exe is None:
            out.append(f"{call.where}: {call.program} is not installed: add its Debian package to "
                       f"PACKAGES in scripts/setup")
            continue
        if venv in exe.parents:
            continue  # installed by pip from pyproject.toml
        package = _owner(exe)
        if package is None:
            out.append(f"{call.where}: {exe} belongs to no Debian package: scripts/setup cannot install it")
        elif package not in packages and not _base_system(package):
            out.append(f"{call.where}: {call.program} comes from Debian's {package}, which scripts/setup "
                       f"does not install: add {package} to PACKAGES in scripts/setup")
    return out


def test_the_scanner_reads_argv_literals_constants_and_declarations(tmp_path: Path) -> None:
    src = tmp_path / "sample.py"
    src.write_text(
        "import os, shutil, subprocess, sys\n"
        "TOOL = 'busybox'\n"
        "PRIV = ('setpriv', '--no-new-privs')\n"
        "class T:\n"
        "    def __init__(self):\n"
        "        self.base = ['tmux', '-L', 'x']\n"
        "    def go(self, argv, flag):\n"
        "        subprocess.run(['mount', '-t', 'tmpfs'])\n"
        "        subprocess.Popen([*self.base, 'ls'])\n"
        "        wrap = PRIV if flag else []\n"
        "        subprocess.run([*wrap, sys.executable, '-c', 'pass'])\n"
        "        subprocess.run([shutil.which('depmod') or '/usr/sbin/depmod', '-a'])\n"
        "        shutil.which(TOOL)\n"
        "        subprocess.run(argv)\n"
        "        subprocess.run(argv)  # runs: qemu-system-x86_64\n"
        "        os.execvp('ip', ['ip', 'link'])\n"
        "def run(*argv, **kw):\n"
        "    return subprocess.run([str(a) for a in argv], **kw)\n"
        "run('git', 'clone')\n"
        "run(Path('x') / 'build-deb')  # runs: dpkg-buildpackage\n"
        "def need(*tools):\n"
        "    for tool in tools:\n"
        "        if shutil.which(tool) is None:\n"
        "            raise SystemExit(tool)\n"
        "need('lintian', 'piuparts')\n"
    )
    calls = sorted(((c.program, int(c.where.rsplit(":", 1)[1])) for c in program_calls(src, tmp_path)),
                   key=lambda c: (c[1], c[0] or ""))
    assert calls == [
        ("mount", 8), ("tmux", 9), (sys.executable, 11), ("setpriv", 11), ("/usr/sbin/depmod", 12),
        ("depmod", 12), ("depmod", 12), ("busybox", 13), (None, 14), ("qemu-system-x86_64", 15), ("ip", 16),
        ("git", 19), ("dpkg-buildpackage", 20), ("lintian", 25), ("piuparts", 25),
    ]



def test_unit_exec_lines_name_their_programs(tmp_path: Path) -> None:
    unit = tmp_path / "x.service"
    unit.write_text("[Service]\nExecStartPre=-+/usr/bin/hvo-observer kernel-addresses\n"
                    "ExecStart=/usr/bin/hvo-observer run\nExecReload=/bin/kill -HUP $MAINPID\n"
                    "ExecStopPost=!/usr/sbin/bpftool prog\nEnvironment=X=1\n")
    assert unit_programs(unit, tmp_path) == [Call("x.service:4", "/bin/kill"),
                                             Call("x.service:5", "/usr/sbin/bpftool")]


def test_a_program_setup_does_not_install_is_named_with_its_package() -> None:
    calls = [Call("x.py:1", "/usr/bin/dpkg-deb"), Call("x.py:2", "sh"), Call("x.py:3", "no-such-program-hvo")]
    assert problems(calls, set()) == [
        "x.py:3: no-such-program-hvo is not installed: add its Debian package to PACKAGES in scripts/setup"]
    bpftool = _executable("bpftool")
    assert bpftool is not None, "bpftool is missing: run scripts/setup"
    assert problems([Call("x.py:4", "bpftool")], set()) == [
        "x.py:4: bpftool comes from Debian's bpftool, which scripts/setup does not install: add bpftool to "
        "PACKAGES in scripts/setup"]


def test_setup_installs_every_program_the_code_runs() -> None:
    calls = all_program_calls()
    assert len({c.program for c in calls}) > 10, "the scanner found almost no program calls: is it broken?"
    found = problems(calls, setup_packages())
    assert not found, "programs that scripts/setup does not provide:\n" + "\n".join(found)


@pytest.mark.parametrize("package", sorted(setup_packages()))
def test_every_setup_package_exists_in_debian(package: str) -> None:
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and f"Package: {package}" in r.stdout, f"setup installs {package}: {r.stderr}"
