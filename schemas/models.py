"""Pydantic mirrors of the newest version of every Avro record in ``schemas/avro``.

Field names, optionality and defaults are identical to the Avro schemas; validators add what Avro cannot
say (tenant id pattern, non-negative counts, ranges, digests). A model that validates always encodes.
Models are frozen and reject unknown fields.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""Tenant ids: non-empty, no ':' (reserved as the key separator), at most 128 characters."""

_INT_MAX = 2**31 - 1
_LONG_MAX = 2**63 - 1

TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
Id = Annotated[str, StringConstraints(min_length=1)]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=_LONG_MAX)]
Count32 = Annotated[int, Field(ge=0, le=_INT_MAX)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Share = Annotated[float, Field(gt=0.0, le=1.0)]


def _to_float32(value: float) -> float:
    # Avro ``float`` is 32-bit: rounding here makes decode(encode(m)) == m hold exactly.
    return array("f", (value,))[0]


def _embedding(values: list[float]) -> list[float]:
    packed = array("f", values)
    # A finite double sum of float32 values cannot overflow, so a non-finite sum means a non-finite element.
    if not math.isfinite(sum(packed)):
        raise ValueError("embedding values must be finite and within float32 range")
    return packed.tolist()


def _utc_millis(value: datetime) -> datetime:
    # Avro timestamp-millis keeps whole UTC milliseconds: normalising here makes round trips exact.
    if value.tzinfo is not UTC or value.microsecond % 1000:
        value = value.astimezone(UTC)
        value = value.replace(microsecond=value.microsecond - value.microsecond % 1000)
    return value


Timestamp = Annotated[AwareDatetime, AfterValidator(_utc_millis)]
Float32Fraction = Annotated[float, Field(ge=0.0, le=1.0), AfterValidator(_to_float32)]
Embedding = Annotated[list[float], AfterValidator(_embedding)]


def content_digest(text: str) -> str:
    """The contract's content digest: lowercase hex sha256 of the UTF-8 bytes of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_digest(content: str | None, digest: str | None) -> None:
    if content is None:
        if digest is None:
            raise ValueError("content_digest is required when content is null")
    elif digest is not None and digest != content_digest(content):
        raise ValueError(
            "content_digest is not the sha256 of content: compute it with schemas.content_digest(content)"
        )


class Slot(StrEnum):
    """Budget slot of a context item."""

    SYSTEM = "system"
    TOOLS = "tools"
    RETRIEVED = "retrieved"
    HISTORY = "history"
    SCRATCHPAD = "scratchpad"
    OUTPUT = "output"


class ContextLayer(StrEnum):
    """Where a context item comes from, for cost and replay (TurnEvent v4 ``layer``; null: derived)."""

    GLOBAL = "global"
    TENANT = "tenant"
    USER = "user"
    RETRIEVED = "retrieved"
    SESSION = "session"


class Role(StrEnum):
    """Author of a context item."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ItemKind(StrEnum):
    """What a context item is."""

    MESSAGE = "message"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    RETRIEVED_CHUNK = "retrieved_chunk"
    MEMORY = "memory"
    SUMMARY = "summary"


class PrivacyMode(StrEnum):
    """Whether payloads may be stored anywhere durable."""

    RETAINED = "retained"
    NO_RETENTION = "no_retention"


class RunPhase(StrEnum):
    """Run boundary."""

    STARTED = "started"
    FINALIZED = "finalized"


class RunStatus(StrEnum):
    """How a run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class OverflowBehaviour(StrEnum):
    """What happens as a context cap fills: ask for eviction, or none and refuse at the hard limit."""

    EVICT_AND_COMPRESS = "evict_and_compress"
    REJECT = "reject"


class HardLimitBehaviour(StrEnum):
    """What reaching a context cap's hard limit does (spend limits announce exhaustion either way)."""

    REJECT = "reject"
    FLAG = "flag"
    TERMINATE_RUN = "terminate_run"


class SpendWindowKind(StrEnum):
    """Length of a spend window."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class MemoryScope(StrEnum):
    """Who may see a memory (a security boundary)."""

    GLOBAL = "global"
    TENANT = "tenant"
    USER = "user"
    SESSION = "session"


class MemoryType(StrEnum):
    """What a memory means."""

    POLICY = "policy"
    PREFERENCE = "preference"
    FACT = "fact"
    EPISODE = "episode"
    TRACE = "trace"


class MemoryStatus(StrEnum):
    """Lifecycle state of a memory; only ``active`` is retrievable."""

    PROVISIONAL = "provisional"
    ACTIVE = "active"
    QUARANTINED = "quarantined"
    REVOKED = "revoked"
    #: Replaced by a newer record that contradicts it on the same subject and attribute (MemoryRecord v2).
    SUPERSEDED = "superseded"
    #: Evicted from the long-term store, kept in the object store (``archive_ref``); ``ctxflow memory rehydrate``
    #: brings it back as it was (MemoryRecord v3).
    ARCHIVED = "archived"


class ReviewAction(StrEnum):
    """What a reviewer decides about a quarantined record (``ctxflow memory review``)."""

    REINSTATE = "reinstate"
    CORRECT = "correct"
    REVOKE = "revoke"


class MemoryCommandKind(StrEnum):
    """What an operator's :class:`MemoryCommand` does."""

    REVIEW = "review"
    DELETE = "delete"
    REHYDRATE = "rehydrate"
    PIN = "pin"
    UNPIN = "unpin"
    #: v2: apply retention as of ``issued_at`` (the tenant's records whose lifetime ended become tombstones), for a
    #: tenant whose own records no longer move its event-time clock (:mod:`processors.memory.expiry`).
    EXPIRE = "expire"


class Verification(StrEnum):
    """Evidence that a memory candidate is true; tenant-scoped facts need one other than ``none``."""

    NONE = "none"
    HUMAN_APPROVED = "human_approved"
    SYSTEM_OF_RECORD = "system_of_record"
    CORROBORATED = "corroborated"


class Sensitivity(StrEnum):
    """Whether a memory's content holds personal data."""

    NONE = "none"
    PII = "pii"


class ReviewState(StrEnum):
    """Where the review of a quarantined memory stands."""

    NONE = "none"
    OPEN = "open"
    REINSTATED = "reinstated"
    CORRECTED = "corrected"
    REVOKED = "revoked"


class VerdictOutcome(StrEnum):
    """What the memory gate did with a candidate."""

    ACCEPTED = "accepted"
    MERGED = "merged"
    REJECTED = "rejected"


class DecisionKind(StrEnum):
    """What a decision is about."""

    BUDGET_STATE = "budget_state"
    EVICTION_REQUEST = "eviction_request"
    REJECTION = "rejection"
    SPEND_EXHAUSTED = "spend_exhausted"
    ADMISSION = "admission"
    USAGE_RECONCILED = "usage_reconciled"
    EVICT = "evict"
    MASK = "mask"
    COMPRESS = "compress"
    SWAP = "swap"
    OFFLOAD = "offload"
    RECALL = "recall"
    #: A memory a live run retrieved was revoked, superseded, quarantined or archived (Decision v4).
    STALE_CONTEXT = "stale_context"


class BudgetState(StrEnum):
    """Budget watermark state."""

    OK = "ok"
    SOFT = "soft"
    HARD = "hard"


class ItemAction(StrEnum):
    """What to do with a context item."""

    EVICT = "evict"
    COMPRESS = "compress"
    OFFLOAD = "offload"
    MASK = "mask"
    SWAP = "swap"
    RECALL = "recall"


class EvictionStrategy(StrEnum):
    """How the eviction planner chooses what leaves a run's context (a string on the wire: an open set)."""

    SLIDING_WINDOW = "sliding_window"
    LRU = "lru"
    IMPORTANCE = "importance"
    RELEVANCE = "relevance"
    OBSERVATION_MASKING = "observation_masking"
    SUMMARIZATION = "summarization"
    RETRIEVAL_AUGMENTED = "retrieval_augmented"
    HYBRID = "hybrid"


class InvalidationKind(StrEnum):
    """Why a derived artifact must no longer be served."""

    TOMBSTONE = "tombstone"
    INVALIDATION = "invalidation"
    STALE_CONTEXT = "stale_context"


class RejectReason(StrEnum):
    """Known dead-letter reason codes (the Avro field is an open string)."""

    UNDECODABLE = "undecodable"
    UNKNOWN_SCHEMA = "unknown_schema"
    CONTRACT_VIOLATION = "contract_violation"
    PROCESSING_ERROR = "processing_error"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: Term digests a turn carries at most (:class:`ContentFeatures`): 4 bytes each.
MAX_CARRIED_TERMS = 64


def _term_digests(value: bytes) -> bytes:
    if len(value) % 4:
        raise ValueError(f"term digests are 4 bytes each: {len(value)} bytes is not a whole number of them")
    return value


class ContentFeatures(_Record):
    """What a turn's text carries for eviction, computed where the turn is written (the SDK), so the worker does
    not read the text again (:mod:`processors.eviction.features`): hashed identifiers and numbers, how many there
    are, and whether it states a goal, a constraint or a decision. ``version`` is the extractor's."""

    version: Annotated[int, Field(ge=1, le=_INT_MAX)]
    term_digests: Annotated[bytes, Field(max_length=4 * MAX_CARRIED_TERMS), AfterValidator(_term_digests)]
    terms: Count32
    goal: bool
    constraint: bool
    decision: bool


class TurnEvent(_Record):
    """One context item entering a run's working set (topic ``turns``, schema TurnEvent v5).

    Guarantees: ``content_digest`` is present when ``content`` is null and matches ``content`` when both are
    given; counts are non-negative; ``importance``/``relevance`` lie in [0, 1] at float32 precision.
    """

    event_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    parent_run_id: Id | None = None
    agent_id: Id
    seq: Count
    role: Role
    kind: ItemKind
    slot: Slot
    item_id: Id
    content: str | None = None
    content_digest: Digest | None = None
    token_count: Count32 | None = None
    model: Id
    importance: Float32Fraction | None = None
    tier_hint: Annotated[int, Field(ge=0, le=3)] | None = None
    embedding: Embedding | None = None
    privacy: PrivacyMode = PrivacyMode.RETAINED
    occurred_at: Timestamp
    tool_call_id: Id | None = None
    relevance: Float32Fraction | None = None
    #: A tool_call item: every tool-call id it issued (``tool_call_id`` is the first).
    tool_call_ids: list[Id] = Field(default_factory=list)
    #: The item's context layer; None: derived from slot and kind (``processors.envelopes.layers``).
    layer: ContextLayer | None = None
    #: The text's content features as the writer computed them; None: the worker extracts them from ``content``.
    features: ContentFeatures | None = None

    @model_validator(mode="after")
    def _digest_matches(self) -> Self:
        _check_digest(self.content, self.content_digest)
        return self


class UsageReport(_Record):
    """Token usage of one provider call (topic ``usage``); every count is non-negative.

    The five token kinds are disjoint, each token of the call counted in exactly one, so their sum is the
    call's total and pricing charges each kind once (:mod:`processors.pricing`):

    - ``input_tokens``: prompt tokens at the full input price, neither read from nor written to the cache;
    - ``cached_read_tokens``: prompt tokens served from the provider's prompt cache;
    - ``cache_write_tokens``: prompt tokens this call wrote to the provider's prompt cache;
    - ``output_tokens``: generated tokens other than reasoning (text, tool calls, refusals);
    - ``reasoning_tokens``: generated reasoning (hidden or summarized thinking), billed as output.

    OpenAI and OpenTelemetry GenAI count cached tokens inside the prompt and reasoning inside the completion;
    Anthropic's ``input_tokens`` excludes cache reads and writes. ``streams.sdk.usage`` normalizes each.
    ``complete=False`` marks partial counts from an interrupted stream.
    """

    event_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    agent_id: Id
    call_id: Id
    provider: Id
    model: Id
    input_tokens: Count
    output_tokens: Count
    cached_read_tokens: Count = 0
    cache_write_tokens: Count = 0
    reasoning_tokens: Count = 0
    latency_ms: Count32
    streamed: bool = False
    complete: bool = True
    occurred_at: Timestamp


class RunEvent(_Record):
    """A run boundary (topic ``runs``).

    Guarantees: ``status`` is set exactly when ``phase`` is finalized; a root run (no parent) is its own
    workflow (``workflow_id == run_id``).
    """

    event_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    parent_run_id: Id | None = None
    workflow_id: Id
    agent_id: Id
    phase: RunPhase
    status: RunStatus | None = None
    policy_version: str | None = None
    prefix_hash: str | None = None
    model: str | None = None
    privacy: PrivacyMode = PrivacyMode.RETAINED
    occurred_at: Timestamp

    @model_validator(mode="after")
    def _phase_and_tree(self) -> Self:
        if (self.phase is RunPhase.FINALIZED) != (self.status is not None):
            raise ValueError("status is required on a finalized run and must be null on a started run")
        if self.parent_run_id is None and self.workflow_id != self.run_id:
            raise ValueError("a root run (parent_run_id null) must have workflow_id equal to run_id")
        return self


class AdmissionRequest(_Record):
    """A run asking whether its planned context fits (topic ``admissions``); planned tokens per slot."""

    request_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    agent_id: Id
    model: Id
    planned: dict[Slot, Count]
    requested_at: Timestamp


class SlotCaps(_Record):
    """Per-slot token caps; ``None`` means no cap on that slot."""

    system: Count | None = None
    tools: Count | None = None
    retrieved: Count | None = None
    history: Count | None = None
    scratchpad: Count | None = None
    output: Count | None = None


class SpendWindow(_Record):
    """A token and/or cost limit over one calendar window."""

    window: SpendWindowKind
    max_tokens: Count | None = None
    max_cost_micros: Count | None = None


class UserOverride(_Record):
    """Manifest fields one user shadows: a non-null field wins over the tenant's value."""

    total_cap: Count | None = None
    soft_watermark: Share | None = None
    run_cap_tokens: Count | None = None
    spend_windows: list[SpendWindow] | None = None


class TierQoS(_Record):
    """How soft a tier's context budgets are: hard at ``cap * grace``, evict down to ``cap * evict_to``."""

    grace: Annotated[float, Field(ge=1.0, le=4.0)]
    evict_to: Annotated[float, Field(gt=0.0, lt=1.0)]


class EvictionPolicy(_Record):
    """How the eviction planner relieves a tenant's context pressure (manifest v3; null: hybrid, these defaults)."""

    strategy: EvictionStrategy = EvictionStrategy.HYBRID
    compress_at: Fraction = 0.8
    swap_at: Fraction = 0.95
    compress_share: Share = 0.3
    min_gain: Fraction = 0.1
    keep_recent: Annotated[int, Field(ge=0, le=1000)] = 4

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> Self:
        if self.compress_at > self.swap_at:
            raise ValueError("compress_at must not exceed swap_at: compression is requested before the swap")
        return self


class MemoryGovernance(_Record):
    """A tenant's memory gate settings (manifest v4, approvers v6; null: no retention rules, no trusted systems, no
    bootstrap)."""

    #: Named rules under which personal data may be kept; a candidate with PII must cite one of them.
    retention_rules: list[Id] = Field(default_factory=list)
    #: Systems of record whose confirmation verifies a tenant fact.
    trusted_systems: list[Id] = Field(default_factory=list)
    #: v6: who may approve (``human_approved`` with ``verified_by``): a tenant fact or episode, or revoked content
    #: coming back. Empty: any named approver counts (as before v6); a tenant that lists them closes the gate to
    #: an agent claiming an approval nobody gave.
    approvers: list[Id] = Field(default_factory=list)
    #: Until then, unverified tenant facts and episodes are admitted, flagged ``bootstrap_loosened``.
    bootstrap_until: Timestamp | None = None
    min_confidence: Fraction = 0.5
    min_corroborating_runs: Annotated[int, Field(ge=1, le=_INT_MAX)] = 2
    #: Content above this many UTF-8 bytes goes to the payload store instead of the record.
    inline_max_bytes: Annotated[int, Field(ge=1, le=_LONG_MAX)] = 8192


class MemoryStore(_Record):
    """A tenant's long-term memory store: quota and retention (manifest v5; null: no quota, kept until deleted)."""

    #: Most live records the store holds; None: no quota.
    record_quota: Annotated[int, Field(ge=1, le=_LONG_MAX)] | None = None
    #: At this share of the quota the store evicts, down to ``evict_to`` (seed 002: 85% -> 70%).
    evict_at: Share = 0.85
    evict_to: Share = 0.70
    #: Days a record of a memory type (key) lives after its last update; absent: forever.
    retention_days: dict[Id, Annotated[int, Field(ge=0, le=_LONG_MAX)]] = Field(default_factory=dict)
    #: Days personal data kept under a retention rule (key) lives; absent: its type's retention.
    rule_retention_days: dict[Id, Annotated[int, Field(ge=0, le=_LONG_MAX)]] = Field(default_factory=dict)


class TenantManifest(_Record):
    """A tenant's versioned budget manifest (topic ``manifests``, compacted by tenant_id).

    Precedence: a user override field (when non-null) > this manifest's field > built-in defaults.
    """

    tenant_id: TenantId
    version: Annotated[int, Field(ge=1, le=_LONG_MAX)]
    tier: Id
    slot_caps: SlotCaps
    total_cap: Count
    soft_watermark: Share = 0.85
    overflow: OverflowBehaviour = OverflowBehaviour.EVICT_AND_COMPRESS
    hard_limit: HardLimitBehaviour = HardLimitBehaviour.REJECT
    spend_windows: list[SpendWindow] = Field(default_factory=list)
    run_cap_tokens: Count | None = None
    workflow_cap_tokens: Count | None = None
    subagent_share: Share | None = None
    tokenizers: dict[Id, Id] = Field(default_factory=dict)
    user_overrides: dict[Id, UserOverride] = Field(default_factory=dict)
    updated_at: Timestamp
    updated_by: str | None = None
    #: The tier's QoS (a user-defined tier, or a built-in one retuned); None: the built-in row of the tier.
    qos: TierQoS | None = None
    #: The eviction policy; None: hybrid with :class:`EvictionPolicy`'s defaults.
    eviction: EvictionPolicy | None = None
    #: Memory gate settings (v4); None: :class:`MemoryGovernance`'s defaults.
    memory: MemoryGovernance | None = None
    #: The long-term memory store's quota and retention (v5); None: no quota, kept until deleted.
    memory_store: MemoryStore | None = None


class MemoryCandidate(_Record):
    """Session state proposed for durable memory (topic ``memory.candidates``); digest always present."""

    event_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    agent_id: Id
    candidate_id: Id
    scope: MemoryScope
    type: MemoryType
    content: str | None = None
    content_digest: Digest
    source_item_ids: list[Id] = Field(default_factory=list)
    confidence: Fraction
    privacy: PrivacyMode = PrivacyMode.RETAINED
    occurred_at: Timestamp
    # --- v2: precise conflicts, verification evidence, sub-agent provenance, PII retention ---
    #: What the memory is about (an entity id or name); with ``attribute``, the key of a contradiction.
    subject: str | None = None
    #: Which property of ``subject`` it states.
    attribute: str | None = None
    #: The stated value; compared after unit and format normalisation.
    value: str | None = None
    verification: Verification = Verification.NONE
    #: The approver id or the system of record's name.
    verified_by: str | None = None
    #: Other runs that independently produced the same candidate (``verification=corroborated``).
    corroborating_run_ids: list[Id] = Field(default_factory=list)
    #: Set on a sub-agent's output: the run that spawned the producing run.
    parent_run_id: Id | None = None
    #: The sub-agent whose output this is.
    produced_by_agent: Id | None = None
    #: The named retention rule under which personal data in the content may be kept.
    retention_rule: str | None = None
    # --- v3 ---
    #: Embedding of the content: the retrieval projection ranks by cosine distance to it.
    embedding: Embedding | None = None

    @model_validator(mode="after")
    def _digest_matches(self) -> Self:
        _check_digest(self.content, self.content_digest)
        return self


class MemoryRecord(_Record):
    """Canonical durable memory (topic ``memory.records``, compacted by ``tenant_id:memory_id``).

    ``content`` is null when the payload lives in the object store (``payload_ref``) or after revocation
    (a tombstone keeps the digest and provenance, never the text).
    """

    memory_id: Id
    tenant_id: TenantId
    user_id: Id | None = None
    session_id: Id | None = None
    scope: MemoryScope
    type: MemoryType
    status: MemoryStatus
    version: Count
    content: str | None = None
    content_digest: Digest
    source_run_id: Id | None = None
    source_candidate_id: Id | None = None
    created_at: Timestamp
    updated_at: Timestamp
    expires_at: Timestamp | None = None
    reason: str | None = None
    # --- v2: identity owner, precise conflicts, sensitivity, provenance, supersession, review ---
    #: The owner inside the scope (user id, session id; null for tenant): part of the identity.
    owner_id: str | None = None
    subject: str | None = None
    attribute: str | None = None
    value: str | None = None
    verification: Verification = Verification.NONE
    sensitivity: Sensitivity = Sensitivity.NONE
    #: Kinds of personal data found (presidio entity types, e.g. ``EMAIL_ADDRESS``).
    pii_kinds: list[str] = Field(default_factory=list)
    retention_policy: str | None = None
    #: The memory policy (gate rules) version that admitted the record.
    policy_version: str | None = None
    parent_run_id: str | None = None
    produced_by_agent: str | None = None
    #: Object-store key of the content when above the inline threshold (``content`` is then null).
    payload_ref: str | None = None
    supersedes: str | None = None
    superseded_by: str | None = None
    review_state: ReviewState = ReviewState.NONE
    #: Candidates merged into this record as exact or near duplicates.
    merge_count: Count = 0
    #: Admitted only because the tenant's bootstrap period loosened the gate.
    bootstrap_loosened: bool = False
    # --- v3: retrieval and the long-term store ---
    embedding: Embedding | None = None
    #: Never evicted from the long-term store.
    pinned: bool = False
    #: Object-store key of the record as it was when evicted (status ``archived``).
    archive_ref: str | None = None

    @model_validator(mode="after")
    def _digest_matches(self) -> Self:
        _check_digest(self.content, self.content_digest)
        return self


class ItemDecision(_Record):
    """What to do with one context item and how many tokens that frees."""

    item_id: Id
    action: ItemAction
    tokens: Count


class SummaryProvenance(_Record):
    """Where a summary came from and how faithful it is (on ``compress`` and ``swap`` decisions)."""

    summary_id: Id
    text: str | None = None
    token_count: Count
    source_ids: list[Id]
    source_digests: list[Digest]
    summarizer: Id
    summarizer_version: Id
    depth: Annotated[int, Field(ge=1, le=2)]
    fidelity: Float32Fraction


class StaleMemory(_Record):
    """A memory a run retrieved that is no longer served (on ``stale_context`` decisions)."""

    memory_id: Id
    #: What it became: revoked, superseded, quarantined, archived.
    status: Id
    replaced_by: Id | None = None


class Decision(_Record):
    """Output of the governor (topic ``decisions``, key ``tenant_id:run_id``).

    ``decision_id`` is derived from the source event by the producer, so a replay yields the same id.
    """

    decision_id: Id
    tenant_id: TenantId
    user_id: Id | None = None
    session_id: Id | None = None
    run_id: Id | None = None
    kind: DecisionKind
    slot: Slot | None = None
    state: BudgetState | None = None
    previous_state: BudgetState | None = None
    used_tokens: Count | None = None
    cap_tokens: Count | None = None
    window: SpendWindowKind | None = None
    admitted: bool | None = None
    request_id: Id | None = None
    reason: str
    actions: list[ItemDecision] = Field(default_factory=list)
    source_event_id: Id | None = None
    manifest_version: Annotated[int, Field(ge=1, le=_LONG_MAX)] | None = None
    decided_at: Timestamp
    #: ``usage_reconciled``: the part of ``used_tokens`` estimated from the working set, not reported.
    estimated_tokens: Count | None = None
    #: ``usage_reconciled``: reported minus the working-set estimate (null for a run with missing or partial usage).
    discrepancy_tokens: Annotated[int, Field(ge=-_LONG_MAX - 1, le=_LONG_MAX)] | None = None
    #: Eviction decisions: the strategy that chose the items.
    strategy: str | None = None
    #: Eviction decisions: the policy applied (manifest and planner versions).
    policy_version: str | None = None
    #: Eviction decisions: working-set tokens freed.
    tokens_freed: Count | None = None
    summary: SummaryProvenance | None = None
    #: Eviction decisions: expected cost effect on the next call, micro-USD (positive: a cache invalidation).
    cost_effect_micros: Annotated[int, Field(ge=-_LONG_MAX - 1, le=_LONG_MAX)] | None = None
    job_id: Id | None = None
    #: ``stale_context``: the retrieved memories no longer served, and their replacements.
    stale: list[StaleMemory] = Field(default_factory=list)


class CompressionSource(_Record):
    """One item a compression job summarizes, and where its content is on the log."""

    item_id: Id
    content_digest: Digest
    tokens: Count
    depth: Annotated[int, Field(ge=0, le=2)]
    topic: Id
    partition: Count32
    offset: Count
    label: str | None = None


class CompressionJob(_Record):
    """A request to summarize a run's oldest items of one slot (topic ``compression.jobs``, key ``tenant_id``)."""

    job_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    slot: Slot
    sources: list[CompressionSource]
    max_tokens: Count
    policy_version: str | None = None
    model: str | None = None
    requested_at: Timestamp


class Summary(_Record):
    """A prepared summary of a compression job's sources (topic ``summaries``, key ``tenant_id``)."""

    summary_id: Id
    job_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    slot: Slot
    text: str
    token_count: Count
    source_ids: list[Id]
    source_digests: list[Digest]
    summarizer: Id
    summarizer_version: Id
    depth: Annotated[int, Field(ge=1, le=2)]
    fidelity: Float32Fraction
    produced_at: Timestamp


class Invalidation(_Record):
    """A derived artifact that must no longer be served (topic ``invalidations``)."""

    invalidation_id: Id
    tenant_id: TenantId
    kind: InvalidationKind
    target_type: Id
    target_id: Id
    source_memory_id: Id | None = None
    user_id: Id | None = None
    session_id: Id | None = None
    run_id: Id | None = None
    reason: str
    occurred_at: Timestamp


class MemoryCommand(_Record):
    """An operator's command on a tenant's memory (topic ``memory.commands``, key ``tenant_id``), applied by the
    worker's memory processor in log order (``ctxflow memory review|delete|rehydrate|pin|unpin|expire``; the worker
    sends ``expire`` itself for tenants that have gone quiet)."""

    command_id: Id
    tenant_id: TenantId
    kind: MemoryCommandKind
    memory_id: Id | None = None
    #: ``delete``: every record of this user (user scope, or produced in their runs).
    user_id: Id | None = None
    action: ReviewAction | None = None
    corrected_content: str | None = None
    corrected_value: str | None = None
    issued_by: Id
    reason: str | None = None
    issued_at: Timestamp

    @model_validator(mode="after")
    def _complete(self) -> Self:
        kind = self.kind
        if kind is MemoryCommandKind.DELETE:
            # One record, one user's records, or neither: the whole tenant's memory (an offboarding).
            if self.memory_id is not None and self.user_id is not None:
                raise ValueError("a delete names a memory_id or a user_id, not both")
        elif kind is MemoryCommandKind.EXPIRE:
            if self.memory_id is not None or self.user_id is not None:
                raise ValueError("an expire command applies to the tenant's whole memory: no memory_id or user_id")
        elif self.memory_id is None:
            raise ValueError(f"a {kind.value} command needs a memory_id")
        if (kind is MemoryCommandKind.REVIEW) != (self.action is not None):
            raise ValueError("a review command carries an action, and only a review does")
        return self


class MemoryVerdict(_Record):
    """The memory gate's verdict on one candidate (topic ``memory.verdicts``; one ClickHouse row each).

    ``verdict_id`` is a hash of the tenant and the candidate id, so a replay overwrites instead of duplicating;
    ``reason`` never echoes the candidate's content (a rejected secret must not reach any sink).
    """

    verdict_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    candidate_id: Id
    source_event_id: Id
    outcome: VerdictOutcome
    status: MemoryStatus | None = None
    rule: Id
    reason: str
    bootstrap_loosened: bool = False
    memory_id: Id | None = None
    scope: MemoryScope
    type: MemoryType
    pii_kinds: list[str] = Field(default_factory=list)
    policy_version: str | None = None
    parent_run_id: Id | None = None
    occurred_at: Timestamp


class DeadLetter(_Record):
    """A rejected record with its reason (topic ``deadletters``).

    ``original`` is null when the record was readable and marked no_retention: its payload is never kept.
    """

    dead_letter_id: Id
    source_topic: Id
    source_partition: Count32
    source_offset: Count
    tenant_id: TenantId | None = None
    reason_code: Id
    reason: Id
    original: bytes | None = None
    failed_at: Timestamp


class EnvelopeStatus(StrEnum):
    """A run envelope's ``status`` (an open string on the wire): open, or how the run ended."""

    OPEN = "open"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    ABANDONED = "abandoned"


class ClosedBy(StrEnum):
    """Who closed a run (``RunEnvelope.closed_by``): its agent, or the worker after the idle timeout."""

    AGENT = "agent"
    IDLE_TIMEOUT = "idle_timeout"


class CostSurface(StrEnum):
    """What a cost line pays for (``CostLine.surface``, an open string on the wire)."""

    INFERENCE = "inference"
    RETRIEVAL = "retrieval"
    TOOLING = "tooling"
    PERSISTENCE = "persistence"


class CostUnit(StrEnum):
    """What a cost line's ``quantity`` counts."""

    TOKENS = "tokens"
    CALLS = "calls"
    BYTE_DAYS = "byte_days"


class RunEnvelope(_Record):
    """What one run was and consumed (topic ``envelopes``, compacted by ``tenant_id:run_id``).

    Guarantees: a function of the run's accepted events and the worker's settings (idle timeout, price table),
    so a replay of the log materializes the same envelope; ``envelope_version`` grows with every update of a run;
    ``cost_micros`` is the sum of the surfaces; ``integrity_hash`` is recomputable from the events
    (``processors.envelopes.integrity.verify``).
    """

    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    parent_run_id: Id | None = None
    root_run_id: Id
    workflow_id: Id
    agent_id: Id
    depth: Count32
    policy_version: str | None = None
    prefix_hash: str | None = None
    model: str | None = None
    privacy: PrivacyMode = PrivacyMode.RETAINED
    status: Id
    closed_by: str | None = None
    started_at: Timestamp | None = None
    finalized_at: Timestamp | None = None
    last_event_at: Timestamp
    duration_ms: Count | None = None
    global_tokens: Count
    tenant_tokens: Count
    user_tokens: Count
    retrieved_tokens: Count
    session_tokens: Count
    static_prefix_tokens: Count
    dynamic_tokens: Count
    input_tokens: Count
    output_tokens: Count
    cached_read_tokens: Count
    cache_write_tokens: Count
    reasoning_tokens: Count
    usage_estimated: bool
    retrievals: Count
    memory_ids: list[Id]
    tool_calls: Count
    tool_results: Count
    promotions: dict[str, Count]
    evictions: Count
    compressions: Count
    tokens_freed: Count
    cost_micros: Count
    inference_micros: Count
    retrieval_micros: Count
    tooling_micros: Count
    persistence_micros: Count
    cost_estimated: bool
    price_version: Id
    event_count: Count
    integrity_hash: Digest
    envelope_version: Count
    updated_at: Timestamp
    #: Tokens of consumption estimated beyond the reported usage (in no provider usage field).
    estimated_tokens: Count = 0
    usage_reports: Count = 0


class CostLine(_Record):
    """One priced source event on one surface (topic ``costs``, key ``tenant_id``).

    ``cost_id`` derives from the source and the surface, so a replay (or an update of a run's estimate) writes
    the same id again and the last value holds.
    """

    cost_id: Id
    tenant_id: TenantId
    user_id: Id
    session_id: Id
    run_id: Id
    root_run_id: Id
    parent_run_id: Id | None = None
    workflow_id: Id
    agent_id: Id
    surface: Id
    model: str | None = None
    quantity: Count
    unit: Id
    micros: Count
    price_version: Id
    estimated: bool
    source_event_id: Id
    occurred_at: Timestamp


MODEL_SCHEMAS: dict[type[BaseModel], str] = {
    TurnEvent: "TurnEvent",
    UsageReport: "UsageReport",
    RunEvent: "RunEvent",
    AdmissionRequest: "AdmissionRequest",
    TenantManifest: "TenantManifest",
    MemoryCandidate: "MemoryCandidate",
    MemoryRecord: "MemoryRecord",
    Decision: "Decision",
    CompressionJob: "CompressionJob",
    Summary: "Summary",
    Invalidation: "Invalidation",
    DeadLetter: "DeadLetter",
    RunEnvelope: "RunEnvelope",
    CostLine: "CostLine",
    MemoryVerdict: "MemoryVerdict",
    MemoryCommand: "MemoryCommand",
}
"""Top-level model -> Avro record name (namespace ``ctxflow``); nested records travel inside their parent."""
