"""The provisionable Grafana dashboard, its provisioning examples, and the PromQL name extraction.

No Grafana is available from Debian, so the dashboard is checked structurally, its queries are parsed
by promtool and evaluated by it over the series the daemon is specified to serve, and their metric
names are compared with the daemon's. The live comparison belongs with the daemon's tests: give a
running daemon's /metrics text to ``tests.promql_names.sample_names_in_exposition`` (names) and
``tests.promtool_check.input_series_from_exposition`` (data) instead of the documented ones here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.promql_names import (
    DASHBOARD,
    DOCUMENTED_SAMPLE_NAMES,
    REPO,
    dashboard,
    dashboard_queries,
    metric_names_in_expr,
    metric_names_in_grafana_query,
    panels,
    sample_names_in_exposition,
)
from tests.promtool_check import (
    find_promtool,
    input_series_from_exposition,
    queries_without_data,
    run_promtool,
)

DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
PROVISIONING = REPO / "exporters" / "grafana" / "provisioning"

BOARD = dashboard()
PANELS = [p for p in panels(BOARD) if p["type"] != "row"]


def variables() -> dict[str, dict]:
    return {var["name"]: var for var in BOARD["templating"]["list"]}


def test_dashboard_identity() -> None:
    assert BOARD["uid"] == "hvo-observer"
    assert BOARD["schemaVersion"] == 39
    assert "id" not in BOARD or BOARD["id"] is None, "a provisioned dashboard must not carry a database id"
    assert "__inputs" not in BOARD, "the data source is a template variable, not an import input"


def test_template_variables() -> None:
    found = variables()
    ds = found["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name, metric in (("instance", "hvo_build_info"), ("hstate", "hvo_hugepages")):
        var = found[name]
        assert var["type"] == "query" and var["datasource"] == DS_REF
        assert var["multi"] and var["includeAll"]
        assert var["query"]["query"] == var["definition"]
        assert re.fullmatch(rf"label_values\({metric}\b.*, {name}\)", var["definition"]), var["definition"]


def test_panel_layout() -> None:
    ids = [p["id"] for p in panels(BOARD)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(BOARD):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_panel_has_queries_on_the_templated_data_source(panel: dict) -> None:
    assert panel.get("description"), "say what the panel shows"
    assert panel["datasource"] == DS_REF
    targets = panel["targets"]
    assert targets, "panel without a query"
    assert len({t["refId"] for t in targets}) == len(targets)
    for target in targets:
        assert target["datasource"] == DS_REF
        assert target["expr"].strip()
        assert 'instance=~"$instance"' in target["expr"], "every query follows the instance selector"


def test_required_views_present() -> None:
    types = {p["type"] for p in PANELS}
    assert {"timeseries", "heatmap", "stat", "state-timeline"} <= types
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    assert 'source="expected"' in exprs and 'source="kernel"' in exprs
    for event in ("optimize", "restore"):
        assert event in exprs
    heatmaps = [p for p in PANELS if p["type"] == "heatmap"]
    assert {re.search(r'op="(\w+)"', p["targets"][0]["expr"])[1] for p in heatmaps} == {"optimize", "restore"}
    for panel in heatmaps:
        (target,) = panel["targets"]
        assert target["format"] == "heatmap" and "sum by (le)" in target["expr"]
        assert "hvo_operation_duration_seconds_bucket" in target["expr"]
        assert panel["options"]["calculate"] is False, "buckets come from the histogram, not Grafana"


def test_queries_use_only_metrics_the_daemon_serves() -> None:
    used: set[str] = set()
    for where, query in dashboard_queries(BOARD):
        names = metric_names_in_grafana_query(query)
        assert names, f"{where}: no metric in {query!r}"
        assert names <= DOCUMENTED_SAMPLE_NAMES, f"{where}: unknown {names - DOCUMENTED_SAMPLE_NAMES}"
        used |= names
    # Histogram _sum/_count add nothing the buckets do not show.
    unused = DOCUMENTED_SAMPLE_NAMES - used
    assert unused == {"hvo_operation_duration_seconds_sum", "hvo_operation_duration_seconds_count"}


def _as_plain_promql(query: str) -> str:
    """A panel query with Grafana's variables replaced as Grafana would for "All" and a 15s scrape."""
    query = query.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".+", query)


PANEL_QUERIES = [_as_plain_promql(t["expr"]) for p in PANELS for t in p["targets"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_promtool()
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (the project setup does)")
    return path


@pytest.mark.prometheus
def test_panel_queries_parse_with_promtool(promtool: str, tmp_path: Path) -> None:
    rules = [{"record": f"panel:q{i}", "expr": expr} for i, expr in enumerate(PANEL_QUERIES)]
    path = tmp_path / "panels.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def documented_exposition() -> str:
    """/metrics as the daemon is specified to serve it (issue 7), made with prometheus_client.

    Every label combination is present, as the daemon pre-initializes its counters. The live variant of
    this test feeds a running daemon's /metrics to the same check instead.
    """
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    reg = CollectorRegistry()
    hstates, nodes = ("2048kB", "1048576kB"), ("0", "1")
    Gauge("hvo_build_info", "", ["version", "kernel", "mode"], registry=reg).labels(
        "0.1.0", "6.18.44", "tracepoint"
    ).set(1)
    pages = Gauge("hvo_hugepages", "", ["hstate", "node"], registry=reg)
    optimized = Gauge("hvo_optimized_hugepages", "", ["hstate", "node"], registry=reg)
    saved = Gauge("hvo_vmemmap_saved_bytes", "", ["source", "hstate", "node"], registry=reg)
    freeable = Gauge("hvo_vmemmap_freeable_pages", "", ["hstate"], registry=reg)
    for hstate, per_page in zip(hstates, (7, 4095), strict=True):
        freeable.labels(hstate).set(per_page)
        for node in nodes:
            pages.labels(hstate, node).set(4)
            optimized.labels(hstate, node).set(4)
            saved.labels("expected", hstate, node).set(4 * per_page * 4096)
    # Totals without hstate/node, next to the per-hstate/node "expected" breakdown.
    saved.labels("expected", "", "").set(8 * (7 + 4095) * 4096)
    saved.labels("kernel", "", "").set(8 * (7 + 4095) * 4096)
    Gauge("hvo_reconcile_drift_bytes", "", registry=reg).set(0)
    events = Counter("hvo_events", "", ["event", "hstate", "result"], registry=reg)
    for event in ("pool_alloc", "pool_free", "optimize", "restore", "demote", "remap_free", "remap_alloc"):
        for hstate in hstates:
            for result in ("ok", "error", "skipped"):
                events.labels(event, hstate, result).inc(3)
    Counter("hvo_events_lost", "", registry=reg).inc(1)
    Counter("hvo_resyncs", "", registry=reg).inc(1)
    duration = Histogram("hvo_operation_duration_seconds", "", ["op", "hstate"], registry=reg)
    for op in ("optimize", "restore"):
        for hstate in hstates:
            duration.labels(op, hstate).observe(0.0004)
    Gauge("hvo_probe_attached", "", ["probe", "mode"], registry=reg).labels(
        "mm_page_alloc", "tracepoint"
    ).set(1)
    Gauge("hvo_hvo_enabled", "", registry=reg).set(1)
    Gauge("hvo_mode_degraded", "", registry=reg).set(0)
    return generate_latest(reg).decode()


def test_documented_exposition_serves_the_documented_names() -> None:
    # prometheus_client adds *_created samples; every documented name must be among the served ones.
    assert sample_names_in_exposition(documented_exposition()) >= DOCUMENTED_SAMPLE_NAMES


@pytest.mark.prometheus
def test_every_panel_query_returns_data(promtool: str) -> None:
    series = input_series_from_exposition(
        documented_exposition(), {"job": "hvo-observer", "instance": "a:9817"}, steps=40
    )
    assert queries_without_data(promtool, PANEL_QUERIES, series, "15s", "10m") == []


@pytest.mark.prometheus
def test_query_data_check_notices_missing_metrics(promtool: str) -> None:
    """Without the daemon's series every panel query must be reported empty (the check has teeth)."""
    series = [{"series": 'up{job="hvo-observer", instance="a:9817"}', "values": "1x40"}]
    assert queries_without_data(promtool, PANEL_QUERIES, series, "15s", "10m") == PANEL_QUERIES


def test_provisioning_examples() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards.yml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    sources = yaml.safe_load((PROVISIONING / "datasources.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"].startswith("http://127.0.0.1:")


def test_dashboard_file_is_stable_json() -> None:
    # Keeps diffs readable: 2-space indentation, as Grafana exports it.
    import json

    assert DASHBOARD.read_text().rstrip("\n") == json.dumps(BOARD, indent=2, ensure_ascii=False)


# --- metric_names_in_expr ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("hvo_hugepages", {"hvo_hugepages"}),
        ('sum without (hstate, node) (hvo_hugepages{node="0"})', {"hvo_hugepages"}),
        ("sum(rate(hvo_events_total[5m])) by (instance, event)", {"hvo_events_total"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(hvo_operation_duration_seconds_bucket"
            '{instance=~"$instance"}[$__rate_interval])))',
            {"hvo_operation_duration_seconds_bucket"},
        ),
        (
            "hvo_hvo_enabled == 0 and on (instance, job) sum without (hstate) (hvo_hugepages) > 0",
            {"hvo_hvo_enabled", "hvo_hugepages"},
        ),
        ("a * on (instance) group_left (mode, kernel) hvo_build_info", {"a", "hvo_build_info"}),
        ("a unless ignoring (result) b offset 1h30m or c @ start()", {"a", "b", "c"}),
        ('{__name__="hvo_resyncs_total", job="x"}', {"hvo_resyncs_total"}),
        (
            "max_over_time(instance:hvo_vmemmap_saved_bytes:sum[1h:5m])",
            {"instance:hvo_vmemmap_saved_bytes:sum"},
        ),
        ('count_values("version", hvo_build_info) > bool 1e-3 + Inf - NaN', {"hvo_build_info"}),
        ('label_replace(up, "host", "$1", "instance", "(.*):.*")', {"up"}),
        ("SUM BY (x) (y)  # comment naming z", {"y"}),
        ("time() - 1", set()),
    ],
)
def test_metric_names_in_expr(expr: str, names: set[str]) -> None:
    assert metric_names_in_expr(expr) == names


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("label_values(hvo_build_info, instance)", {"hvo_build_info"}),
        ('label_values(hvo_hugepages{instance=~"$instance", node="0"}, hstate)', {"hvo_hugepages"}),
        ("label_values(instance)", set()),
        ("query_result(topk(3, hvo_hugepages))", {"hvo_hugepages"}),
        ("hvo_mode_degraded", {"hvo_mode_degraded"}),
    ],
)
def test_metric_names_in_grafana_query(query: str, names: set[str]) -> None:
    assert metric_names_in_grafana_query(query) == names


def test_sample_names_in_exposition() -> None:
    """The helper the live check will use, fed by a real prometheus_client registry."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("hvo_events", "events", ["event"], registry=registry).labels("optimize").inc()
    Histogram("hvo_operation_duration_seconds", "latency", registry=registry).observe(0.1)
    names = sample_names_in_exposition(generate_latest(registry).decode())
    assert {
        "hvo_events_total",
        "hvo_operation_duration_seconds_bucket",
        "hvo_operation_duration_seconds_sum",
        "hvo_operation_duration_seconds_count",
    } <= names
