"""`ctxflow demo` runs unattended to its report, stops every process it started, and leaves a queryable chDB."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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


def test_demo_reports_every_tenant_and_the_runaway_and_leaves_nothing_running(tmp_path: Path) -> None:
    began = time.monotonic()
    env = {**os.environ, "COLUMNS": "200"}
    demo = subprocess.run([str(CTXFLOW), "demo", "--duration", "8", "--rate", "800"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr

    workload = demo_workload()
    missing = [t.tenant_id for t in workload.tenants if t.tenant_id not in out]
    assert not missing, f"tenants missing from the report: {missing}\n{out}"
    assert workload.runaway_tenant is not None
    runaway = workload.runaway_tenant.tenant_id
    hard = re.search(rf"runaway tenant {runaway} hit its hard limit (\d+) times \((\d+) on context", out)
    assert hard and int(hard[1]) > 0 and int(hard[2]) > 0, out
    assert re.search(r"\bok -> soft\b", out) and re.search(r"\bsoft -> hard\b", out), "watermark, then hard limit"
    others = ", ".join(t.tenant_id for t in workload.tenants if t.tenant_id != runaway)
    assert f"other tenants ({others}): 0 context hard limits" in out or (
        f"other tenants ({others}): 0 hard-limit decisions, unaffected" in out), "the others are unaffected"
    assert re.search(rf"{runaway} run \w+: not admitted", out), "the runaway run must be refused admission"
    assert re.search(r"run \w+: admitted", out), "a healthy run must be admitted"
    assert re.search(r"no_retention turns stored, 0 of them with content .*: OK", out)
    for reason in ("undecodable", "unknown_schema", "contract_violation"):
        assert reason in out, f"dead letter reason {reason} missing"

    # Every process the demo started is gone: by the pids it printed, and by anything naming its directory.
    started = dict(re.findall(r"(\w+) pid (\d+)", re.search(r"processes: (.*)", out)[1]))  # type: ignore[index]
    assert set(started) == {"broker", "redis", "worker"}
    assert [name for name, pid in started.items() if pid_alive(int(pid))] == []
    assert _processes_mentioning(str(tmp_path)) == []

    # The chDB it left answers `ctxflow query` from another process, with the numbers the demo reported.
    query_env = {**env, "CTXFLOW_HOME": ".ctxflow/demo", "CTXFLOW_WEB_PORT": str(free_port())}
    query = subprocess.run([str(CTXFLOW), "query", "--json", "SELECT count() FROM turns"], cwd=tmp_path,
                           env=query_env, capture_output=True, text=True, timeout=60)
    assert query.returncode == 0, query.stdout + query.stderr
    turns = json.loads(query.stdout)["rows"][0][0]
    assert turns > 0 and f"{turns:,} turns readable without a worker" in out
    assert time.monotonic() - began < 60
