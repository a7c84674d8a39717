"""A run's identity and the builders that stamp it on every event an agent publishes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ctxflow.schemas.models import (
    AdmissionRequest,
    ContextLayer,
    ItemKind,
    MemoryCandidate,
    MemoryScope,
    MemoryType,
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
from ctxflow.schemas.models import content_digest as digest
from ctxflow.streams.sdk.usage import TokenUsage
from pydantic import BaseModel, ConfigDict


def _utc_now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)  # the wire keeps milliseconds


def _uuid() -> str:
    return str(uuid.uuid4())


def child_session(parent_session_id: str, child_run_id: str) -> str:
    """The session of a child run: ``f"{parent_session_id}/{child_run_id}"``.

    A child run gets a session scope of its own (its session-scoped memories are not its parent's, and the worker
    refuses a child that names its parent's session: ``delegation_shared_session``, :mod:`processors.delegation`).
    Derived rather than random so it says where it comes from: the parent's session is a prefix, so a workflow's
    sessions group under its root's (:func:`in_session`; in ClickHouse
    ``session_id = 's1' OR startsWith(session_id, 's1/')``) and a grandchild's is ``s1/<child>/<grandchild>``;
    the child's run id makes it unique among its siblings and the same on every replay. ``/`` because ids are
    opaque strings elsewhere (no separator of ours to collide with) and it reads as the path it is.
    """
    return f"{parent_session_id}/{child_run_id}"


def in_session(session_id: str | None, wanted: str) -> bool:
    """Whether ``session_id`` is ``wanted`` or the session of one of its sub-agent runs (:func:`child_session`)."""
    return session_id is not None and (session_id == wanted or session_id.startswith(f"{wanted}/"))


class Delegation(BaseModel):
    """A run's identity as handed to a sub-agent in another process (see :meth:`RunContext.handoff`).

    ``session_id`` is the parent's session: the child built from it (:meth:`RunContext.delegated`) runs in a
    session of its own derived from it (:func:`child_session`), never in this one.
    """

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    user_id: str
    session_id: str
    parent_run_id: str
    workflow_id: str
    privacy: PrivacyMode
    policy_version: str | None = None
    prefix_hash: str | None = None
    model: str


@dataclass
class RunContext:
    """The identity of one agent run and builders that stamp it on every event, so agents never hand-roll ids.

    Guarantees: every event built here carries this run's tenant/user/session/run/agent ids and privacy;
    turns get ``seq`` 0, 1, 2, ... in build order; ids come from ``id_factory`` (uuid4 unless injected);
    ``content_digest`` is computed from ``content``; timestamps come from ``clock`` unless ``at`` is given.
    A :meth:`child` run points ``parent_run_id`` here and ``workflow_id`` at the root, runs in a session of its
    own under this one's (:func:`child_session`), and is never less private than its parent. Builders are pure:
    nothing is sent until a client publishes the result.
    """

    tenant_id: str
    user_id: str
    session_id: str
    agent_id: str
    model: str
    run_id: str = ""
    parent_run_id: str | None = None
    workflow_id: str = ""
    privacy: PrivacyMode = PrivacyMode.RETAINED
    policy_version: str | None = None
    prefix_hash: str | None = None
    clock: Callable[[], datetime] = _utc_now
    id_factory: Callable[[], str] = _uuid
    next_seq: int = field(default=0)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or self.id_factory()
        self.workflow_id = self.workflow_id or self.run_id

    def _ids(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "user_id": self.user_id, "session_id": self.session_id,
                "run_id": self.run_id, "agent_id": self.agent_id}

    def turn(self, role: Role, kind: ItemKind, slot: Slot, content: str | None = None, *,
             content_digest: str | None = None, token_count: int | None = None, item_id: str | None = None,
             tool_call_id: str | None = None, importance: float | None = None, relevance: float | None = None,
             tier_hint: int | None = None, embedding: list[float] | None = None, at: datetime | None = None,
             tool_call_ids: list[str] | None = None, layer: ContextLayer | None = None) -> TurnEvent:
        """One context item entering the run, with the next ``seq``. Needs ``content`` or its digest.

        A tool call that issues several calls names them all in ``tool_call_ids`` (``tool_call_id`` is the first).
        ``layer`` states the item's context layer (None: the worker derives it from slot and kind).
        """
        if content is None and content_digest is None:
            raise ValueError("a turn needs content or content_digest")
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return TurnEvent(
            event_id=self.id_factory(), **self._ids(), parent_run_id=self.parent_run_id, seq=seq, role=role,
            kind=kind, slot=slot, item_id=item_id or self.id_factory(), content=content,
            content_digest=content_digest or digest(content), token_count=token_count,
            model=self.model, importance=importance, tier_hint=tier_hint, embedding=embedding,
            privacy=self.privacy, occurred_at=at or self.clock(),
            tool_call_id=tool_call_id or (tool_call_ids[0] if tool_call_ids else None), relevance=relevance,
            tool_call_ids=tool_call_ids or ([tool_call_id] if kind is ItemKind.TOOL_CALL and tool_call_id else []),
            layer=layer,
        )

    def tool_call(self, content: str, **kw: Any) -> TurnEvent:
        """An assistant tool call in the history slot, with a fresh ``tool_call_id`` for its result."""
        kw.setdefault("tool_call_id", self.id_factory())
        return self.turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, content, **kw)

    def tool_result(self, call: TurnEvent, content: str, **kw: Any) -> TurnEvent:
        """The tool's answer to ``call``, sharing its ``tool_call_id`` so the pair is evicted together."""
        kw["tool_call_id"] = call.tool_call_id
        return self.turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, content, **kw)

    def usage(self, *, provider: str, input_tokens: int, output_tokens: int, latency_ms: int,
              cached_read_tokens: int = 0, cache_write_tokens: int = 0, reasoning_tokens: int = 0,
              streamed: bool = False, complete: bool = True, call_id: str | None = None,
              model: str | None = None, at: datetime | None = None) -> UsageReport:
        """One provider call's usage in the contract's disjoint kinds (``input_tokens`` is the uncached prompt,
        ``output_tokens`` excludes reasoning); ``complete=False`` marks counts cut short by an interrupted stream.
        :meth:`usage_from` builds it from a provider's own usage object."""
        return UsageReport(
            event_id=self.id_factory(), **self._ids(), call_id=call_id or self.id_factory(),
            provider=provider, model=model or self.model, input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_read_tokens=cached_read_tokens, cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens, latency_ms=latency_ms, streamed=streamed, complete=complete,
            occurred_at=at or self.clock(),
        )

    def usage_from(self, tokens: TokenUsage, *, latency_ms: int, provider: str | None = None,
                   call_id: str | None = None, model: str | None = None, at: datetime | None = None) -> UsageReport:
        """One provider call's usage from a normalized provider payload (:mod:`streams.sdk.usage`).

        The model is ``model``, else the one the provider's payload named, else the run's; the provider likewise
        (an OTel span without ``gen_ai.provider.name`` needs ``provider``). ``streamed`` and ``complete`` are the
        payload's.
        """
        provider = provider or tokens.provider
        if not provider:
            raise ValueError("the usage payload names no provider: pass provider=...")
        return self.usage(
            provider=provider, model=model or tokens.model, input_tokens=tokens.input_tokens,
            output_tokens=tokens.output_tokens, cached_read_tokens=tokens.cached_read_tokens,
            cache_write_tokens=tokens.cache_write_tokens, reasoning_tokens=tokens.reasoning_tokens,
            latency_ms=latency_ms, streamed=tokens.streamed, complete=tokens.complete, call_id=call_id, at=at,
        )

    def _run_event(self, phase: RunPhase, status: RunStatus | None, at: datetime | None) -> RunEvent:
        return RunEvent(
            event_id=self.id_factory(), **self._ids(), parent_run_id=self.parent_run_id,
            workflow_id=self.workflow_id, phase=phase, status=status, policy_version=self.policy_version,
            prefix_hash=self.prefix_hash, model=self.model, privacy=self.privacy,
            occurred_at=at or self.clock(),
        )

    def started(self, at: datetime | None = None) -> RunEvent:
        """The run-started boundary event."""
        return self._run_event(RunPhase.STARTED, None, at)

    def finalized(self, status: RunStatus = RunStatus.SUCCEEDED, at: datetime | None = None) -> RunEvent:
        """The run-finalized boundary event with its outcome."""
        return self._run_event(RunPhase.FINALIZED, status, at)

    def child(self, agent_id: str, *, model: str | None = None, privacy: PrivacyMode | None = None,
              run_id: str = "") -> RunContext:
        """A sub-agent run in this workflow, in a session of its own: ``f"{self.session_id}/{run_id}"``
        (:func:`child_session`), so its session-scoped memories and recalls are its own, not this run's, while its
        events still group under this session. Under a no_retention parent it is no_retention whatever asked."""
        private = PrivacyMode.NO_RETENTION in (self.privacy, privacy)
        run_id = run_id or self.id_factory()
        return RunContext(
            tenant_id=self.tenant_id, user_id=self.user_id, session_id=child_session(self.session_id, run_id),
            agent_id=agent_id, model=model or self.model, run_id=run_id, parent_run_id=self.run_id,
            workflow_id=self.workflow_id, privacy=PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED,
            policy_version=self.policy_version, prefix_hash=self.prefix_hash, clock=self.clock,
            id_factory=self.id_factory,
        )

    def handoff(self) -> Delegation:
        """What a sub-agent in another process needs to run as this run's child: pass it (``model_dump_json``)
        with the task and build the child there with :meth:`delegated`, so it inherits this run's tenant,
        user, workflow, policy and privacy instead of re-declaring them, and runs in a session of its own
        derived from this run's (the handoff carries this run's session for that)."""
        return Delegation(
            tenant_id=self.tenant_id, user_id=self.user_id, session_id=self.session_id, parent_run_id=self.run_id,
            workflow_id=self.workflow_id, privacy=self.privacy, policy_version=self.policy_version,
            prefix_hash=self.prefix_hash, model=self.model,
        )

    @classmethod
    def delegated(cls, handoff: Delegation | str | bytes, agent_id: str, *, model: str | None = None,
                  privacy: PrivacyMode | None = None, run_id: str = "") -> RunContext:
        """The child run a sub-agent process builds from its parent's :meth:`handoff` (the model or its JSON).

        Like :meth:`child`, it runs in a session of its own, ``f"{handoff.session_id}/{run_id}"``
        (:func:`child_session`), and is never less private than its parent: ``privacy=retained`` under a
        ``no_retention`` parent still gives a ``no_retention`` run, so its payloads never leave this process.
        """
        parent = handoff if isinstance(handoff, Delegation) else Delegation.model_validate_json(handoff)
        private = PrivacyMode.NO_RETENTION in (parent.privacy, privacy)
        run_id = run_id or _uuid()
        return cls(
            tenant_id=parent.tenant_id, user_id=parent.user_id, session_id=child_session(parent.session_id, run_id),
            agent_id=agent_id, model=model or parent.model, run_id=run_id, parent_run_id=parent.parent_run_id,
            workflow_id=parent.workflow_id, privacy=PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED,
            policy_version=parent.policy_version, prefix_hash=parent.prefix_hash,
        )

    def admission(self, planned: Mapping[Slot | str, int], *, at: datetime | None = None) -> AdmissionRequest:
        """Ask the budget whether a planned call (tokens per slot) may proceed."""
        return AdmissionRequest(
            request_id=self.id_factory(), **self._ids(), model=self.model,
            planned={Slot(slot): tokens for slot, tokens in planned.items()}, requested_at=at or self.clock(),
        )

    def memory_candidate(
        self, scope: MemoryScope, type_: MemoryType, content: str, *, confidence: float,
        source_item_ids: Iterable[str] = (), at: datetime | None = None, subject: str | None = None,
        attribute: str | None = None, value: str | None = None, verification: Verification = Verification.NONE,
        verified_by: str | None = None, corroborating_run_ids: Iterable[str] = (), retention_rule: str | None = None,
        candidate_id: str | None = None, embedding: list[float] | None = None,
    ) -> MemoryCandidate:
        """Propose promoting ``content`` to durable memory; the worker's memory gate decides (a verdict on
        ``memory.verdicts``). ``subject``/``attribute``/``value`` make a contradiction precise (a newer value of
        the same subject's attribute supersedes exactly that record); ``verification`` and ``verified_by`` (an
        approver or a system of record) or ``corroborating_run_ids`` are what admit a tenant-wide fact;
        ``retention_rule`` names the tenant rule under which personal data in ``content`` may be kept;
        ``embedding`` (the agent's vector of ``content``) goes onto the record, and recall ranks by it. A child
        run's candidates carry its parent and agent as provenance."""
        return MemoryCandidate(
            event_id=self.id_factory(), **self._ids(), candidate_id=candidate_id or self.id_factory(), scope=scope,
            type=type_, content=content, content_digest=digest(content),
            source_item_ids=list(source_item_ids),
            confidence=confidence, privacy=self.privacy, occurred_at=at or self.clock(),
            subject=subject, attribute=attribute, value=value, verification=verification, verified_by=verified_by,
            corroborating_run_ids=list(corroborating_run_ids), retention_rule=retention_rule,
            parent_run_id=self.parent_run_id, produced_by_agent=self.agent_id if self.parent_run_id else None,
            embedding=embedding,
        )
