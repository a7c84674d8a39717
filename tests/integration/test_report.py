"""`ctxflow report` and `ctxflow query --json` as an analyst runs them: from another process, on the chDB a worker
left (no worker answering), over a dataset whose answers are known (tests/support_analytics.py).

The HTML file is looked at the way a person would: headless Chromium draws it with every network request
refused, and the screenshot must hold the charts' colours in quantity.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from ctxflow.schemas.models import TurnEvent
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.report.svg import PALETTE
from ctxflow.streams.report.views import VIEWS
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess, settings_env
from PIL import Image

from tests.support_analytics import seed
from tests.support_browser import screenshot
from tests.support_traffic import publish

CTXFLOW = Path(sys.executable).with_name("ctxflow")


@pytest.fixture(scope="module")
def now() -> dt.datetime:
    """When the dataset is seeded: its events lie a minute and more before it (taken when the module's first
    test starts, not at import, so ingest lag does not grow with the tests collected before this module)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, now: dt.datetime) -> Path:
    """A ctxflow home whose chDB holds the analytics dataset."""
    home = tmp_path_factory.mktemp("analytics")
    seed(home, now)
    return home


def ctxflow(home: Path, *args: str) -> str:
    """Run ``ctxflow ARGS`` on ``home`` with no worker answering; its stdout (it must exit 0)."""
    env = {**os.environ, "CTXFLOW_HOME": str(home), "CTXFLOW_WEB_PORT": str(free_port()), "COLUMNS": "250"}
    done = subprocess.run([str(CTXFLOW), *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def cells(out: str) -> str:
    """The report's text with table rules gone and whitespace runs as one space, to match rows by regex."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘┌┐━─╇╈┳┻┼├┤╋]", " ", out).split())


def test_report_shows_each_view_with_the_numbers_the_data_holds(seeded: Path) -> None:
    out = cells(ctxflow(seeded, "report"))
    # Cost per tenant: runs, observed, estimated, total, then by surface.
    assert "acme 3 $3.90 $0.10 $4.00 $3.70 $0.20 $0.10 $0.00" in out, out
    assert "globex 1 $0.00 $0.25 $0.25 $0.25 $0.00 $0.00 $0.00" in out, out
    # Per agent: the root planner of two workflows, its sub-agent, and globex's all-estimated agent.
    assert "acme planner root 2 2 $3.00 $0.00 $3.00 $1.50" in out, out
    assert "acme researcher sub-agent 1 1 $0.90 $0.10 $1.00 $1.00" in out, out
    assert re.search(r"acme acme-run-1 planner 0 succeeded \$2\.00 observed .* globex globex-run-1 assistant 0 "
                     r"succeeded \$0\.25 estimated", out), out
    # Week over week: acme's cost per run rose by half; globex has no previous week.
    assert re.search(r"\d{4}-\d\d-\d\d acme 2 \$1\.50 \$2\.00 50\.0% 1,000 \+50\.0%", out), out
    assert re.search(r"\d{4}-\d\d-\d\d globex 1 \$0\.25 \$0\.25 100\.0% 1,000 -", out), out
    # Eviction per slot over both tenants: 14 history turns (1,200 tokens) lost 9 items and 670 tokens.
    assert "history 14 1,200 1 1 0 2 9 670 64.3% 55.8%" in out, out
    assert "retrieved 5 1,000 0 0 1 0 1 200 20.0% 20.0%" in out, out
    # Six history readings (evict 0.7, mask 0.61, compress 0.9, swap 0.31, budget 0.9, globex swap 0.3).
    assert "history 6 70.0% 90.0% 90.0% 90.0%" in out and "total 1 5.0% 5.0% 5.0% 5.0%" in out, out
    assert "acme 1 1 4 400 100 4.0x 0.80 0.80 1" in out and "globex 0 1 2 100 20 5.0x 1.00 1.00 0" in out, out
    assert "acme 6 3 1 1 1 50.0% 16.7%" in out and "globex 1 1 0 0 0 100.0% 0.0%" in out, out
    lag = re.search(r"turns 19 ([\d.]+) s [\d.]+ s [\d.]+ s", out)
    assert lag and 60 <= float(lag[1]) < 180, out  # a minute from event to insert, plus the seeding's own time
    for view in VIEWS:
        assert view.title in out or not view.terminal, view.title


def test_report_for_one_tenant_leaves_the_others_out(seeded: Path) -> None:
    out = cells(ctxflow(seeded, "report", "--tenant", "globex"))
    assert "globex 1 1 0 0 0 100.0% 0.0%" in out and "globex 0 1 2 100 20 5.0x 1.00 1.00 0" in out, out
    assert "acme" not in out
    assert "globex 1 $0.00 $0.25 $0.25 $0.25 $0.00 $0.00 $0.00" in out, out
    assert "history 4 200 0 0 0 1 2 80 50.0% 40.0%" in out, out


def test_report_of_an_empty_range_says_no_data_yet(seeded: Path) -> None:
    out = ctxflow(seeded, "report", "--since", "2001-01-01", "--until", "2001-02-01")
    for view in VIEWS:
        assert f"{view.title}: no data yet in this range" in out or not view.terminal, out
    assert "Traceback" not in out


def test_html_report_opens_offline_and_draws_its_charts(seeded: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    out = ctxflow(seeded, "report", "--html", str(page))
    assert f"HTML report: {page.resolve()}" in out
    text = page.read_text()
    assert not re.search(r"(?:src|href)\s*=|url\(|@import|https?://", text, re.I), "the page loads something"
    assert text.count("<svg") >= 5 and "<script" not in text
    png = screenshot(page, tmp_path / "report.png", width=1280, height=2600)
    image = Image.open(png).convert("RGB")
    colours = Counter({rgb: n for n, rgb in image.getcolors(maxcolors=1 << 24)})
    # Each chart draws its first two series in the palette's first two colours: thousands of those pixels mean
    # bars were drawn; an SVG the browser could not draw leaves none (the page is otherwise greys and white).
    for hex_colour in PALETTE[:3]:
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert colours[rgb] > 1500, f"{hex_colour}: {colours[rgb]} pixels"
    assert len(colours) > 200, "a nearly uniform screenshot"


def test_query_json_encodes_timestamps_decimals_uuids_and_bytes(seeded: Path, now: dt.datetime) -> None:
    out = ctxflow(seeded, "query", "--json",
                  "SELECT occurred_at, ingested_at, toDate(occurred_at) AS day, toDecimal64(1.25, 2) AS price, "
                  "toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS id, unhex('ff00') AS raw, "
                  "quantileExact(0.5)(token_count) AS p50, [occurred_at] AS times "
                  "FROM turns WHERE event_id = 'turn-acme-history-0' GROUP BY occurred_at, ingested_at")
    body = json.loads(out)
    assert body["columns"] == ["occurred_at", "ingested_at", "day", "price", "id", "raw", "p50", "times"]
    (row,) = body["rows"]
    at = (now - dt.timedelta(minutes=1)).isoformat()
    assert row == [at, row[1], at[:10], "1.25", "61f0c404-5cb3-11e7-907b-a6006ad3dba0", "ff00", 100, [at]], row
    assert dt.datetime.fromisoformat(row[1]) >= now


def test_report_goes_through_a_running_worker_with_its_parameters(settings: Settings, worker: WorkerProcess) -> None:
    workload = Workload(11, tenants=2, sessions_per_tenant=1, max_events=400)
    events = list(workload.events())
    publish(settings, [*workload.manifests(), *events])
    worker.wait_caught_up()
    tenant = workload.tenants[1].tenant_id
    # The worker holds its chDB: this process cannot open it, so every number below came through /query.
    done = subprocess.run([str(CTXFLOW), "report", "--tenant", tenant, "--since", f"{workload.start:%Y-%m-%d}"],
                          env={**settings_env(settings), "COLUMNS": "250"}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = cells(done.stdout)
    turns = [e for e in events if isinstance(e, TurnEvent) and e.tenant_id == tenant]
    assert re.search(rf"turns {len(turns):,} ", out), out
    for slot, count in Counter(t.slot.value for t in turns).items():
        assert re.search(rf"\b{slot} {count:,} {sum(t.token_count or 0 for t in turns if t.slot.value == slot):,} ",
                         out), (slot, out)
    others = {t.tenant_id for t in workload.tenants} - {tenant}
    assert not any(other in out for other in others), out
