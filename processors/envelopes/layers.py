"""Which context layer a turn's tokens belong to, and whether they are part of the static prefix.

Layers (DESIGN: global constitution, tenant policy, user memory, retrieved, session) are stated by the agent in
``TurnEvent.layer`` (v4) or, when null, derived from what every turn already says:

==========================================  =========
turn                                        layer
==========================================  =========
``kind = memory``                           user
``kind = retrieved_chunk`` or slot          retrieved
``retrieved``
slot ``system`` or ``tools``                tenant
anything else (history, scratchpad,         session
output)
==========================================  =========

``global`` is never derived: what the platform shares across tenants cannot be told from one tenant's turns,
so the platform marks it. The static prefix is the ``system`` and ``tools`` slots whatever the layer (what the
budget counts as static items: the part of a prompt that is the same call after call and is cached), so layer
tokens and prefix/dynamic tokens are two partitions of the same total.
"""

from __future__ import annotations

from ctxflow.schemas.models import ContextLayer, ItemKind, Slot, TurnEvent

LAYERS: tuple[ContextLayer, ...] = tuple(ContextLayer)
LAYER_INDEX: dict[ContextLayer, int] = {layer: i for i, layer in enumerate(LAYERS)}
GLOBAL, TENANT, USER, RETRIEVED, SESSION = (LAYER_INDEX[layer] for layer in LAYERS)
_STATIC_SLOTS = frozenset((Slot.SYSTEM, Slot.TOOLS))


def derive(kind: ItemKind, slot: Slot) -> int:
    """The index in :data:`LAYERS` of the layer of an item of ``kind`` in ``slot`` (the table above)."""
    if kind is ItemKind.MEMORY:
        return USER
    if kind is ItemKind.RETRIEVED_CHUNK or slot is Slot.RETRIEVED:
        return RETRIEVED
    if slot in _STATIC_SLOTS:
        return TENANT
    return SESSION


# Every (kind, slot) pair's layer, looked up once per turn (enum member access is slow on the hot path).
_DERIVED = {(kind, slot): derive(kind, slot) for kind in ItemKind for slot in Slot}


def layer_of(turn: TurnEvent) -> int:
    """The index in :data:`LAYERS` of the turn's layer: stated, else derived (module docstring)."""
    layer = turn.layer
    return _DERIVED[turn.kind, turn.slot] if layer is None else LAYER_INDEX[layer]


def is_static(turn: TurnEvent) -> bool:
    """Whether the turn's tokens are part of the static prefix (the system and tools slots)."""
    return turn.slot in _STATIC_SLOTS
