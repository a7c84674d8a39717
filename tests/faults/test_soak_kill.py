"""A soak with the worker SIGKILLed in its middle: publishing goes on while a new worker restores its tables,
everything published is committed, and the totals equal what was published, as in a soak without the kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ctxflow.streams.bench.soak import SoakConfig, run_soak
from ctxflow.streams.config import Settings

KILL_AT = 1.5  # periods
#: Four short periods: the kill comes in the second and the successor (ready ~5-10 s after it) reports the last
#: ones; each period's share of the rate is checked, so shorter periods prove the same at half the wait.
PERIOD_S = 6
RATE_EPS = 300


@pytest.mark.timeout(150)
def test_soak_with_a_sigkilled_worker_ends_with_the_published_totals(tmp_path: Path) -> None:
    said: list[str] = []
    config = SoakConfig(minutes=4, rate_eps=RATE_EPS, interval_s=PERIOD_S, kill_worker_at=KILL_AT)
    results = run_soak(Settings(home=tmp_path / "state"), config, said.append)
    results.write(tmp_path / "soak-results.json")
    written = json.loads((tmp_path / "soak-results.json").read_text())

    assert written["killed_worker_at"] == KILL_AT and written["worker_restart_s"] > 0, said
    pids = [m["worker_pid"] for m in written["series"]]
    assert pids[0] != pids[-1], f"the worker reporting at the end is the one killed: {pids}"
    # Publishing went on through the kill and restart: every period published about its share.
    assert all(m["published_in_minute"] > 0.8 * RATE_EPS * PERIOD_S for m in written["series"]), said
    # Nothing published was lost or counted twice by the killed worker and its successor.
    assert written["committed_ratio"] == 1.0 and written["committed"] == written["in_log"] == written["published"]
    assert written["totals_match"] is True, written["totals_problems"]
    # The kill is visible in the lag: records waited while no worker owned the partitions.
    assert written["max_lag_records"] > 0 and written["max_lag_s"] > 0
    assert any("SIGKILL worker" in line for line in said) and "verdict" in written
