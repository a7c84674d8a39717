"""What the SDK counts, through the real worker: a no-retention turn's tokens and a normalized provider usage.

Privacy never switches budgets off: an agent that gives no ``token_count`` for a no-retention turn still has
every token of it in its run's budget (Redis headroom, ClickHouse), while no byte of the content reaches the
turns topic. A provider's usage object published through ``ctx.usage_from`` is reconciled with the provider's
own prompt and total counts, each cached token once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from ctxflow.processors.admission import TOTAL
from ctxflow.processors.tokens import TokenCounter, estimate_tokens
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import DecisionKind, TurnEvent
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess

from ctxflow import CtxflowClient, ItemKind, PrivacyMode, Role, RunContext, Slot, openai_chat_usage
from tests.support_deploy import redis_headroom
from tests.support_kafka import decisions_on_topic, read_topics, wait_processed

SECRET = "Patient 4471 (née Müller) reported 37.9°C at 06:40; dosage raised to 250mg — keep this out of logs."

# https://platform.openai.com/docs/guides/prompt-caching (the usage of a request with a cache hit)
CACHED_USAGE = {
    "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920},
    "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}


def test_a_no_retention_turn_is_counted_in_the_budget_and_its_content_never_published(
    settings: Settings, worker: WorkerProcess,
) -> None:
    ctx = RunContext(tenant_id="clinic", user_id="u1", session_id="s1", agent_id="intake", model="gpt-4o",
                     privacy=PrivacyMode.NO_RETENTION, clock=lambda: datetime.now(UTC).replace(microsecond=0))
    expected = TokenCounter().count(SECRET, "gpt-4o")
    assert not expected.estimated and expected.tokens != estimate_tokens(SECRET)
    assert expected.tokens != TokenCounter().count(SECRET, "gpt-4").tokens  # o200k, not cl100k

    async def publish() -> None:
        async with CtxflowClient.from_settings(settings) as client:
            await client.publish_run(ctx.started())
            await client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, SECRET))  # no token_count
            await client.publish_usage(ctx.usage_from(openai_chat_usage(CACHED_USAGE), latency_ms=640))

    asyncio.run(publish())
    wait_processed(settings)

    headroom = redis_headroom(settings, ctx.tenant_id, ctx.run_id)
    assert headroom is not None
    assert (headroom.used[Slot.HISTORY.value], headroom.used[TOTAL]) == (expected.tokens, expected.tokens)
    assert worker.query(f"SELECT token_count, content FROM turns WHERE run_id = '{ctx.run_id}'").rows == [
        (expected.tokens, None)]

    on_topic = asyncio.run(read_topics(settings, ["turns"]))
    assert len(on_topic) == 1
    assert SECRET.encode() not in on_topic[0].value and b"Patient 4471" not in on_topic[0].value
    published = Codec().decode(on_topic[0].value, TurnEvent)
    assert (published.content, published.token_count) == (None, expected.tokens)

    reconciled = [d for d in decisions_on_topic(settings)
                  if d.kind is DecisionKind.USAGE_RECONCILED and d.run_id == ctx.run_id]
    assert reconciled, "the usage report was not reconciled"
    # The provider's prompt (2006, of which 1920 cached) and total (2306), each token once.
    assert reconciled[0].used_tokens == 2006
    assert "2306 tokens in total" in reconciled[0].reason
