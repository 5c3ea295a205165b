"""The Prometheus rules, their promtool unit tests and the example scrape configuration.

Runs Debian's real promtool (package `prometheus`, 2.42 on bookworm). A missing promtool is a failure,
not a skip: the project's setup installs it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.promql_names import (
    DOCUMENTED_SAMPLE_NAMES,
    PROMETHEUS_SAMPLE_NAMES,
    REPO,
    RULES_DIR,
    metric_names_in_expr,
    recorded_names,
    rule_files,
    rules,
)
from tests.promtool_check import find_promtool, run_promtool

pytestmark = pytest.mark.prometheus

PROM_DIR = REPO / "exporters" / "prometheus"
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.test.yml"))
HOST_RULES = RULES_DIR / "hvo-observer.rules.yml"
FLEET_RULES = RULES_DIR / "hvo-observer-fleet.rules.yml"
SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_promtool()
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (the project setup does)")
    return path


def all_rules() -> list[dict]:
    return [rule for path in rule_files() for rule in rules(path)]


def alerts() -> list[dict]:
    return [rule for rule in all_rules() if "alert" in rule]


def unit_test_cases() -> list[dict]:
    return [case for path in UNIT_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


def test_rule_files_exist() -> None:
    assert [p.name for p in rule_files()] == [FLEET_RULES.name, HOST_RULES.name]
    assert len(UNIT_TESTS) >= 3, UNIT_TESTS


def test_promtool_check_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", *rule_files())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_scrape_config_example_is_valid(promtool: str) -> None:
    # Also checks the two rule files it loads, by their paths relative to the example.
    result = run_promtool(promtool, "check", "config", PROM_DIR / "scrape-config.example.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROM_DIR / "scrape-config.example.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "hvo-observer"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9817"]
    assert sorted(config["rule_files"]) == sorted(f"rules/{p.name}" for p in rule_files())


def test_required_alerts_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alerts()}
    assert set(exprs) == {
        "HvoObserverDown",
        "HvoObserverAbsent",
        "HvoVmemmapDriftPersistent",
        "HvoVmemmapRestoreFailed",
        "HvoProbeDetached",
        "HvoModeDegraded",
        "HvoEventsLost",
        "HvoDisabledWithHugepages",
    }
    assert 'up{job="hvo-observer"} == 0' in exprs["HvoObserverDown"]
    assert 'absent(up{job="hvo-observer"})' in exprs["HvoObserverAbsent"]
    assert 'event="restore", result="error"' in exprs["HvoVmemmapRestoreFailed"]


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_alert_labels_and_annotations(alert: dict) -> None:
    assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    assert {"summary", "description", "runbook"} <= set(annotations)
    assert re.search(r"`hvo-observer (explain|doctor)`", annotations["runbook"]), annotations["runbook"]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in unit_test_cases():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown not firing"


def test_every_recording_rule_is_unit_tested() -> None:
    """A rule counts as tested when a test queries it or a tested rule is computed from it."""
    exprs = {rule["record"]: rule["expr"] for rule in all_rules() if "record" in rule}
    covered = {
        name
        for case in unit_test_cases()
        for check in case.get("promql_expr_test", [])
        for name in metric_names_in_expr(check["expr"])
    }
    frontier = covered & set(exprs)
    while frontier:
        found = set().union(*(metric_names_in_expr(exprs[name]) for name in frontier)) - covered
        covered |= found
        frontier = found & set(exprs)
    assert set(exprs) - covered == set()


RECORD_NAME = re.compile(r"^(?P<level>[a-z]+(?:_[a-z]+)*):(?P<metric>hvo_[a-z0-9_]+):(?P<ops>[a-z0-9_]+)$")


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_recording_rules_follow_naming_and_keep_labels(path: Path) -> None:
    for rule in rules(path):
        # `by (...)` would drop job, cluster and other target/external labels on a global Prometheus.
        assert not re.search(r"\bby\s*\(", rule["expr"]), (
            f"{rule.get('record') or rule['alert']}: use without()"
        )
        if "record" not in rule:
            continue
        match = RECORD_NAME.match(rule["record"])
        assert match, f"{rule['record']}: not level:metric:operations"
        per_host = match["level"].startswith("instance")
        assert per_host == (path == HOST_RULES), f"{rule['record']}: level does not fit {path.name}"
        if path == FLEET_RULES and re.search(r"(?<![\w:])sum\b", rule["expr"]):
            assert "sum without (instance)" in rule["expr"], rule["record"]


def test_rules_use_only_known_metric_names() -> None:
    known = DOCUMENTED_SAMPLE_NAMES | PROMETHEUS_SAMPLE_NAMES | recorded_names()
    used = {name for rule in all_rules() for name in metric_names_in_expr(rule["expr"])}
    assert used - known == set()
    assert used & DOCUMENTED_SAMPLE_NAMES, "no daemon metric found: metric_names_in_expr is broken"


# Deliberate bugs that the promtool unit tests must catch: each is (rule file, text, replacement).
MUTATIONS = {
    "drift alert holds too briefly": (
        HOST_RULES,
        "hvo_reconcile_drift_bytes != 0\n        for: 10m",
        "hvo_reconcile_drift_bytes != 0\n        for: 1m",
    ),
    "first restore failure missed": (
        HOST_RULES,
        'result="error"} offset 15m',
        'result="error"} offset 1m',
    ),
    "disabled alert fires on empty pools": (HOST_RULES, "(hvo_hugepages) > 0", "(hvo_hugepages) >= 0"),
    "unlabelled expected total counted twice": (
        HOST_RULES,
        'sum without (hstate, node) (hvo_vmemmap_saved_bytes{source="expected", hstate!=""})\n',
        'sum without (hstate, node) (hvo_vmemmap_saved_bytes{source="expected"})\n',
    ),
    "fleet sum drops external labels": (
        FLEET_RULES,
        "sum without (instance) (instance_hstate:hvo_hugepages:sum)",
        "sum by (job, hstate) (instance_hstate:hvo_hugepages:sum)",
    ),
    "fleet ratio averaged over hosts": (
        FLEET_RULES,
        "hstate_event:hvo_events_errors:rate5m / (hstate_event:hvo_events:rate5m > 0)",
        "avg without (instance) (instance_hstate_event:hvo_events_errors_per_events:ratio_rate5m)",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=str)
def test_unit_tests_catch_mutation(promtool: str, tmp_path: Path, mutation: str) -> None:
    target, text, replacement = MUTATIONS[mutation]
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    shutil.copytree(PROM_DIR / "tests", tmp_path / "tests")
    mutated = tmp_path / "rules" / target.name
    source = mutated.read_text()
    assert source.count(text) == 1, f"mutation {mutation!r} no longer applies to {target.name}"
    mutated.write_text(source.replace(text, replacement))
    assert run_promtool(promtool, "check", "rules", mutated).returncode == 0, "mutation must stay valid"
    result = run_promtool(promtool, "test", "rules", *sorted((tmp_path / "tests").glob("*.test.yml")))
    assert result.returncode != 0, f"unit tests did not notice: {mutation}"
    assert "FAILED" in result.stdout + result.stderr
