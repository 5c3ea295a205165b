"""Run Debian's promtool from tests, and ask it which queries return no data for a set of metrics.

``queries_without_data`` turns a /metrics exposition (a prometheus_client registry now, a live daemon's
scrape later) into promtool input series and checks each query with ``absent(...)``: a query that
returns nothing for metrics the daemon serves is a panel that would stay empty.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

_GROWING = {"counter", "histogram", "summary"}  # families whose samples only go up


def find_promtool() -> str | None:
    return shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)


def run_promtool(
    promtool: str, *args: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # runs: promtool
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def input_series_from_exposition(text: str, target_labels: Mapping[str, str], steps: int) -> list[dict]:
    """promtool input_series holding each sample of ``text`` for ``steps`` intervals.

    Gauges keep their value; counter and histogram samples grow by their value every interval, so
    rate() and increase() over them are positive where the sample is.
    """
    from prometheus_client.parser import text_string_to_metric_families

    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {**sample.labels, **target_labels}
            selector = ", ".join(f"{name}={json.dumps(value)}" for name, value in sorted(labels.items()))
            value = repr(float(sample.value))
            values = f"0+{value}x{steps}" if family.type in _GROWING else f"{value}x{steps}"
            series.append({"series": f"{sample.name}{{{selector}}}", "values": values})
    return series


def queries_without_data(
    promtool: str, queries: Sequence[str], input_series: list[dict], interval: str, eval_time: str
) -> list[str]:
    """The queries that return no sample at ``eval_time`` over ``input_series``."""
    rules = [{"alert": f"Q{i}", "expr": f"absent({query})"} for i, query in enumerate(queries)]
    test = {
        "rule_files": ["queries.rules.yml"],
        "evaluation_interval": interval,
        "tests": [
            {
                "interval": interval,
                "input_series": input_series,
                "alert_rule_test": [
                    {"eval_time": eval_time, "alertname": rule["alert"], "exp_alerts": []} for rule in rules
                ],
            }
        ],
    }
    with tempfile.TemporaryDirectory(prefix="hvo-promtool-") as tmp:
        Path(tmp, "queries.rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
        Path(tmp, "queries.test.yml").write_text(yaml.safe_dump(test))
        result = run_promtool(promtool, "test", "rules", "queries.test.yml", cwd=Path(tmp))
    if result.returncode == 0:
        return []
    output = result.stdout + result.stderr
    failed = [query for i, query in enumerate(queries) if f"alertname: Q{i}," in output]
    if not failed:
        raise RuntimeError(f"promtool failed without naming a query:\n{output}")
    return failed
