"""Redis restarts under a running worker: the worker rides it out and the projection comes back whole.

Redis holds only a projection (the log is the truth), so a restart that loses everything must neither stop
the worker nor leave agents reading stale or missing headroom once the runs it lost see traffic again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from ctxflow.processors.admission import TOTAL
from ctxflow.schemas.models import DecisionKind, HardLimitBehaviour, ItemKind, Role, Slot, SlotCaps, TenantManifest
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import fresh_settings, redis_decisions, redis_headroom
from tests.support_kafka import wait_processed
from tests.support_traffic import publish


def test_worker_rides_out_a_redis_restart(private_stack: EmbeddedStack, tmp_path: Path) -> None:
    settings = fresh_settings(private_stack, tmp_path / "home")
    tenant = f"redis{uuid.uuid4().hex[:8]}"
    ctx = RunContext(tenant_id=tenant, user_id="user", session_id="session", agent_id="agent", model="gpt-4o")
    manifest = TenantManifest(tenant_id=tenant, version=1, tier="free", slot_caps=SlotCaps(), total_cap=100,
                              hard_limit=HardLimitBehaviour.REJECT, updated_at=datetime(2025, 1, 1, tzinfo=UTC))
    with WorkerProcess(settings) as worker:
        publish(settings, [manifest, ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "hello", token_count=40)])
        wait_processed(settings)
        before = redis_headroom(settings, tenant, ctx.run_id)
        assert before is not None and before.used[TOTAL] == 40

        private_stack.restart("redis")  # an empty server: the projection and the worker's script are gone
        assert redis_headroom(settings, tenant, ctx.run_id) is None
        publish(settings, [ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "again", token_count=80)])
        wait_processed(settings)

        assert worker.partitions() == list(range(settings.partitions)), "the worker stopped on the restart"
        after = redis_headroom(settings, tenant, ctx.run_id)
        assert after is not None and after.used[TOTAL] == 120  # absolute: the turn before the restart counts
        assert DecisionKind.REJECTION in {d.kind for d in redis_decisions(settings, tenant, ctx.run_id)}
