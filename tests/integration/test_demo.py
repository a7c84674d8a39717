"""`ctxflow demo` runs unattended to its report, stops every process it started, and leaves a queryable chDB.

Eight seconds of the demo's traffic are enough for the eviction story: the runaway tenant's context is offloaded,
compressed by the summarizer worker, swapped and recalled, and comes back to ok instead of being rejected; the
masking tenant's long session gets masks; nobody else is rejected. What the report says is checked against the
chDB the demo leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ctxflow.schemas.models import EvictionStrategy
from ctxflow.streams.demo.run import demo_workload
from ctxflow.streams.stack.processes import free_port, pid_alive

CTXFLOW = Path(sys.executable).with_name("ctxflow")


def _processes_mentioning(text: str) -> list[int]:
    """Pids (not ours) whose command line or environment contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                if text.encode() in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def _query(cwd: Path, env: dict[str, str], sql: str) -> list[list]:
    """Rows of ``sql`` over the chDB the demo left, from another process (no worker runs any more)."""
    query_env = {**env, "CTXFLOW_HOME": ".ctxflow/demo", "CTXFLOW_WEB_PORT": str(free_port())}
    query = subprocess.run([str(CTXFLOW), "query", "--json", sql], cwd=cwd, env=query_env, capture_output=True,
                           text=True, timeout=60)
    assert query.returncode == 0, query.stdout + query.stderr
    return json.loads(query.stdout)["rows"]


def test_demo_reports_every_tenant_and_the_runaway_and_leaves_nothing_running(tmp_path: Path) -> None:
    began = time.monotonic()
    env = {**os.environ, "COLUMNS": "200"}
    demo = subprocess.run([str(CTXFLOW), "demo", "--duration", "15", "--rate", "800"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr

    workload = demo_workload()
    missing = [t.tenant_id for t in workload.tenants if t.tenant_id not in out]
    assert not missing, f"tenants missing from the report: {missing}\n{out}"
    assert workload.runaway_tenant is not None
    runaway = workload.runaway_tenant.tenant_id
    masking = next(t.tenant_id for t in workload.tenants
                   if t.manifest.eviction and t.manifest.eviction.strategy is EvictionStrategy.OBSERVATION_MASKING)
    others = [t.tenant_id for t in workload.tenants if t.tenant_id != runaway]
    # The runaway is relieved, not rejected: no context hard limit, states back to ok; its run cap still stops it.
    line = re.search(rf"runaway tenant {runaway} hit its hard limit \d+ times \((\d+) on context slots or total, "
                     r"(\d+) rejections\); relief brought its context back to ok ([\d,]+) times", out)
    assert line and (line[1], line[2]) == ("0", "0") and int(line[3].replace(",", "")) > 0, out
    assert re.search(r"\bok -> soft\b", out) and re.search(r"\bsoft -> ok\b", out), "watermark, then relief"
    assert f"other tenants ({', '.join(others)}): 0 rejections, 0 context hard limits" in out, out
    # The report may wrap at the console's width: match its examples with every run of whitespace as one space.
    flat = " ".join(out.split())
    # A summary the summarizer worker prepared was swapped in: the runaway's (hybrid) when one arrived before relief
    # took its sources, which a loaded machine's slower summarizer can miss, else the summarizing tenant's.
    summarizing = next(t.tenant_id for t in workload.tenants
                       if t.manifest.eviction and t.manifest.eviction.strategy is EvictionStrategy.SUMMARIZATION)
    swap = re.search(r"example swap \((\S+) run \w+, (\w+), slot \w+\): summary summary:\S+ by (\w+) \S+, depth (\d), "
                     r"fidelity ([\d.]+), (\d+) sources", flat)
    assert swap and (swap[1], swap[2]) in ((runaway, "hybrid"), (summarizing, "summarization")), out
    assert swap[3] == "extractive" and float(swap[5]) >= 0.9 and int(swap[6]) >= 2, out
    recall = re.search(rf"example recall \({runaway} run \w+; \d+ of its \d+ recalls followed a user turn\): "
                       r"the user asked \"User: what did you find for (ORD-\d+)\?", flat)
    assert recall and re.search(rf"offloaded items came back \([\d,]+ tokens\), naming [^()]*{recall[1]}", flat), out
    assert re.search(rf"{runaway} run \w+: not admitted: run token cap", out), "its run cap still refuses it"
    assert re.search(r"run \w+: admitted", out), "a healthy run must be admitted"
    assert re.search(r"no_retention turns stored, 0 of them with content .*: OK", out)
    for reason in ("undecodable", "unknown_schema", "contract_violation"):
        assert reason in out, f"dead letter reason {reason} missing"

    # Every process the demo started is gone: by the pids it printed, and by anything naming its directory.
    started = dict(re.findall(r"(\w+) pid (\d+)", re.search(r"processes: (.*)", out)[1]))  # type: ignore[index]
    assert set(started) == {"broker", "redis", "worker"}
    started["summarizer"] = re.search(r"summarizer pid (\d+): compression jobs in", out)[1]  # type: ignore[index]
    assert re.search(rf"stopped: .*summarizer pid {started['summarizer']}; still running: none", out)
    assert [name for name, pid in started.items() if pid_alive(int(pid))] == []
    assert _processes_mentioning(str(tmp_path)) == []

    # The chDB it left answers `ctxflow query` from another process, with the numbers the demo reported.
    # One query for both figures checked against the report (each `ctxflow query` opens the chDB anew, ~2 s).
    turns, history = _query(tmp_path, env, "SELECT count(), countIf(slot = 'history') FROM turns")[0]
    assert turns > 0 and f"{turns:,} turns readable without a worker" in out
    decided = {row[0]: row[1:] for row in _query(tmp_path, env, (
        "SELECT tenant_id, countIf(kind = 'swap'), countIf(kind = 'offload'), countIf(kind = 'recall'), "
        "countIf(kind = 'mask'), countIf(kind = 'rejection'), countIf(kind = 'budget_state' AND state = 'ok' "
        "AND previous_state = 'soft' AND (slot IS NOT NULL OR startsWith(reason, 'total context'))) "
        "FROM decisions GROUP BY tenant_id"))}
    swaps, offloads, recalls, _, rejections, back_to_ok = decided[runaway]
    assert min(swaps, offloads, recalls, back_to_ok) > 0 and rejections == 0, decided[runaway]
    assert decided[masking][3] > 0, f"{masking} ({EvictionStrategy.OBSERVATION_MASKING.value}) masked nothing"
    assert [t for t in others if decided.get(t, (0,) * 6)[4]] == [], "other tenants were rejected"

    # It ends with the compact analyst report, read from that chDB, and the path of the full one as HTML.
    assert re.search(r"ctxflow report: all tenants, \d{4}-\d\d-\d\d \d\d:\d\d to .* UTC", out), out
    assert "Eviction rate per slot" in out and f"│ history │ {history:,} │" in flat, out
    assert "Context utilization percentiles" in out
    html = re.search(r"HTML report: (\S+)", out)
    assert html and out.rstrip().splitlines()[-1] == html[0], "the demo ends with the HTML report's path"
    page = Path(html[1]).read_text()
    assert page.count("<svg") >= 2 and "Eviction rate per slot" in page
    # The memory act: verdicts as expected, a contradiction superseding exactly one record, the secret nowhere.
    assert "Memory governance (northwind)" in out and "secret_detected" in flat and "policy_not_promotable" in flat
    assert re.search(r"seats = 50 is superseded by the upgrade \(exactly that record\)", out), out
    assert "the deploy key is in 0 memory rows" in out
    verdicts = dict(_query(tmp_path, env, "SELECT outcome, count() FROM memory_verdicts FINAL WHERE tenant_id = "
                                          "'northwind' GROUP BY outcome"))
    assert verdicts == {"accepted": 6, "merged": 1, "rejected": 2}, verdicts
    assert re.search(r"stale-context notice to the concurrent run nw-billing-2, which had recalled the old seat "
                     r"count: no longer served", flat), out
    assert "review: ana revoked the quarantined 'plan tier = pro': now revoked" in flat, out
    assert re.search(r"deleted dana's preference: record revoked; .* its text is in 0 memory_records rows, 0 "
                     r"retrieval-index rows and 0 retrieved turns", flat), out
    assert time.monotonic() - began < 90  # about a minute on a quiet machine; the bound catches a hang, not speed
