"""Analytics count what the budget counts: duplicates under new event ids, through the SDK, the broker and the
worker, leave ClickHouse's totals equal to the budget's (issue 16, item 4).

The shapes users meet: a provider call reported twice (LiteLLM's double logging), a turn resent with the same
``(run, seq)`` (here with other content and token count: the budget keeps the first), run boundaries sent twice.
The budget's side is read from its run ledgers as the worker persisted them (their changelog).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from ctxflow.processors.ledger import FINALIZED, STARTED
from ctxflow.processors.pricing import usage_tokens
from ctxflow.schemas.models import ItemKind, Role, Slot
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.worker_process import WorkerProcess
from pydantic import BaseModel

from tests.support_tables import run_ledgers
from tests.support_traffic import publish

R = TypeVar("R", bound=BaseModel)
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)


def _again(record: R, **changes: object) -> R:
    """``record`` sent again under a new event id (and whatever else ``changes`` says)."""
    return record.model_copy(update={"event_id": f"again-{uuid.uuid4().hex[:8]}", **changes})


def test_clickhouse_totals_equal_the_budgets_under_duplicates(settings: Settings, worker: WorkerProcess) -> None:
    runs = [RunContext(tenant_id="dupes", user_id="u1", session_id="s1", agent_id=agent, model="gpt-4o",
                       clock=lambda: T0) for agent in ("planner", "coder")]
    records = []
    for n, ctx in enumerate(runs):
        turns = [ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"step {i} of run {n}", token_count=100 * n + i)
                 for i in range(1, 5)]
        call = ctx.usage(provider="openai", input_tokens=1_200 + n, output_tokens=80, cached_read_tokens=40,
                         latency_ms=300)
        started, finalized = ctx.started(), ctx.finalized()
        records += [started, *turns, call]
        records += [
            _again(turns[1], content="step 2, regenerated", token_count=555, occurred_at=T0 + timedelta(hours=2)),
            _again(call, occurred_at=T0 + timedelta(seconds=2)),
            _again(call),
            _again(started, occurred_at=T0 + timedelta(minutes=1)),
            finalized,
            _again(finalized),
        ]
    publish(settings, records)
    worker.wait_caught_up()

    ledgers = run_ledgers(settings)
    budget = [ledgers[("dupes", ctx.run_id)] for ctx in runs]
    assert all(ledger.flags & STARTED and ledger.flags & FINALIZED for ledger in budget)
    turn_tokens = sum(sum(ledger.tokens) for ledger in budget)
    reported = sum(ledger.reported_tokens for ledger in budget)
    # The budget counted every first copy once and nothing else ...
    first_turns = [r for r in records if type(r).__name__ == "TurnEvent" and not r.event_id.startswith("again-")]
    assert turn_tokens == sum(t.token_count for t in first_turns)
    assert reported == sum(usage_tokens(r) for r in records
                           if type(r).__name__ == "UsageReport" and not r.event_id.startswith("again-"))
    assert [ledger.reports for ledger in budget] == [1, 1]

    # ... and so does ClickHouse, in every table an analyst or a dashboard reads.
    tokens = "input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + reasoning_tokens"
    assert worker.query(
        "SELECT (SELECT sum(token_count) FROM turns WHERE tenant_id = 'dupes'), "
        f"(SELECT sum({tokens}) FROM usage WHERE tenant_id = 'dupes'), "
        "(SELECT count() FROM usage WHERE tenant_id = 'dupes'), "
        "(SELECT countIf(phase = 'started') FROM runs WHERE tenant_id = 'dupes'), "
        "(SELECT countIf(phase = 'finalized') FROM runs WHERE tenant_id = 'dupes')"
    ).rows == [(turn_tokens, reported, 2, 2, 2)]
    assert worker.query("SELECT DISTINCT content FROM turns WHERE tenant_id = 'dupes' AND seq = 1 "
                        "ORDER BY content").rows == [("step 2 of run 0",), ("step 2 of run 1",)]
