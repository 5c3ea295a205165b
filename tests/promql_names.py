"""Metric names used by PromQL expressions in the rules and the Grafana dashboard.

``metric_names_in_expr`` finds the metric names an expression selects, so tests can compare the rules'
and the dashboard's names with the names the daemon serves: today with ``DOCUMENTED_SAMPLE_NAMES`` (the
names fixed by the issue), and with a live daemon's /metrics through ``sample_names_in_exposition``.

PromQL has no Python parser on Debian and promtool 2.42 cannot print a parse tree, so this is a small
tokenizer: it knows PromQL's syntax well enough to tell metric names from functions, keywords, label
names, durations and Grafana's template variables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "exporters" / "prometheus" / "rules"
DASHBOARD = REPO / "exporters" / "grafana" / "hvo-observer.json"

# Sample names (as they appear in /metrics) fixed by issue 7 for the daemon.
DOCUMENTED_SAMPLE_NAMES: frozenset[str] = frozenset(
    {
        "hvo_build_info",
        "hvo_hugepages",
        "hvo_optimized_hugepages",
        "hvo_vmemmap_freeable_pages",
        "hvo_vmemmap_saved_bytes",
        "hvo_reconcile_drift_bytes",
        "hvo_events_total",
        "hvo_events_lost_total",
        "hvo_resyncs_total",
        "hvo_operation_duration_seconds_bucket",
        "hvo_operation_duration_seconds_sum",
        "hvo_operation_duration_seconds_count",
        "hvo_probe_attached",
        "hvo_hvo_enabled",
        "hvo_mode_degraded",
    }
)

# Series Prometheus makes itself for every target.
PROMETHEUS_SAMPLE_NAMES: frozenset[str] = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
)

_AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
_LABEL_LIST_KEYWORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
_KEYWORDS = frozenset(["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"])

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:[a-zA-Z]\w*)?)
  | (?P<ident>[a-zA-Z_:][\w:]*)
  | (?P<punct>=~|!~|[=!<>]=?|[(){}\[\],@:]|[-+*/%^])
    """,
    re.VERBOSE,
)


class PromQLTokenError(ValueError):
    """The expression has a character the tokenizer does not know."""


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLTokenError(f"cannot read PromQL at offset {pos}: {expr[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            yield kind, match.group()


def metric_names_in_expr(expr: str) -> set[str]:
    """Return the metric names selected by a PromQL expression (Grafana variables allowed).

    Both ``foo{a="b"}`` and ``{__name__="foo"}`` count; label names, functions, aggregations, keywords
    and the contents of ``[...]`` (ranges, subqueries, ``$__rate_interval``) do not.
    """
    tokens = list(_tokens(expr))
    names: set[str] = set()
    depth_brace = depth_bracket = 0
    skip_label_list = False
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":
            depth_bracket += 1
        elif text == "]":
            depth_bracket -= 1
        elif text == "{":
            depth_brace += 1
        elif text == "}":
            depth_brace -= 1
        elif skip_label_list:
            if text == ")":
                skip_label_list = False
        elif depth_bracket or kind != "ident":
            continue
        elif depth_brace:
            # Inside a selector only `__name__ = "name"` names a metric.
            if text == "__name__" and nxt == "=" and i + 2 < len(tokens) and tokens[i + 2][0] == "string":
                names.add(tokens[i + 2][1][1:-1])
        elif text.lower() in _LABEL_LIST_KEYWORDS:
            skip_label_list = nxt == "("
        elif nxt == "(" or text.lower() in _AGGREGATIONS or text.lower() in _KEYWORDS:
            continue  # function call (also `@ start()`), aggregation or keyword
        else:
            names.add(text)
    return names


def metric_names_in_grafana_query(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus query: PromQL, or a template query such as label_values()."""
    match = re.fullmatch(r"\s*label_values\((.*)\)\s*", query, re.DOTALL)
    if match:  # label_values(label) or label_values(selector, label)
        selector, comma, _label = match.group(1).rpartition(",")
        return metric_names_in_expr(selector) if comma else set()
    match = re.fullmatch(r"\s*(?:query_result|series)\((.*)\)\s*", query, re.DOTALL)
    if match:
        return metric_names_in_expr(match.group(1))
    if re.fullmatch(r"\s*(?:label_names|metrics)\(.*\)\s*", query, re.DOTALL):
        return set()
    return metric_names_in_expr(query)


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules(path: Path) -> list[dict]:
    """All rules (alerting and recording) of one rule file, each with its group's name added."""
    import yaml  # only the rule checks need it

    data = yaml.safe_load(path.read_text())
    return [dict(rule, group=group["name"]) for group in data["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for path in rule_files() for rule in rules(path) if "record" in rule}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    """Every panel, including those folded into collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict) -> Iterator[tuple[str, str]]:
    """(where, query) for every panel target and every query-backed template variable."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} ref {target.get('refId')}", target.get("expr", "")
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else query or ""
            yield f"variable {var.get('name')!r}", text


def sample_names_in_exposition(text: str) -> set[str]:
    """Sample names served in a Prometheus text exposition (a live daemon's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
