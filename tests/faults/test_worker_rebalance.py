"""Workers joining and leaving: each token table follows its partitions, and totals stay exact.

A second worker of the same app takes over some partitions (it reads their tables from the changelogs the
first one wrote); then the first stops and the second takes the rest. Every run's total must count every
turn exactly once through both hand-overs.
"""

from __future__ import annotations

from ctxflow.processors.admission import TOTAL
from ctxflow.schemas.models import ItemKind, Role, Slot
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import redis_headroom
from tests.support_kafka import tenants_on_every_partition, wait_processed, wait_until
from tests.support_traffic import publish

PER_PARTITION = 2


def _turns(runs: list[RunContext], tokens: int) -> list:
    return [r.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"{tokens} tokens", token_count=tokens) for r in runs]


def test_partitions_handed_between_workers_keep_every_total(settings: Settings) -> None:
    runs = [RunContext(tenant_id=t, user_id="user", session_id="session", agent_id="agent", model="gpt-4o")
            for t in tenants_on_every_partition(settings.partitions, PER_PARTITION)]
    first = WorkerProcess(settings, name="first").start()
    second: WorkerProcess | None = None
    try:
        publish(settings, _turns(runs, 100))
        wait_processed(settings)

        # The same home, as on one machine's embedded stack: the first worker holds the chDB directory and the
        # ClickHouse sink; the second decides without one and takes the sink over when the first stops.
        elsewhere = {"web_port": free_port()}
        second = WorkerProcess(settings.model_copy(update=elsewhere), name="second")
        second.start(ready_timeout_s=120, sole=False)
        split = wait_until(
            lambda: (first.partitions(), second.partitions()),
            lambda owned: all(owned) and sorted(owned[0] + owned[1]) == list(range(settings.partitions)),
            timeout_s=120, what="the partitions split between two workers",
        )
        assert second.health()["tables_preloaded"] > 0, split  # it took over tables the first one wrote
        publish(settings, _turns(runs, 10))
        wait_processed(settings)

        first.stop()
        second.wait_ready(120)  # every partition, the first worker's included
        publish(settings, _turns(runs, 1))
        wait_processed(settings)

        totals = {r.tenant_id: (h.used[TOTAL] if (h := redis_headroom(settings, r.tenant_id, r.run_id)) else None)
                  for r in runs}
        assert totals == {r.tenant_id: 111 for r in runs}
    finally:
        first.stop()
        if second is not None:
            second.stop()
