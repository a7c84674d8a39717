"""Client SDK for agent runtimes: publish a run's events to ctxflow and follow the decisions about it.

One import path::

    from streams.sdk import CtxflowClient, RunContext

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

Privacy: a record whose run is ``no_retention`` leaves the SDK without ``content``; its ``content_digest``
is kept (computed here when missing) and ``token_count`` is sent only if the caller gave it: the SDK does
not tokenize, so give ``token_count`` for no-retention turns or the budget cannot count them. A run
published as ``no_retention`` taints its later turns, memory candidates and child runs in this client even
if they say ``retained`` (delegation cannot downgrade privacy).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from schemas.codec import Codec, RejectedRecord
from schemas.models import (
    AdmissionRequest,
    Decision,
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
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from schemas.models import content_digest as digest
from streams.budget_reader import BudgetReader
from streams.config import Settings
from streams.log_end import log_end_offsets
from streams.topics import ADMISSIONS, DECISIONS, MANIFESTS, MEMORY_CANDIDATES, RUNS, TURNS, USAGE, TopicSpec

__all__ = [
    "TOPIC_OF", "BrokerUnavailable", "BudgetReader", "CtxflowClient", "CtxflowError", "DecisionStream", "PublishFailed",
    "RunContext", "SyncCtxflowClient", "TopicMissing", "record_key", "redact",
]

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)

TOPIC_OF: dict[type[BaseModel], TopicSpec] = {
    TurnEvent: TURNS, UsageReport: USAGE, RunEvent: RUNS, AdmissionRequest: ADMISSIONS,
    TenantManifest: MANIFESTS, MemoryCandidate: MEMORY_CANDIDATES, Decision: DECISIONS,
}
_PRIVATE_RUNS_REMEMBERED = 100_000
_CHECK = (
    "check that the broker is running (`ctxflow up`), that the bootstrap address (CTXFLOW_BOOTSTRAP) "
    "names its host:port, and that its advertised listener is reachable from this host"
)


class CtxflowError(Exception):
    """Base class of every error the SDK raises."""


class BrokerUnavailable(CtxflowError):
    """The broker could not be reached within the connect timeout; the message says what to check."""


class TopicMissing(CtxflowError):
    """A topic the client needs does not exist on the broker; the message says how to create it."""

    def __init__(self, topic: str, settings: Settings) -> None:
        super().__init__(
            f"topic {topic} does not exist on the broker at {settings.bootstrap}: create the topics with `ctxflow up` "
            f"(or `ctxflow topics create`), or check CTXFLOW_TOPIC_PREFIX (now {settings.topic_prefix!r}); ctxflow "
            "never lets the broker auto-create a topic with its default partition count")
        self.topic = topic


class PublishFailed(CtxflowError):
    """Some queued records were not acknowledged; ``failures`` holds ``(topic, error)`` for the first ones."""

    def __init__(self, message: str, failures: list[tuple[str, BaseException]]) -> None:
        super().__init__(message)
        self.failures = failures


def record_key(spec: TopicSpec, record: BaseModel) -> bytes:
    """The partition key ``spec.key`` names (``tenant_id`` or ``tenant_id:run_id``); a null part is ``""``."""
    try:
        parts = [getattr(record, name) for name in spec.key.split(":")]
    except AttributeError as exc:
        raise ValueError(f"{type(record).__name__} has no field for key {spec.key!r} of {spec.name}") from exc
    return ":".join("" if part is None else str(part) for part in parts).encode()


def redact(record: R) -> R:
    """Privacy step: a ``no_retention`` record comes back without ``content`` and with its digest.

    Other records come back unchanged. ``token_count`` is never invented.
    """
    content = getattr(record, "content", None)
    if getattr(record, "privacy", None) != PrivacyMode.NO_RETENTION or content is None:
        return record
    kept = getattr(record, "content_digest", None) or digest(content)
    return record.model_copy(update={"content": None, "content_digest": kept})


def _utc_now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)  # the wire keeps milliseconds


def _uuid() -> str:
    return str(uuid.uuid4())


@dataclass
class RunContext:
    """The identity of one agent run and builders that stamp it on every event, so agents never hand-roll ids.

    Guarantees: every event built here carries this run's tenant/user/session/run/agent ids and privacy;
    turns get ``seq`` 0, 1, 2, ... in build order; ids come from ``id_factory`` (uuid4 unless injected);
    ``content_digest`` is computed from ``content``; timestamps come from ``clock`` unless ``at`` is given.
    A :meth:`child` run points ``parent_run_id`` here and ``workflow_id`` at the root, and is never less
    private than its parent. Builders are pure: nothing is sent until a client publishes the result.
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
             ) -> TurnEvent:
        """One context item entering the run, with the next ``seq``. Needs ``content`` or its digest."""
        if content is None and content_digest is None:
            raise ValueError("a turn needs content or content_digest")
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return TurnEvent(
            event_id=self.id_factory(), **self._ids(), parent_run_id=self.parent_run_id, seq=seq, role=role,
            kind=kind, slot=slot, item_id=item_id or self.id_factory(), content=content,
            content_digest=content_digest or digest(content), token_count=token_count,
            model=self.model, importance=importance, tier_hint=tier_hint, embedding=embedding,
            privacy=self.privacy, occurred_at=at or self.clock(), tool_call_id=tool_call_id,
            relevance=relevance,
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
        """One provider call's usage; ``complete=False`` marks counts cut short by an interrupted stream."""
        return UsageReport(
            event_id=self.id_factory(), **self._ids(), call_id=call_id or self.id_factory(),
            provider=provider, model=model or self.model, input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_read_tokens=cached_read_tokens, cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens, latency_ms=latency_ms, streamed=streamed, complete=complete,
            occurred_at=at or self.clock(),
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
        """A sub-agent run in this workflow; under a no_retention parent it is no_retention whatever asked."""
        private = PrivacyMode.NO_RETENTION in (self.privacy, privacy)
        return RunContext(
            tenant_id=self.tenant_id, user_id=self.user_id, session_id=self.session_id, agent_id=agent_id,
            model=model or self.model, run_id=run_id, parent_run_id=self.run_id, workflow_id=self.workflow_id,
            privacy=PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED,
            policy_version=self.policy_version, prefix_hash=self.prefix_hash, clock=self.clock,
            id_factory=self.id_factory,
        )

    def admission(self, planned: Mapping[Slot | str, int], *, at: datetime | None = None) -> AdmissionRequest:
        """Ask the budget whether a planned call (tokens per slot) may proceed."""
        return AdmissionRequest(
            request_id=self.id_factory(), **self._ids(), model=self.model,
            planned={Slot(slot): tokens for slot, tokens in planned.items()}, requested_at=at or self.clock(),
        )

    def memory_candidate(self, scope: MemoryScope, type_: MemoryType, content: str, *, confidence: float,
                         source_item_ids: Iterable[str] = (), at: datetime | None = None) -> MemoryCandidate:
        """Propose promoting ``content`` to durable memory; the gate decides."""
        return MemoryCandidate(
            event_id=self.id_factory(), **self._ids(), candidate_id=self.id_factory(), scope=scope,
            type=type_, content=content, content_digest=digest(content),
            source_item_ids=list(source_item_ids),
            confidence=confidence, privacy=self.privacy, occurred_at=at or self.clock(),
        )


class CtxflowClient:
    """Async ctxflow producer (plus decision and manifest readers) over one aiokafka producer.

    Use as ``async with``: entering connects (or raises :class:`BrokerUnavailable` within
    ``connect_timeout_s``), a clean exit flushes (raising :class:`PublishFailed` on lost records) and closes.
    """

    def __init__(self, bootstrap: str, *, topic_prefix: str = "ctxflow", registry_url: str | None = None,
                 linger_ms: int = 5, max_batch_bytes: int = 512 * 1024, max_in_flight: int = 20_000,
                 request_timeout_ms: int = 30_000, connect_timeout_s: float = 10.0,
                 max_content_bytes: int = 256 * 1024, client_id: str = "ctxflow-sdk") -> None:
        self.bootstrap = bootstrap
        self.settings = Settings(bootstrap=bootstrap, topic_prefix=topic_prefix,
                                 schema_registry_url=registry_url, max_content_bytes=max_content_bytes)
        self.codec = Codec(registry_url=registry_url, max_content_bytes=max_content_bytes)
        self._producer_args: dict[str, Any] = {
            "bootstrap_servers": bootstrap, "client_id": client_id, "linger_ms": linger_ms,
            "max_batch_size": max_batch_bytes, "request_timeout_ms": request_timeout_ms, "acks": "all",
        }
        self._connect_timeout_s = connect_timeout_s
        self._max_in_flight = max_in_flight
        self._producer: AIOKafkaProducer | None = None
        self._in_flight = 0
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failures: list[tuple[str, BaseException]] = []
        self._failed = 0
        self._private_runs: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._partitions_of: dict[str, list[TopicPartition]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> CtxflowClient:
        """A client for the deployment ``settings`` describe (bootstrap, prefix, registry, content limit)."""
        return cls(settings.bootstrap, topic_prefix=settings.topic_prefix,
                   registry_url=settings.schema_registry_url, max_content_bytes=settings.max_content_bytes,
                   **kw)

    async def __aenter__(self) -> CtxflowClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Connect the producer; raises :class:`BrokerUnavailable` saying what to check."""
        producer = AIOKafkaProducer(**self._producer_args)
        try:
            await asyncio.wait_for(producer.start(), self._connect_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await producer.stop()
            raise BrokerUnavailable(
                f"cannot reach the Kafka broker at {self.bootstrap!r} within {self._connect_timeout_s}s "
                f"({exc!r}): {_CHECK}") from exc
        self._producer = producer

    async def stop(self) -> None:
        """Close the producer without waiting for acknowledgements (call :meth:`flush` first for those)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    def topic(self, spec: TopicSpec) -> str:
        """The full topic name of ``spec`` under this client's prefix."""
        return spec.full_name(self.settings)

    async def publish(self, record: BaseModel) -> None:
        """Apply the privacy step, encode, and queue ``record`` on its contract topic with its key.

        Raises ``schemas.ContractViolation`` (nothing is sent) when the record breaks a deployment limit,
        such as content over ``max_content_bytes``; :class:`CtxflowError` when the client is not started.
        """
        spec = TOPIC_OF.get(type(record))
        if spec is None:
            raise TypeError(f"{type(record).__name__} is not a record agents publish")
        record = self._apply_privacy(record)
        await self.send_raw(self.topic(spec), record_key(spec, record), self.codec.encode(record))

    async def publish_turn(self, event: TurnEvent) -> None:
        """Queue one context item (content dropped if its run is no_retention)."""
        await self.publish(event)

    async def publish_usage(self, report: UsageReport) -> None:
        """Queue one provider call's usage."""
        await self.publish(report)

    async def publish_run(self, event: RunEvent) -> None:
        """Queue a run boundary; a no_retention run makes this client redact the run and its children."""
        await self.publish(event)

    async def publish_memory_candidate(self, candidate: MemoryCandidate) -> None:
        """Queue a memory promotion proposal (content dropped if its run is no_retention)."""
        await self.publish(candidate)

    async def request_admission(self, request: AdmissionRequest) -> None:
        """Queue an admission request; the answer arrives as a ``admission`` decision for the run."""
        await self.publish(request)

    async def set_manifest(self, manifest: TenantManifest) -> None:
        """Queue a tenant's budget manifest (the newest version per tenant wins)."""
        await self.publish(manifest)

    async def send_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue encoded bytes (tools, poison demos); waits while ``max_in_flight`` are unacknowledged."""
        if self._producer is None:
            raise CtxflowError("client is not started: use `async with CtxflowClient(...)` or await start()")
        if topic not in self._partitions_of:
            await self._partitions(topic)  # before the producer's metadata request for it, which would create it
        while self._in_flight >= self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        future = await self._producer.send(topic, value, key=key)
        self._in_flight += 1
        self._idle.clear()
        future.add_done_callback(functools.partial(self._acked, topic))

    def _acked(self, topic: str, future: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            self._failed += 1
            if len(self._failures) < 20:
                self._failures.append((topic, error))
        if self._in_flight < self._max_in_flight:
            self._room.set()
        if self._in_flight == 0:
            self._idle.set()

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued record is acknowledged or failed; raise :class:`PublishFailed` on failures.

        Failures are reported once: a later flush only reports records queued after this one.
        """
        if self._producer is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._producer.flush()
                    await self._idle.wait()
            except TimeoutError:
                raise PublishFailed(f"{self._in_flight} records not acknowledged within {timeout_s}s by "
                                    f"{self.bootstrap!r}: {_CHECK}", []) from None
        if self._failed:
            failures, failed = self._failures, self._failed
            self._failures, self._failed = [], 0
            raise PublishFailed(f"{failed} records were not acknowledged by {self.bootstrap!r} "
                                f"(first: {failures[0][1]!r} on {failures[0][0]}): {_CHECK}", failures)

    def _apply_privacy(self, record: R) -> R:
        run_id = getattr(record, "run_id", None)
        privacy = getattr(record, "privacy", None)
        if run_id is None or privacy is None:
            return record
        tenant_id: str = record.tenant_id  # type: ignore[attr-defined]
        if privacy == PrivacyMode.RETAINED and (
            (tenant_id, run_id) in self._private_runs
            or (tenant_id, getattr(record, "parent_run_id", None)) in self._private_runs
        ):
            record = record.model_copy(update={"privacy": PrivacyMode.NO_RETENTION})
        if isinstance(record, RunEvent) and record.privacy == PrivacyMode.NO_RETENTION:
            self._private_runs[(tenant_id, run_id)] = None
            while len(self._private_runs) > _PRIVATE_RUNS_REMEMBERED:
                self._private_runs.popitem(last=False)
        return redact(record)

    @contextlib.asynccontextmanager
    async def run(self, ctx: RunContext) -> AsyncIterator[RunContext]:
        """Publish ``started`` on entry, ``finalized`` on exit: succeeded, cancelled, or failed on errors."""
        await self.publish_run(ctx.started())
        status = RunStatus.FAILED
        try:
            yield ctx
            status = RunStatus.SUCCEEDED
        except asyncio.CancelledError:
            status = RunStatus.CANCELLED
            raise
        finally:
            await self.publish_run(ctx.finalized(status))

    def decisions(self, tenant_id: str, session_id: str | None = None, run_id: str | None = None,
                  from_beginning: bool = False) -> DecisionStream:
        """Decisions for one tenant (and session/run when given); see :class:`DecisionStream`."""
        return DecisionStream(self, tenant_id, session_id, run_id, from_beginning)

    async def latest_manifest(self, tenant_id: str, timeout_s: float = 10.0) -> TenantManifest | None:
        """The last manifest published for ``tenant_id`` (reads the manifests topic to its current end)."""
        latest: TenantManifest | None = None
        async with _Reader(self, self.topic(MANIFESTS), from_beginning=True) as reader:
            key = tenant_id.encode()
            for message in await reader.until_end(timeout_s):
                if message.key == key:
                    value = message.value
                    latest = None if value is None else self.codec.decode(value, TenantManifest)
        return latest

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic``; raises :class:`TopicMissing` if it does not exist (see the module doc)."""
        if self._producer is None:
            raise CtxflowError("client is not started: use `async with CtxflowClient(...)` or await start()")
        if topic not in self._partitions_of:
            # Metadata for *all* topics: unlike a request naming the topic, it never makes the broker create it.
            cluster = await self._producer.client.fetch_all_metadata()
            if topic not in cluster.topics():
                raise TopicMissing(topic, self.settings)
            self._partitions_of[topic] = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic))]
        return self._partitions_of[topic]


class SyncCtxflowClient:
    """Blocking facade over :class:`CtxflowClient` for runtimes without an event loop; same guarantees.

    Records travel while a call runs (each call drives a private event loop), so :meth:`flush` at the end
    of a unit of work; a clean ``with`` exit flushes and closes. One thread per facade.
    """

    def __init__(self, bootstrap: str, **kw: Any) -> None:
        self._runner = asyncio.Runner()
        self.client = CtxflowClient(bootstrap, **kw)

    def __enter__(self) -> SyncCtxflowClient:
        try:
            self._runner.run(self.client.start())
        except BaseException:
            self._runner.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._runner.run(self.client.stop())
            self._runner.close()

    def publish(self, record: BaseModel) -> None:
        """:meth:`CtxflowClient.publish`, blocking until the record is queued."""
        self._runner.run(self.client.publish(record))

    def flush(self, timeout_s: float | None = None) -> None:
        """:meth:`CtxflowClient.flush`: blocks until every record is acknowledged, raises on failures."""
        self._runner.run(self.client.flush(timeout_s))

    def latest_manifest(self, tenant_id: str) -> TenantManifest | None:
        """:meth:`CtxflowClient.latest_manifest`."""
        return self._runner.run(self.client.latest_manifest(tenant_id))


class _Reader:
    """A group-less consumer over every partition of one topic, positioned when entered."""

    def __init__(self, client: CtxflowClient, topic: str, from_beginning: bool) -> None:
        self._client, self._topic, self._from_beginning = client, topic, from_beginning
        self.consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> _Reader:
        self.partitions = await self._client._partitions(self._topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._client.bootstrap, group_id=None,
                                    enable_auto_commit=False, client_id="ctxflow-sdk-reader")
        await consumer.start()
        self.consumer = consumer
        if self._from_beginning:
            consumer.assign(self.partitions)
            await consumer.seek_to_beginning(*self.partitions)
        else:  # not seek_to_end: the broker's reported end can fall inside the last batch (see streams.log_end)
            await log_end_offsets(consumer, self.partitions)
        for tp in self.partitions:  # resolve offsets now, so records published after entry are never skipped
            await consumer.position(tp)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def until_end(self, timeout_s: float) -> list[Any]:
        """Every record up to the end offsets as of this call; raises ``TimeoutError`` past ``timeout_s``."""
        assert self.consumer is not None
        consumer, found = self.consumer, []
        async with asyncio.timeout(timeout_s):
            start = {tp: await consumer.position(tp) for tp in self.partitions}
            ends = await log_end_offsets(consumer, self.partitions)  # moves the consumer to the ends: come back
            for tp, offset in start.items():
                consumer.seek(tp, offset)
            while [tp for tp in self.partitions if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(records)
        return found


class DecisionStream:
    """Decisions for one tenant, optionally narrowed to a session or run, decoded and in partition order.

    ``async with`` pins the start offsets on entry, so no decision published after entry is missed; bare
    ``async for`` starts lazily. Other tenants' records are skipped by key before decoding; undecodable
    records are logged and skipped.
    """

    def __init__(self, client: CtxflowClient, tenant_id: str, session_id: str | None, run_id: str | None,
                 from_beginning: bool) -> None:
        self._client, self._tenant_id = client, tenant_id
        self._session_id, self._run_id = session_id, run_id
        self._reader = _Reader(client, client.topic(DECISIONS), from_beginning)
        self._entered = False

    async def __aenter__(self) -> DecisionStream:
        await self._reader.__aenter__()
        self._entered = True
        return self

    async def __aexit__(self, *_: object) -> None:
        self._entered = False
        await self._reader.__aexit__()

    def __aiter__(self) -> AsyncIterator[Decision]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Decision]:
        owned = not self._entered
        if owned:
            await self.__aenter__()
        prefix = f"{self._tenant_id}:".encode()
        try:
            while self._reader.consumer is not None:
                batches = await self._reader.consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        if record.key is not None and not record.key.startswith(prefix):
                            continue
                        decision = self._decode(record)
                        if decision is not None and self._wanted(decision):
                            yield decision
        finally:
            if owned:
                await self.__aexit__()

    def _decode(self, record: Any) -> Decision | None:
        try:
            return self._client.codec.decode(record.value, Decision)
        except RejectedRecord as exc:
            log.warning("skipping undecodable decision at %s[%s]@%s: %s",
                        record.topic, record.partition, record.offset, exc)
            return None

    def _wanted(self, decision: Decision) -> bool:
        return (decision.tenant_id == self._tenant_id
                and self._session_id in (None, decision.session_id)
                and self._run_id in (None, decision.run_id))
