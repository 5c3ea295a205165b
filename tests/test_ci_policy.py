"""The CI policy: under CI=true skips and xfails fail, outside CI they stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = '''
import pytest

@pytest.fixture
def needs_root():
    pytest.skip("needs root")

def test_skips_in_fixture(needs_root):
    pass

def test_skips_in_body():
    pytest.skip("no qemu")

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False

@pytest.mark.xfail(reason="known bug")
def test_xpasses():
    pass

def test_passes():
    pass
'''


def _run(tmp_path: Path, ci: str | None, *files: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.ci_policy", "-p", "no:cacheprovider",
                           "-q", "--rootdir", str(tmp_path), "-c", os.devnull, *map(str, files)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_under_ci_every_skip_and_xfail_fails(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    skipped_module = tmp_path / "test_skipped_module.py"
    skipped_module.write_text('import pytest\npytest.skip("no bcc", allow_module_level=True)\n')
    r = _run(tmp_path, "true", sample)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("3 failed, 1 passed, 1 error in "), r.stdout
    assert "skipped: needs root; under CI=true a test that cannot run fails" in r.stdout
    assert "skipped: no qemu" in r.stdout and "xfail: known bug" in r.stdout
    r = _run(tmp_path, "true", skipped_module)
    assert r.returncode != 0 and "skipped at collection: no bcc" in r.stdout, r.stdout + r.stderr


def test_outside_ci_skips_stay_skips(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    r = _run(tmp_path, None, sample)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped, 1 xfailed, 1 xpassed" in r.stdout
