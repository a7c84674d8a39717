"""A seeded, realistic multi-tenant agent workload, and a driver that publishes it through the SDK.

:class:`Workload` is pure: it yields contract models, never touches Kafka, and the same seed and parameters
give the same events (ids included). Traffic: tenants on free/standard/enterprise tiers with their manifests;
concurrent long-running sessions of root runs that spawn sub-agent child runs; per run a started event, the
tenant's static system prompt and tool definitions (identical across runs, so digest caching matters), user
turns, assistant turns, tool call/result pairs (results sometimes large), retrieved chunks, scratchpad,
output, a usage report per provider call (some streams interrupted), sometimes memory candidates and
admission requests, and a finalized event. Some tenants and runs are ``no_retention``. One runaway tenant
has an agent that repeats the same tool call, piles up retrievals and never finalizes, so it crosses its
soft watermark and hard limit. Token counts are exact ``cl100k`` counts (text is built from words whose
counts are known). Events come out in timestamp order; timestamps advance from an injected start.

``eviction=True`` (the demo's workload) shows the eviction planner at work instead of only the budget: turns carry
identifiers and numbers an agent needs again (:mod:`streams.demo.story`), tenants choose strategies
(:data:`EVICTION_STRATEGIES`), one session of each masking or summarizing tenant outgrows its history cap, and the
runaway tenant asks for relief (``evict_and_compress``) instead of refusing at the hard limit, so its loop is
offloaded, compressed, swapped and recalled rather than rejected. Without it the traffic is what it always was.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    EvictionPolicy,
    EvictionStrategy,
    HardLimitBehaviour,
    ItemKind,
    OverflowBehaviour,
    PrivacyMode,
    Role,
    Slot,
    SlotCaps,
    SpendWindow,
    SpendWindowKind,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.demo.run_script import TOKENIZER, RunScript, SessionClock, text
from ctxflow.streams.demo.story import CaseFile, StoryScript
from ctxflow.streams.sdk import CtxflowClient, RunContext
from ctxflow.streams.topics import TURNS, USAGE, TopicSpec
from pydantic import BaseModel

__all__ = ["EVICTION_STRATEGIES", "DriveProgress", "GroundTruth", "PoisonRecord", "TenantProfile", "Workload",
           "drive"]

log = logging.getLogger(__name__)
_TIERS: dict[str, tuple[int, SlotCaps, OverflowBehaviour, HardLimitBehaviour, int, int]] = {
    # tier: total cap, slot caps, overflow, hard-limit, tokens per day, system prompt words
    "free": (16_000, SlotCaps(system=2_000, tools=3_000, retrieved=4_000, history=8_000,
                              scratchpad=2_000, output=2_000),
             OverflowBehaviour.REJECT, HardLimitBehaviour.REJECT, 10_000_000, 180),
    "standard": (64_000, SlotCaps(system=4_000, tools=6_000, retrieved=16_000, history=32_000,
                                  scratchpad=8_000, output=4_000),
                 OverflowBehaviour.EVICT_AND_COMPRESS, HardLimitBehaviour.TERMINATE_RUN, 60_000_000, 450),
    "enterprise": (200_000, SlotCaps(system=8_000, tools=12_000, scratchpad=16_000, output=8_000),
                   OverflowBehaviour.EVICT_AND_COMPRESS, HardLimitBehaviour.FLAG, 200_000_000, 900),
}
_TIER_CYCLE = ("enterprise", "standard", "free")
_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell", "cyberdyne", "wonka")
_MODELS = (("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4"), ("google", "gemini-2.0-flash"))
#: With ``eviction=True``: the strategy of the tenant at each index (the others keep the default, hybrid); each of
#: these tenants has one long session, the masking one a coding agent reading large files and logs.
EVICTION_STRATEGIES = {1: EvictionStrategy.OBSERVATION_MASKING, 4: EvictionStrategy.SUMMARIZATION}
#: With ``eviction=True``, the runaway tenant's policy: hybrid, compressing early and swapping before relief.
#: The demo replays about an hour of traffic in a minute, so a summary that takes the summarizer a fraction of a
#: second arrives tens of simulated seconds later; asking at 80% and swapping at 95% (the defaults) would let
#: relief at the soft watermark (85%) offload the summary's sources before it arrives.
RUNAWAY_POLICY = EvictionPolicy(compress_at=0.7, swap_at=0.75)


@dataclass(frozen=True)
class TenantProfile:
    """One simulated tenant: tier, model, privacy, whether its agent runs away, static prompt, manifest."""

    tenant_id: str
    tier: str
    provider: str
    model: str
    no_retention: bool
    runaway: bool
    users: tuple[str, ...]
    system_prompt: tuple[str, int]
    tool_defs: tuple[str, int]
    manifest: TenantManifest
    #: ``eviction=True`` only: one session outgrows its history cap; its agent reads code and logs (else orders).
    long_session: bool = False
    code: bool = False

    @property
    def prefix_hash(self) -> str:
        """Hash of the static prefix (system prompt + tool definitions) stamped on every run."""
        return hashlib.sha256((self.system_prompt[0] + self.tool_defs[0]).encode()).hexdigest()


@dataclass
class GroundTruth:
    """Token totals over distinct events (first of each ``event_id``): what a correct budget must report."""

    tenant_tokens: Counter[str] = field(default_factory=Counter)
    run_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)
    slot_tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    usage_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: int = 0


@dataclass(frozen=True)
class PoisonRecord:
    """Bytes that must end in the dead-letter topic with ``expected_reason``, never in a processor."""

    topic: TopicSpec
    key: bytes
    value: bytes
    expected_reason: str
    description: str


@dataclass(frozen=True)
class DriveProgress:
    """How far :func:`drive` got: events published (after manifests), wall seconds, achieved rate."""

    sent: int
    elapsed_s: float
    rate_eps: float


class Workload:
    """Seeded platform traffic: ``manifests()`` first, then ``events()`` in publish (timestamp) order.

    Guarantees: equal arguments give equal output; ``seq`` rises by one per event within a run; event ids
    are unique; a child run's ``workflow_id`` is its root's run id; privacy never weakens down a workflow;
    normal runs stay under ``0.6`` of every cap; the runaway run (first session of tenant index 2, the first
    free tier, or of the last tenant when there are fewer) grows without end. With ``eviction=True`` the first
    session of each tenant in :data:`EVICTION_STRATEGIES` is long too (its runs add twice their history cap) and
    the runaway and long runs are never ``no_retention``; every turn's token count is still exact and counts what
    entered, so :meth:`ground_truth` holds whatever the planner frees. ``events()`` stops after ``duration_s``
    simulated seconds or ``max_events`` events, and never stops when both are ``None``.
    """

    def __init__(self, seed: int, *, tenants: int = 5, sessions_per_tenant: int = 3,
                 duration_s: float | None = None, max_events: int | None = None,
                 start: datetime = datetime(2025, 1, 6, 9, 0, tzinfo=UTC), runaway: bool = True,
                 no_retention_run_share: float = 0.08, eviction: bool = False) -> None:
        if tenants < 1 or sessions_per_tenant < 1:
            raise ValueError("a workload needs at least one tenant and one session per tenant")
        self.seed, self.sessions_per_tenant, self.eviction = seed, sessions_per_tenant, eviction
        self.duration_s, self.max_events = duration_s, max_events
        self.start = start.replace(microsecond=start.microsecond // 1000 * 1000)
        self.no_retention_run_share = no_retention_run_share
        rng = random.Random(f"{seed}:tenants")
        self.tenants = [self._profile(rng, i, runaway and i == min(2, tenants - 1)) for i in range(tenants)]

    def _profile(self, rng: random.Random, i: int, runaway: bool) -> TenantProfile:
        tier = _TIER_CYCLE[i % len(_TIER_CYCLE)]
        tenant_id = _NAMES[i % len(_NAMES)] + (f"-{i // len(_NAMES)}" if i >= len(_NAMES) else "")
        total, caps, overflow, hard, per_day, prompt_words = _TIERS[tier]
        provider, model = _MODELS[i % len(_MODELS)]
        manifest = TenantManifest(
            tenant_id=tenant_id, version=1, tier=tier, slot_caps=caps, total_cap=total, overflow=overflow,
            hard_limit=hard, spend_windows=[SpendWindow(window=SpendWindowKind.DAY, max_tokens=per_day)],
            # Billed tokens grow with every call (each bills the whole prompt), so run caps sit well above the
            # context cap: only a looping run reaches them.
            run_cap_tokens=25 * total, workflow_cap_tokens=75 * total, subagent_share=0.5,
            tokenizers={model: TOKENIZER}, updated_at=self.start, updated_by="workload",
        )
        strategy = EVICTION_STRATEGIES.get(i) if self.eviction else None
        if strategy is not None:  # a tenant that runs long sessions sizes its run caps for them
            manifest = manifest.model_copy(update={"eviction": EvictionPolicy(strategy=strategy),
                                                   "run_cap_tokens": 100 * total, "workflow_cap_tokens": 300 * total})
        elif self.eviction and runaway:
            manifest = manifest.model_copy(update={"overflow": OverflowBehaviour.EVICT_AND_COMPRESS,
                                                   "eviction": RUNAWAY_POLICY})
        return TenantProfile(
            tenant_id=tenant_id, tier=tier, provider=provider, model=model, no_retention=i % 5 == 3,
            runaway=runaway, users=tuple(f"{tenant_id}-user-{j}" for j in range(rng.randint(2, 5))),
            system_prompt=text(rng, prompt_words, f"You are the {tenant_id} assistant. Follow this policy:"),
            tool_defs=text(rng, rng.randint(250, 400), "Tools available:"), manifest=manifest,
            long_session=strategy is not None, code=strategy is EvictionStrategy.OBSERVATION_MASKING,
        )

    def manifests(self) -> list[TenantManifest]:
        """Every tenant's manifest (version 1), to publish before the events."""
        return [t.manifest for t in self.tenants]

    @property
    def runaway_tenant(self) -> TenantProfile | None:
        """The tenant whose agent loops, if the workload has one."""
        return next((t for t in self.tenants if t.runaway), None)

    def events(self) -> Iterator[BaseModel]:
        """Every event in publish order: sessions interleaved by timestamp, ties broken by session."""
        rng = random.Random(f"{self.seed}:events")

        def ids() -> str:
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))

        warm: set[str] = set()
        heap: list[tuple[int, int, BaseModel, Iterator[tuple[int, BaseModel]]]] = []
        for order, (tenant, index) in enumerate(
                (t, s) for t in self.tenants for s in range(self.sessions_per_tenant)):
            session = self._session(rng, ids, warm, tenant, index, SessionClock(self.start, rng.randint(0, 30_000)))
            ms, first = next(session)
            heapq.heappush(heap, (ms, order, first, session))
        horizon = None if self.duration_s is None else int(self.duration_s * 1000)
        emitted = 0
        while heap and (self.max_events is None or emitted < self.max_events):
            ms, order, model, session = heapq.heappop(heap)
            if horizon is not None and ms > horizon:
                return
            yield model
            emitted += 1
            ms, model = next(session)  # sessions never end: runs follow runs until the horizon
            heapq.heappush(heap, (ms, order, model, session))

    def _session(self, rng: random.Random, ids: Callable[[], str], warm: set[str], t: TenantProfile,
                 index: int, clock: SessionClock) -> Iterator[tuple[int, BaseModel]]:
        session_id, user_id = ids(), rng.choice(t.users)
        case = CaseFile(rng, t.tenant_id) if self.eviction else None
        runaway, long = t.runaway and index == 0, t.long_session and index == 0
        while True:
            # The runaway and long runs stay retained in an eviction workload: the summarizer needs their text.
            private = t.no_retention or (not (case and (runaway or long))
                                         and rng.random() < self.no_retention_run_share)
            ctx = RunContext(
                tenant_id=t.tenant_id, user_id=user_id, session_id=session_id, agent_id="assistant",
                model=t.model, privacy=PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED,
                policy_version=f"{t.tenant_id}-policy-v{t.manifest.version}", prefix_hash=t.prefix_hash,
                clock=clock, id_factory=ids,
            )
            script = RunScript(rng, t, ctx, clock, warm) if case is None else StoryScript(
                rng, t, ctx, clock, warm, case, code=t.code, long=long)
            yield from script.play(runaway=runaway)
            clock.advance(rng, 5_000, 90_000)  # the user reads the answer and thinks

    def poison_records(self, codec: Codec | None = None) -> list[PoisonRecord]:
        """Bad records for dead-letter demos, each with the reason code a consumer must give it.

        Garbage, a truncated turn, a turn under an unknown schema id, and a well-framed usage report with
        negative tokens (built past validation, as a buggy producer would).
        """
        codec = codec or Codec()
        tenant = self.tenants[0]
        ctx = RunContext(tenant_id=tenant.tenant_id, user_id=tenant.users[0], session_id="poison-session",
                         agent_id="poison", model=tenant.model, clock=lambda: self.start)
        turn = codec.encode(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "a perfectly fine turn"))
        usage = ctx.usage(provider=tenant.provider, input_tokens=1, output_tokens=1, latency_ms=1)
        negative = usage.model_copy(update={"input_tokens": -5, "output_tokens": -7})  # skips validation
        key = tenant.tenant_id.encode()
        # The unknown-fingerprint record keeps a valid body and frame, only the schema id is one nobody wrote.
        stranger = turn[:2] + b"\xde\xad\xbe\xef\xde\xad\xbe\xef" + turn[10:] if turn[:1] == b"\xc3" else (
            turn[:1] + (2**31 - 1).to_bytes(4, "big") + turn[5:])
        return [
            PoisonRecord(TURNS, key, b"{\"not\": \"avro\"}\xff", "undecodable", "garbage bytes"),
            PoisonRecord(TURNS, key, turn[: len(turn) // 2], "undecodable", "a turn cut in half"),
            PoisonRecord(TURNS, key, stranger, "unknown_schema", "a turn under an unknown schema id"),
            PoisonRecord(USAGE, key, codec.encode(negative), "contract_violation", "negative token counts"),
        ]

    @staticmethod
    def ground_truth(events: Iterable[BaseModel]) -> GroundTruth:
        """Per-tenant, per-run and per-slot turn tokens and per-tenant usage, counting each event id once."""
        truth, seen = GroundTruth(), set()
        for event in events:
            if not isinstance(event, TurnEvent | UsageReport) or event.event_id in seen:
                continue
            seen.add(event.event_id)
            truth.events += 1
            if isinstance(event, TurnEvent):
                tokens = event.token_count or 0
                truth.tenant_tokens[event.tenant_id] += tokens
                truth.run_tokens[(event.tenant_id, event.run_id)] += tokens
                truth.slot_tokens[(event.tenant_id, event.run_id, event.slot.value)] += tokens
            else:
                for kind in ("input", "output", "cached_read", "cache_write", "reasoning"):
                    truth.usage_tokens[(event.tenant_id, kind)] += getattr(event, f"{kind}_tokens")
        return truth


async def drive(client: CtxflowClient, workload: Workload, rate_eps: float | None, duration_s: float | None,
                on_progress: Callable[[DriveProgress], None] | None = None, *, progress_every_s: float = 1.0,
                ) -> DriveProgress:
    """Publish the manifests, then the events at about ``rate_eps`` (``None``: as fast as acks allow).

    Stops when the workload ends or after ``duration_s`` wall seconds, flushes (raising ``PublishFailed``
    if anything was lost), reports progress every ``progress_every_s`` and at the end, and returns the
    final progress. Waits only to hold the target rate.
    """
    for manifest in workload.manifests():
        await client.set_manifest(manifest)
    loop = asyncio.get_running_loop()
    began = next_report = loop.time()
    sent = 0

    def progress() -> DriveProgress:
        elapsed = loop.time() - began
        return DriveProgress(sent=sent, elapsed_s=elapsed, rate_eps=sent / elapsed if elapsed > 0 else 0.0)

    for event in workload.events():
        now = loop.time()
        if duration_s is not None and now - began >= duration_s:
            break
        if rate_eps:
            ahead = began + sent / rate_eps - now
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        await client.publish(event)
        sent += 1
        if on_progress is not None and loop.time() >= next_report:
            next_report += progress_every_s
            on_progress(progress())
    await client.flush()
    final = progress()
    if on_progress is not None:
        on_progress(final)
    log.info("workload drive done: %d events in %.1fs (%.0f/s)", final.sent, final.elapsed_s, final.rate_eps)
    return final
