"""ctxflow: a streaming context governor for multi-tenant AI agent platforms.

The public import path for agent runtimes::

    from ctxflow import CtxflowClient, RunContext, Role, ItemKind, Slot

    async with CtxflowClient("127.0.0.1:9092") as client:
        ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o")
        async with client.run(ctx):
            await client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Plan my trip"))

The repository's folders install beneath this package (``ctxflow.schemas``, ``ctxflow.processors``,
``ctxflow.streams``, ``ctxflow.sinks``); only the names below are the SDK's stable surface.
"""

from ctxflow.schemas.models import (
    AdmissionRequest,
    BudgetState,
    Decision,
    DecisionKind,
    ItemKind,
    PrivacyMode,
    Role,
    RunEvent,
    RunPhase,
    RunStatus,
    Slot,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.sdk import (
    BrokerUnavailable,
    BudgetReader,
    CtxflowClient,
    CtxflowError,
    DecisionStream,
    PublishFailed,
    RunContext,
    SyncCtxflowClient,
    TopicMissing,
)

__all__ = [
    "AdmissionRequest", "BrokerUnavailable", "BudgetReader", "BudgetState", "CtxflowClient", "CtxflowError",
    "Decision", "DecisionKind", "DecisionStream", "ItemKind", "PrivacyMode", "PublishFailed", "Role", "RunContext",
    "RunEvent", "RunPhase", "RunStatus", "Slot", "SyncCtxflowClient", "TopicMissing", "TurnEvent", "UsageReport",
]
