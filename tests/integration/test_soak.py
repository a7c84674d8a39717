"""``ctxflow soak`` at its smallest: a line per period, ``soak-results.json`` with every figure the issue asks
for, everything published committed and the totals equal to what was published, and nothing left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ctxflow.streams.stack.processes import pid_alive

CTXFLOW = Path(sys.executable).with_name("ctxflow")
REQUIRED = {"minutes", "rate_eps", "committed_ratio", "max_lag_s", "worker_rss_growth", "series", "published",
            "committed", "target_met", "broke_at_minute", "git_sha", "killed_worker_at", "totals_match"}
PER_MINUTE = {"minute", "published", "published_in_minute", "committed", "committed_in_minute", "lag_records",
              "lag_s", "p99_ms", "worker_rss_mb", "worker_cpu_cores", "broker_rss_mb", "broker_cpu_cores"}


#: Seconds per reported period: three of them show the per-period line and series; the figures a period holds
#: (one decision probe per second, the records published in it) scale with it, and 6 s keeps them meaningful.
PERIOD_S = 6


@pytest.mark.timeout(150)
def test_soak_reports_every_period_and_commits_everything_it_published(tmp_path: Path) -> None:
    soak = subprocess.run([str(CTXFLOW), "--home", "state", "soak", "--minutes", "3", "--interval-s", str(PERIOD_S),
                           "--rate", "300"], cwd=tmp_path, capture_output=True, text=True, timeout=140,
                          env={**os.environ, "COLUMNS": "200"})
    out = soak.stdout + soak.stderr
    results = json.loads((tmp_path / "soak-results.json").read_text())

    assert results.keys() >= REQUIRED, out
    assert soak.returncode == (0 if results["target_met"] else 1), out
    assert results["verdict"] in out
    # Everything published reached the worker's committed offsets, and the budget holds exactly what was sent.
    assert results["committed_ratio"] == 1.0 and results["committed"] == results["published"] > 2_000, out
    assert results["totals_match"] is True, results["totals_problems"]
    assert [m["minute"] for m in results["series"]] == [1, 2, 3]
    for minute in results["series"]:
        assert minute.keys() >= PER_MINUTE
        assert f"min {minute['minute']:>3}  published {minute['published']:>11,}" in out
        assert minute["worker_rss_mb"] > 0 and minute["broker_rss_mb"] > 0 and minute["worker_cpu_cores"] > 0
        assert minute["probes"] >= PERIOD_S - 2 and minute["p99_ms"] > 0  # one decision probe per second
    assert sum(m["published_in_minute"] for m in results["series"]) == results["series"][-1]["published"]
    assert results["max_lag_s"] >= max(m["max_lag_s"] for m in results["series"])
    assert results["worker_rss_growth"] > 0
    # Every decision probe was answered in the end (the subscriber reads the partition its decisions land on).
    assert results["probes"]["answered"] == results["probes"]["sent"] >= 3 * PERIOD_S - 3
    # The stack and the worker it printed are gone.
    pids = [int(pid) for pid in re.findall(r"\bpid (\d+)", out)]
    assert pids and not [p for p in pids if pid_alive(p)], out
