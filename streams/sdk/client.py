"""The async client: publishes records (privacy step, key, topic checks) and reads decisions and manifests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from ctxflow.processors.manifest import check_manifest
from ctxflow.schemas.codec import Codec, RejectedRecord
from ctxflow.schemas.models import (
    AdmissionRequest,
    MemoryCandidate,
    MemoryScope,
    PrivacyMode,
    RunEvent,
    RunStatus,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk.context_window import ContextWindow
from ctxflow.streams.sdk.errors import CHECK_BROKER, BrokerUnavailable, CtxflowError, PublishFailed, TopicMissing
from ctxflow.streams.sdk.linger import send_lingering_now
from ctxflow.streams.sdk.manifest_files import latest_per_tenant
from ctxflow.streams.sdk.readers import DecisionStream, TopicReader
from ctxflow.streams.sdk.recall import DEFAULT_SCOPES, RecallHit, find, retrieval_turn
from ctxflow.streams.sdk.records import TOPIC_OF, R, outgoing, record_key
from ctxflow.streams.sdk.run_context import RunContext
from ctxflow.streams.topics import MANIFESTS, TopicSpec
from pydantic import BaseModel

#: Runs this client remembers as no_retention, so their later records and children stay private.
_PRIVATE_RUNS_REMEMBERED = 100_000
#: Recalls this client remembers having reported (per run and memory version), so a repeat is not counted again.
_RECALLS_REMEMBERED = 100_000


log = logging.getLogger(__name__)

#: Batches are what a broker stores and lists (see :mod:`streams.sdk.linger`); lower it where publish latency
#: matters more than batch count (Apache Kafka handles small batches well).
_PUBLISH_LINGER_MS: int = Settings.model_fields["publish_linger_ms"].default


class CtxflowClient:
    """Async ctxflow producer (plus decision and manifest readers) over one aiokafka producer.

    Use as ``async with``: entering connects (or raises :class:`BrokerUnavailable` within
    ``connect_timeout_s``), a clean exit flushes (raising :class:`PublishFailed` on lost records) and closes.
    """

    def __init__(self, bootstrap: str, *, topic_prefix: str = "ctxflow", registry_url: str | None = None,
                 linger_ms: int = _PUBLISH_LINGER_MS, max_batch_bytes: int = 512 * 1024, max_in_flight: int = 20_000,
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
        #: Memories (tenant, run, memory id, version) this client reported a run recalled (bounded, oldest out).
        self._recalled: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
        self._partitions_of: dict[str, list[TopicPartition]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> CtxflowClient:
        """A client for the deployment ``settings`` describe (bootstrap, prefix, registry, content limit)."""
        kw.setdefault("linger_ms", settings.publish_linger_ms)
        client = cls(settings.bootstrap, topic_prefix=settings.topic_prefix,
                     registry_url=settings.schema_registry_url, max_content_bytes=settings.max_content_bytes,
                     **kw)
        client.settings = settings  # all of them: the readers take the deployment's fetch_max_wait_ms
        return client

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
                f"({exc!r}): {CHECK_BROKER}") from exc
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
        """Send an admission request now (not after ``linger_ms``, with everything queued before it); the answer
        arrives as an ``admission`` decision for the run."""
        await self.publish(request)
        send_lingering_now(self._producer)

    async def set_manifest(self, manifest: TenantManifest) -> None:
        """Queue a tenant's budget manifest (the worker keeps the first with the tenant's highest version).

        Raises :class:`~processors.manifest.ManifestError`, listing every fix needed, for a manifest the worker
        would dead-letter (a slot cap above the total, a share without a workflow cap, ...); nothing is sent
        then. ``ctxflow tenants set`` also assigns the next version and detects races.
        """
        check_manifest(manifest)
        await self.publish(manifest)

    async def send_now(self, record: BaseModel) -> tuple[TopicPartition, int]:
        """Send one record at once and wait for the broker's acknowledgement; returns where it landed
        (partition and offset): an operator's command waits for the worker's commit past that offset."""
        if self._producer is None:
            raise CtxflowError("client is not started: use `async with CtxflowClient(...)` or await start()")
        spec = TOPIC_OF.get(type(record))
        if spec is None:
            raise TypeError(f"{type(record).__name__} is not a record agents publish")
        topic = self.topic(spec)
        await self.partitions(topic)  # refuses a missing topic instead of letting the broker create it
        meta = await self._producer.send_and_wait(topic, self.codec.encode(record), key=record_key(spec, record))
        return TopicPartition(topic, meta.partition), meta.offset

    async def send_raw(self, topic: str, key: bytes | None, value: bytes, *, urgent: bool = False) -> None:
        """Queue encoded bytes (tools, poison demos, benchmarks); waits while ``max_in_flight`` are unacknowledged.
        ``urgent`` sends it, and everything queued before it, now instead of after ``linger_ms`` (as
        :meth:`request_admission` does)."""
        if self._producer is None:
            raise CtxflowError("client is not started: use `async with CtxflowClient(...)` or await start()")
        if topic not in self._partitions_of:
            await self.partitions(topic)  # before the producer's metadata request for it, which would create it
        while self._in_flight >= self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        future = await self._producer.send(topic, value, key=key)
        self._in_flight += 1
        self._idle.clear()
        future.add_done_callback(functools.partial(self._acked, topic))
        if urgent:
            send_lingering_now(self._producer)

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
                                    f"{self.bootstrap!r}: {CHECK_BROKER}", []) from None
        if self._failed:
            failures, failed = self._failures, self._failed
            self._failures, self._failed = [], 0
            raise PublishFailed(f"{failed} records were not acknowledged by {self.bootstrap!r} "
                                f"(first: {failures[0][1]!r} on {failures[0][0]}): {CHECK_BROKER}", failures)

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
        return outgoing(record)

    async def recall(self, ctx: RunContext, query: str, *, scopes: Iterable[MemoryScope] = DEFAULT_SCOPES,
                     k: int = 5, embedding: Sequence[float] | None = None, publish: bool = True,
                     window: ContextWindow | None = None) -> list[RecallHit]:
        """The run's ``k`` best active memories for ``query`` (:mod:`streams.sdk.recall`): the run's tenant only,
        tenant-scope memories, its user's and its session's, ranked by cosine distance to ``embedding`` when given,
        else lexically. With ``publish`` each hit is reported as a retrieval turn (kind ``memory``, slot
        ``retrieved``, item id = memory id), so the budget counts it and the worker can tell the run when it goes
        stale (a ``stale_context`` decision); a memory this client already reported for the run (same version) is
        not reported again, so recalling it twice counts it once. With ``window``, each hit is added to it
        (:meth:`ContextWindow.add_memory`) unless the window holds it, and reported whenever it was added (again,
        after a decision took it out); a hit whose text this process cannot read is not added, only reported.
        Every hit is returned, held or not. Raises :class:`~streams.stack.query.QueryFailed` when no process
        answers queries (see ``ctxflow query``)."""
        hits = await asyncio.to_thread(find, self.settings, ctx, query, scopes=tuple(scopes), k=k,
                                       embedding=embedding)
        for hit in hits:
            added = window.add_memory(hit.memory_id, hit.text) if window is not None and hit.text is not None else None
            first = self._first_recall(ctx, hit)
            if publish and (added or (added is None and first)):
                await self.publish_turn(retrieval_turn(ctx, hit))
        return hits

    def _first_recall(self, ctx: RunContext, hit: RecallHit) -> bool:
        """Whether this client had not yet seen run ``ctx`` recall this version of the memory; notes it."""
        key = (ctx.tenant_id, ctx.run_id, hit.memory_id, hit.version)
        if key in self._recalled:
            return False
        self._recalled[key] = None
        if len(self._recalled) > _RECALLS_REMEMBERED:
            self._recalled.popitem(last=False)
        return True

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
        """Decisions for one tenant (and session, with its sub-agents' sessions, or run when given); see
        :class:`DecisionStream`."""
        return DecisionStream(self, tenant_id, session_id, run_id, from_beginning)

    async def manifest_log(self, timeout_s: float = 10.0) -> list[tuple[str, TenantManifest | None]]:
        """Every ``(tenant_id, manifest, or None for a null value)`` on the manifests topic up to its end as of
        the call, in offset order per partition (so per tenant). Undecodable records are logged and skipped: the
        worker dead-letters them too."""
        entries: list[tuple[str, TenantManifest | None]] = []
        if not await self._holds_records(self.topic(MANIFESTS)):
            return entries
        async with TopicReader(self, self.topic(MANIFESTS), from_beginning=True) as reader:
            for message in await reader.until_end(timeout_s):
                try:
                    value = None if message.value is None else self.codec.decode(message.value, TenantManifest)
                except RejectedRecord as error:
                    log.warning("skipping undecodable manifest at %s[%s]@%s: %s", message.topic,
                                 message.partition, message.offset, error)
                    continue
                key = message.key.decode() if message.key is not None else getattr(value, "tenant_id", "")
                entries.append((key, value))
        return entries

    async def _holds_records(self, topic: str) -> bool:
        """Whether any partition of ``topic`` has ever held a record (its end offset is above 0).

        Asked before reading a topic from the beginning, so a deployment without any opens no reader. (Such a
        read used to hang on closing, ``latest_manifest`` for over 90 s: not because the broker never answers
        fetches of partitions that never held a record, it answers after the fetch wait, but because measuring
        the end re-assigned the consumer, see :mod:`streams.runtime.log_end`.) Asking for end offsets sends no
        fetch.
        """
        partitions = await self.partitions(topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    client_id="ctxflow-sdk-reader")
        await consumer.start()
        try:
            return any(end > 0 for end in (await consumer.end_offsets(partitions)).values())
        finally:
            await consumer.stop()

    async def manifests(self, timeout_s: float = 10.0) -> dict[str, TenantManifest]:
        """The manifest the worker enforces for every tenant that has one (what ``ctxflow tenants list`` shows)."""
        return latest_per_tenant(await self.manifest_log(timeout_s))

    async def manifest_history(self, tenant_id: str, timeout_s: float = 10.0) -> list[TenantManifest]:
        """Every manifest published for ``tenant_id``, in publish order (any version, including ignored ones)."""
        return [m for key, m in await self.manifest_log(timeout_s) if key == tenant_id and m is not None]

    async def latest_manifest(self, tenant_id: str, timeout_s: float = 10.0) -> TenantManifest | None:
        """The manifest the worker enforces for ``tenant_id``: the first published with its highest version
        (:func:`streams.sdk.manifest_files.latest_per_tenant`)."""
        return latest_per_tenant([(tenant_id, m) for m in await self.manifest_history(tenant_id, timeout_s)]
                                 ).get(tenant_id)

    async def partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic``; raises :class:`TopicMissing` if it does not exist (see :mod:`streams.sdk`)."""
        if self._producer is None:
            raise CtxflowError("client is not started: use `async with CtxflowClient(...)` or await start()")
        if topic not in self._partitions_of:
            # Metadata for *all* topics: unlike a request naming the topic, it never makes the broker create it.
            cluster = await self._producer.client.fetch_all_metadata()
            if topic not in cluster.topics():
                raise TopicMissing(topic, self.settings)
            self._partitions_of[topic] = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic))]
        return self._partitions_of[topic]
