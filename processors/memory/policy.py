"""The tenant's memory policy as the gate sees it, and the facts about the producing run.

Both are plain values handed to the gate: the shell builds the policy from the tenant's manifest
(:func:`policy_from_manifest`, manifest v4 ``memory``) and the run facts from the run ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from ctxflow.schemas.models import MemoryRecord, PrivacyMode, TenantManifest

GATE_VERSION = "memory-gate/1"
"""Version of the promotion rules; a record names the version that admitted it."""

INLINE_MAX_BYTES = 8192
"""Content above this many UTF-8 bytes goes to the object store and the record carries ``payload_ref``: a
compacted topic keeps every live record forever, so large payloads there cost every consumer's restore."""


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """A tenant's memory gate settings.

    ``retention_rules`` names the rules under which personal data may be kept; a candidate with PII must cite
    one of them. ``trusted_systems`` are the systems of record whose confirmation verifies a tenant fact, and
    ``approvers`` the people whose approval counts (empty: any named approver).
    Until ``bootstrap_until`` the tenant's unverified facts and episodes may enter tenant scope (flagged).
    ``retention_days`` (by memory type) and ``rule_retention_days`` (by the PII retention rule a record cites)
    bound how long a record lives (:meth:`expires_at`).
    """

    version: str = GATE_VERSION
    retention_rules: frozenset[str] = field(default_factory=frozenset)
    trusted_systems: frozenset[str] = field(default_factory=frozenset)
    #: Who may approve; empty: any named approver (see :meth:`approved_by`).
    approvers: frozenset[str] = field(default_factory=frozenset)
    min_confidence: float = 0.5
    min_corroborating_runs: int = 2
    bootstrap_until: datetime | None = None
    inline_max_bytes: int = INLINE_MAX_BYTES
    retention_days: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    rule_retention_days: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def expires_at(self, record: MemoryRecord) -> datetime | None:
        """When ``record``, last written at ``updated_at`` (event time), ends its life: the shorter of its type's
        and its retention rule's lifetimes, counted from that write; None when neither is set (kept until
        deleted). The shorter, because a record is bound by both: a PII rule of 30 days cuts a 90-day fact short."""
        days = [d for d in (self.retention_days.get(record.type.value),
                            self.rule_retention_days.get(record.retention_policy or "")) if d is not None]
        return record.updated_at + timedelta(days=min(days)) if days else None

    def approved_by(self, verified_by: str | None) -> bool:
        """Whether ``verified_by`` counts as a human approval: named, and one of ``approvers`` when the tenant lists
        them (an agent's claim of an approval is otherwise only a claim)."""
        return bool(verified_by) and (not self.approvers or verified_by in self.approvers)

    def in_bootstrap(self, now: datetime) -> bool:
        """Whether the tenant's bootstrap period (a loosened gate) is running at ``now``."""
        return self.bootstrap_until is not None and now < self.bootstrap_until


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the gate needs to know about the run that produced a candidate (from the run ledger)."""

    privacy: PrivacyMode = PrivacyMode.RETAINED
    parent_run_id: str | None = None
    #: The user the run holds (its start event's, or its parent's after a refused delegation); None: unknown.
    user_id: str | None = None
    #: The session of the run's parent (:func:`processors.delegation.parent_session`), which a session-scope
    #: candidate of the run must not name; None: a root run, or a parent the worker has not seen start.
    parent_session_id: str | None = None


def policy_from_manifest(manifest: TenantManifest | None) -> MemoryPolicy:
    """The memory policy a tenant's manifest states; the defaults when it has none (or no ``memory`` field)."""
    if manifest is None:
        return MemoryPolicy()
    if manifest.memory is None:
        return MemoryPolicy(**_retention(manifest))
    memory = manifest.memory
    return MemoryPolicy(
        # Records name the rules and the manifest that admitted them.
        version=f"{GATE_VERSION}@manifest-{manifest.version}",
        retention_rules=frozenset(memory.retention_rules),
        trusted_systems=frozenset(memory.trusted_systems),
        approvers=frozenset(memory.approvers),
        min_confidence=memory.min_confidence,
        min_corroborating_runs=memory.min_corroborating_runs,
        bootstrap_until=memory.bootstrap_until,
        inline_max_bytes=memory.inline_max_bytes,
        **_retention(manifest),
    )


def _retention(manifest: TenantManifest) -> dict[str, Mapping[str, int]]:
    store = manifest.memory_store
    if store is None:
        return {}
    return {"retention_days": MappingProxyType(dict(store.retention_days)),
            "rule_retention_days": MappingProxyType(dict(store.rule_retention_days))}
