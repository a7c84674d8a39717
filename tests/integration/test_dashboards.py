"""Every Grafana panel's SQL runs on the sink's real schema, over data, as Grafana would send it.

The dashboards' macros and tenant variable are expanded (tests/support_grafana.py) for a range covering the
analytics dataset, once with two tenants selected and once with "All"; the queries run on chDB through the
analyst path (read-only, FINAL) in a subprocess, on the schema ``ensure_schema`` creates (columns ClickHouse
fills at insert included). A panel that names a missing column or table fails with its title.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from ctxflow.streams.report.views import VIEWS

from tests.support_analytics import seed
from tests.support_grafana import dashboards, expand, panel_queries
from tests.support_project import ROOT

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
_RUNNER = """
import json, sys
from ctxflow.sinks.clickhouse import ClickHouseSink
job = json.load(sys.stdin)
sink = ClickHouseSink(job["dsn"])
outcome = {}
try:
    for name, sql in job["queries"].items():
        try:
            outcome[name] = len(sink.query(sql).rows)
        except Exception as exc:
            outcome[name] = str(exc).strip().splitlines()[0][:400]
finally:
    sink.close()
print(json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | str]:
    """Rows (or the error) of every dashboard query, by "file: panel [refId] (selection)"."""
    home = tmp_path_factory.mktemp("dashboards")
    seed(home, NOW)
    queries = {}
    for name, sql in panel_queries(dashboards(ROOT / "dashboards")):
        for label, tenants in (("acme, globex", ["acme", "globex"]), ("All", None)):
            queries[f"{name} ({label})"] = expand(sql, NOW - dt.timedelta(days=30), NOW + dt.timedelta(hours=1), 3600,
                                                  tenants)
    done = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps({
        "dsn": f"chdb://{(home / 'clickhouse').resolve()}", "queries": queries}), cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_panel_query_runs_on_the_real_schema(answers: dict[str, int | str]) -> None:
    failed = {name: outcome for name, outcome in answers.items() if isinstance(outcome, str)}
    assert failed == {}, "\n".join(f"{name}: {error}" for name, error in failed.items())
    assert len(answers) >= 2 * 24


def test_panels_of_the_report_views_find_the_data(answers: dict[str, int | str]) -> None:
    for view in VIEWS:
        if view.dashboard is None:
            continue
        for label in ("acme, globex", "All"):
            rows = answers[f"{view.dashboard}: {view.title} [A] ({label})"]
            assert isinstance(rows, int) and rows > 0, f"{view.title} ({label}): {rows}"
