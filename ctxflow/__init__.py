"""ctxflow: a streaming context governor for multi-tenant AI agent platforms.

The public import path for agent runtimes::

    from ctxflow import ContextWindow, CtxflowClient, ItemKind, Role, RunContext, Slot

    async with CtxflowClient("127.0.0.1:9092") as client:
        ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o")
        window = ContextWindow(run_id=ctx.run_id)  # the message list, kept in step with ctxflow's decisions
        async with client.run(ctx), client.decisions("acme", run_id=ctx.run_id) as decisions:
            turn = ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Plan my trip")
            await client.publish_turn(turn)
            window.add({"role": "user", "content": "Plan my trip"}, item_id=turn.item_id)
            async for decision in decisions:  # evict, offload, recall, mask, swap...
                window.apply(decision)
                ...  # window.messages() is always a valid list to send to the model

The repository's folders install beneath this package (``ctxflow.schemas``, ``ctxflow.processors``,
``ctxflow.streams``, ``ctxflow.sinks``); only the names below are the SDK's stable surface.
"""

from ctxflow.schemas.models import (
    AdmissionRequest,
    BudgetState,
    Decision,
    DecisionKind,
    ItemKind,
    MemoryCandidate,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    PrivacyMode,
    Role,
    RunEvent,
    RunPhase,
    RunStatus,
    Slot,
    TurnEvent,
    UsageReport,
    Verification,
)
from ctxflow.streams.sdk import (
    AnthropicStream,
    BrokerUnavailable,
    BudgetReader,
    ContextWindow,
    CtxflowClient,
    CtxflowError,
    DecisionStream,
    OpenAIChatStream,
    OpenAIResponsesStream,
    PublishFailed,
    RunContext,
    SyncCtxflowClient,
    TokenUsage,
    TopicMissing,
    anthropic_usage,
    openai_chat_usage,
    openai_responses_usage,
    otel_genai_usage,
)

__all__ = [
    "AdmissionRequest", "AnthropicStream", "BrokerUnavailable", "BudgetReader", "BudgetState", "ContextWindow",
    "CtxflowClient", "CtxflowError", "Decision", "DecisionKind", "DecisionStream", "ItemKind", "MemoryCandidate",
    "MemoryRecord", "MemoryScope", "MemoryStatus", "MemoryType", "MemoryVerdict", "OpenAIChatStream",
    "OpenAIResponsesStream", "PrivacyMode", "PublishFailed", "Role", "RunContext", "RunEvent", "RunPhase",
    "RunStatus", "Slot", "SyncCtxflowClient", "TokenUsage", "TopicMissing", "TurnEvent", "UsageReport",
    "Verification", "anthropic_usage", "openai_chat_usage", "openai_responses_usage", "otel_genai_usage",
]
