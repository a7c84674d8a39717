"""Client SDK for agent runtimes: publish a run's events to ctxflow and follow the decisions about it.

One import path::

    from ctxflow.streams.sdk import CtxflowClient, RunContext

    async with CtxflowClient("127.0.0.1:9092") as client:
        ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o")
        async with client.run(ctx):  # RunEvent started ... finalized(succeeded | failed | cancelled)
            await client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Plan my trip"))
        async with client.decisions("acme", run_id=ctx.run_id) as stream:
            async for decision in stream: ...

    async with BudgetReader("redis://127.0.0.1:16379/0") as budgets:  # read instead of subscribe
        answer = await budgets.check_admission("acme", ctx.run_id, {Slot.RETRIEVED: 6_000})

Delivery: ``publish_*`` encode the record and queue it; aiokafka batches per partition (``linger_ms``) and at
most ``max_in_flight`` records wait for an acknowledgement (publishing waits for room beyond that).
Delivery failures surface at :meth:`CtxflowClient.flush` (also run on a clean ``async with`` exit), which
raises :class:`PublishFailed` if any record was not acknowledged: a broker lost mid-run fails its records
after ``request_timeout_ms``. Entering a client whose bootstrap does not answer raises
:class:`BrokerUnavailable` at once. Records are keyed as ``streams.topics`` says: ``tenant_id`` (one
tenant's events share a partition), decisions ``tenant_id:run_id``. :class:`SyncCtxflowClient` is the
blocking facade for runtimes without an event loop.

Topics: the client publishes to and reads only topics that exist (``ctxflow up`` or ``ctxflow topics
create`` makes them from the catalogue) and raises :class:`TopicMissing` otherwise. A produce or a metadata
request naming a missing topic would make the broker auto-create it with its own default partition count
and cleanup policy, silently moving tenants between partitions once the real topic is made.

Usage: :mod:`streams.sdk.usage` normalizes OpenAI (Chat Completions, Responses), Anthropic and OpenTelemetry
GenAI usage, streamed or not, into the contract's disjoint token kinds; ``ctx.usage_from(...)`` makes the report::

    report = ctx.usage_from(openai_chat_usage(completion), latency_ms=820)
    await client.publish_usage(report)

Recall: ``await client.recall(ctx, "query", k=5, embedding=None, window=window)`` returns the run's best active
memories (:mod:`streams.sdk.recall`: its tenant only; tenant scope, its user's, its session's), adds those the
window does not hold yet, and reports each of those as a retrieval turn, so a memory that later goes stale
reaches the run as a ``stale_context`` decision, which :meth:`ContextWindow.apply` acts on.

Privacy: a record whose run is ``no_retention`` leaves the SDK without ``content``; its ``content_digest``
is kept (computed here when missing) and a turn's ``token_count``, when the caller gave none, is counted here
from the content before it goes (with the model's encoding), so the budget counts it all the same. A run
published as ``no_retention`` taints its later turns, memory candidates and child runs in this client even
if they say ``retained`` (delegation cannot downgrade privacy). A sub-agent in another process builds its
run with ``RunContext.delegated(parent.handoff(), agent_id)``, which carries the parent's privacy along.
A child run (``ctx.child(...)`` or ``delegated``) runs in a session of its own, ``<parent session>/<run id>``
(:func:`~.run_context.child_session`): its session memory and recall are its own, not its parent's.

Content features: a retained turn leaves the SDK with the hashed identifiers and numbers of its text and its
goal, constraint and decision flags (``TurnEvent.features``), so the worker's eviction planner does not read
the text again; a ``no_retention`` turn carries none. :func:`outgoing` is the whole step a record passes.
"""

from ctxflow.streams.sdk.budget_reader import BudgetReader
from ctxflow.streams.sdk.client import CtxflowClient
from ctxflow.streams.sdk.context_window import ContextWindow
from ctxflow.streams.sdk.errors import BrokerUnavailable, CtxflowError, PublishFailed, TopicMissing
from ctxflow.streams.sdk.readers import DecisionStream
from ctxflow.streams.sdk.recall import RecallHit
from ctxflow.streams.sdk.records import TOPIC_OF, outgoing, record_key, redact
from ctxflow.streams.sdk.run_context import Delegation, RunContext
from ctxflow.streams.sdk.sync import SyncCtxflowClient
from ctxflow.streams.sdk.usage import (
    AnthropicStream,
    OpenAIChatStream,
    OpenAIResponsesStream,
    TokenUsage,
    anthropic_usage,
    openai_chat_usage,
    openai_responses_usage,
    otel_genai_usage,
)

__all__ = [
    "TOPIC_OF", "AnthropicStream", "BrokerUnavailable", "BudgetReader", "ContextWindow", "CtxflowClient",
    "CtxflowError", "DecisionStream", "Delegation", "OpenAIChatStream", "OpenAIResponsesStream", "PublishFailed",
    "RecallHit", "RunContext", "SyncCtxflowClient", "TokenUsage", "TopicMissing", "anthropic_usage",
    "openai_chat_usage", "openai_responses_usage", "otel_genai_usage", "outgoing", "record_key", "redact",
]
