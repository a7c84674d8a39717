"""Cost lines: one priced source event on one surface, with the run's place in its delegation tree.

A line names its run's lineage (parent, workflow, root) so that costs roll up through the tree in one query
(``GROUP BY root_run_id``; a workflow's split by sub-agent is ``GROUP BY agent_id``). Usage reports carry no
lineage and may be read before their run's first run event, so a line is priced when its event is applied and
*published* once the run's lineage is known (:class:`PendingLine` waits in the run's state until then): every
copy of a line, live or replayed, names the same tree.

``cost_id`` hashes the tenant, the source and the surface. A usage report, a tool call and a retrieval are their
own sources. A closed run has two closure lines, both ``estimated`` and published with every envelope of it, zero
or not: the inference estimate of consumption its usage reports do not account for, and the storage of its
retained content. Their source is the run's closure (``close:<run_id>``), so a closure updated by a later event (a
late usage report, an abandoned run that resumes) writes the same ids again and the last line holds.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import NamedTuple

from ctxflow.processors.envelopes.records import trusted
from ctxflow.processors.windows import from_ms
from ctxflow.schemas.models import CostLine, CostSurface


class Lineage(NamedTuple):
    """A run's place in its delegation tree."""

    parent_run_id: str | None
    workflow_id: str
    root_run_id: str


class PendingLine(NamedTuple):
    """A priced line before it is published: everything but the run's identity and lineage. ``surface`` and
    ``unit`` are :class:`~schemas.models.CostSurface` and :class:`~schemas.models.CostUnit` values."""

    surface: str
    source_id: str
    source_event_id: str
    user_id: str
    session_id: str
    agent_id: str
    model: str | None
    quantity: int
    unit: str
    micros: int
    estimated: bool
    occurred_ms: int

    def to_list(self) -> list:
        """The changelog form (while it waits for the run's lineage)."""
        return list(self)

    @classmethod
    def from_list(cls, v: list) -> PendingLine:
        """Inverse of :meth:`to_list`."""
        return cls(*v)


def cost_id(tenant_id: str, source_id: str, surface: CostSurface | str) -> str:
    """The id of the line of ``surface`` for ``source_id``: a replay, or an update, writes the same id."""
    return blake2b(f"{tenant_id}\x1f{source_id}\x1f{surface}".encode(), digest_size=16).hexdigest()


def closure_source(run_id: str) -> str:
    """The source of a run's closure lines (one id per surface whatever closed the run, and however often)."""
    return f"close:{run_id}"


def publish(line: PendingLine, tenant_id: str, run_id: str, lineage: Lineage, price_version: str) -> CostLine:
    """The line as published on ``costs``."""
    (surface, source_id, source_event_id, user_id, session_id, agent_id, model, quantity, unit, micros, estimated,
     occurred_ms) = line
    return trusted(CostLine, {
        "cost_id": cost_id(tenant_id, source_id, surface), "tenant_id": tenant_id, "user_id": user_id,
        "session_id": session_id, "run_id": run_id, "root_run_id": lineage.root_run_id,
        "parent_run_id": lineage.parent_run_id, "workflow_id": lineage.workflow_id, "agent_id": agent_id,
        "surface": surface, "model": model, "quantity": quantity, "unit": unit, "micros": micros,
        "price_version": price_version, "estimated": estimated, "source_event_id": source_event_id,
        "occurred_at": from_ms(occurred_ms),
    })
