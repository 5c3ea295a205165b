"""Under ``CI=true`` a test that cannot run fails instead of skipping.

A skip is how a suite stays green while testing nothing: without root, without bcc, without QEMU or
on a kernel without the ``nr_memmap_*`` counters, every kernel test would skip. CI (and a new user's
first run, which runs the same two commands) must see that as red. So under ``CI=true`` every skip and
every xfail, at collection or in any phase of a test, is reported as a failure, except the tests
listed in ALLOWED_SKIPS below, each with the reason it cannot run on these machines.

Loaded by tests/conftest.py; ``-p tests.ci_policy`` loads it into any pytest run.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Generator

import pytest

# Test ids (fnmatch patterns on the node id) that may skip under CI=true -> why they cannot run on
# these machines. Keep it short: every entry is a test that proves nothing in CI.
ALLOWED_SKIPS: dict[str, str] = {}


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def allowed(nodeid: str) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in ALLOWED_SKIPS)


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail(report: pytest.TestReport | pytest.CollectReport, why: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{why}; under CI=true a test that cannot run fails (allowed skips: "
                       f"tests/ci_policy.py ALLOWED_SKIPS)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not ci() or allowed(item.nodeid):
        return
    if hasattr(report, "wasxfail"):
        why = f"xfail: {report.wasxfail or 'no reason given'}"
        del report.wasxfail
        _fail(report, why)
    elif report.skipped:
        _fail(report, f"skipped: {_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if ci() and report.skipped and not allowed(report.nodeid):
        _fail(report, f"skipped at collection: {_reason(report.longrepr)}")
