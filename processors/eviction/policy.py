"""Tier and importance of a context item, from what the agent knew when it wrote it.

Tiers (``../DESIGN``): 0 never evicted; 1 compressed before evicted; 2 offloaded to long-term memory; 3 hard
evicted. An agent's ``tier_hint`` wins. Otherwise:

=========================================  ====  ===============================================================
item                                       tier  why
=========================================  ====  ===============================================================
system or tools slot, system role          0     the prompt's frame and the tool definitions in use
the run's first user message               0     the user's original goal
summary                                    1     already compressed; depth caps further compression at 2
user and assistant messages                1     recent history and active reasoning
tool calls, tool results, memories         2     finished sub-task results: offloaded, recalled on mention
a tool result that repeats earlier content 3     redundant tool output
retrieved chunks                           3     superseded retrievals are fetched again when needed
=========================================  ====  ===============================================================

The *current* user turn is also tier 0; which turn that is changes as the run goes, so the planner decides it
when it plans, not here. Importance (0..1) is the agent's ``importance`` when given, else a base by kind raised
for a stated goal, constraint or decision and for carrying identifiers and numbers a later step may need.
"""

from __future__ import annotations

from ctxflow.schemas.models import ContentFeatures, ItemKind, Role, Slot, TurnEvent

ROLES: tuple[Role, ...] = tuple(Role)
KINDS: tuple[ItemKind, ...] = tuple(ItemKind)
ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}
KIND_INDEX = {kind: i for i, kind in enumerate(KINDS)}

_BASE_IMPORTANCE = {
    ItemKind.MESSAGE: 0.45,
    ItemKind.TOOL_CALL: 0.35,
    ItemKind.TOOL_RESULT: 0.3,
    ItemKind.RETRIEVED_CHUNK: 0.25,
    ItemKind.MEMORY: 0.4,
    ItemKind.SUMMARY: 0.6,
}
_STATIC_SLOTS = frozenset((Slot.SYSTEM, Slot.TOOLS))


def tier_of(t: TurnEvent, first_user: bool, repeats_content: bool) -> int:
    """The item's tier (see the module docstring)."""
    if t.tier_hint is not None:
        return t.tier_hint
    if t.slot in _STATIC_SLOTS or t.role is Role.SYSTEM:
        return 0
    if t.kind is ItemKind.MESSAGE:
        return 0 if first_user and t.role is Role.USER else 1
    if t.kind is ItemKind.SUMMARY:
        return 1
    if t.kind is ItemKind.RETRIEVED_CHUNK or (t.kind is ItemKind.TOOL_RESULT and repeats_content):
        return 3
    return 2


def importance_of(t: TurnEvent, features: ContentFeatures | None) -> float:
    """The item's importance in [0, 1] (see the module docstring)."""
    if t.importance is not None:
        return t.importance
    score = _BASE_IMPORTANCE[t.kind] + (0.15 if t.role is Role.USER else 0.0)
    if features is not None:
        score += 0.3 * features.goal + 0.3 * features.constraint + 0.15 * features.decision
        score += min(0.15, 0.03 * features.terms)
    return min(score, 1.0)
