"""Interfaces of the budget core: the input position, tenant-scoped keys and the state protocol.

Every state key starts with a validated tenant id followed by ``:`` (a character tenant ids cannot contain),
so no key of one tenant can equal, or be a prefix-collision of, another tenant's key. The worker implements
:class:`BudgetStore` over Faust tables (dict-like, changelog-backed); :class:`DictBudgetState` is the
in-memory implementation used by tests and log replays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, NamedTuple, Protocol

from ctxflow.processors.ledger import RunLedger, WorkflowLedger
from ctxflow.processors.retention import Watermark
from ctxflow.processors.windows import SpendLedger
from ctxflow.schemas.models import TENANT_ID_PATTERN, DecisionKind, TenantManifest

_TENANT_RE = re.compile(TENANT_ID_PATTERN)
_valid_tenants: set[str] = set()


class InvalidTenantError(ValueError):
    """A tenant id that is missing or malformed: nothing may be read or written under it."""


class Position(NamedTuple):
    """Where a record came from: source topic, partition and offset."""

    topic: str
    partition: int
    offset: int


def check_tenant(tenant_id: str) -> str:
    """Return ``tenant_id`` if it matches the contract's pattern, else raise :class:`InvalidTenantError`."""
    if tenant_id in _valid_tenants:
        return tenant_id
    if not isinstance(tenant_id, str) or not _TENANT_RE.match(tenant_id):
        raise InvalidTenantError(f"invalid tenant id {tenant_id!r}: must match {TENANT_ID_PATTERN}")
    if len(_valid_tenants) < 100_000:
        _valid_tenants.add(tenant_id)
    return tenant_id


def _scoped(tenant_id: str, name: str, value: str) -> str:
    if not value:
        raise ValueError(f"{name} must be non-empty")
    return f"{check_tenant(tenant_id)}:{value}"


def tenant_key(tenant_id: str) -> str:
    """Key of a tenant's spend ledger and manifest."""
    return check_tenant(tenant_id)


def run_key(tenant_id: str, run_id: str) -> str:
    """Key ``tenant:run`` of a run ledger (also the decisions topic key)."""
    return _scoped(tenant_id, "run_id", run_id)


def user_key(tenant_id: str, user_id: str) -> str:
    """Key ``tenant:user`` of a user's spend ledger."""
    return _scoped(tenant_id, "user_id", user_id)


def workflow_key(tenant_id: str, workflow_id: str) -> str:
    """Key ``tenant:workflow`` of a workflow ledger."""
    return _scoped(tenant_id, "workflow_id", workflow_id)


def count_key(tenant_id: str, encoding: str, digest: str) -> str:
    """Key ``tenant:encoding:digest`` of a remembered token count of a static item."""
    return _scoped(tenant_id, "digest", f"{encoding}:{digest}")


def decision_id(tenant_id: str, source_id: str, kind: DecisionKind, subject: str) -> str:
    """The id of the decision of ``kind`` about ``subject`` caused by record ``source_id``.

    A hash of those four values only, so a replay of the record reproduces the id and sinks keyed by it
    overwrite instead of duplicating. ``subject`` tells apart decisions of one kind from one record (a slot,
    ``total``, ``tenant:hour``...).
    """
    raw = "\x1f".join((tenant_id, source_id, kind.value, subject)).encode("utf-8")
    return blake2b(raw, digest_size=16).hexdigest()


def tenant_of_key(key: str) -> str:
    """The tenant a state key belongs to."""
    return key.split(":", 1)[0]


class StaticCount(NamedTuple):
    """A static item's remembered token count, and the ``turns`` offset of the turn that first counted it.

    ``since`` is what makes the remembered count safe under replay: a digest-only turn uses it only when it was
    counted at an earlier offset, which is exactly what the turn saw when it was first processed.
    """

    tokens: int
    since: int

    def to_list(self) -> list[int]:
        """The changelog form: ``[tokens, since]``."""
        return [self.tokens, self.since]

    @classmethod
    def from_json(cls, value: int | list[int]) -> StaticCount:
        """Read :meth:`to_list`'s form, or a bare count written before ``since`` existed (counted at the start)."""
        if isinstance(value, int):
            return cls(value, -1)
        tokens, since = value
        return cls(tokens, since)


class BudgetStore(Protocol):
    """Budget state of the tenants one worker owns; each getter returns None for an absent key.

    A ``put`` replaces the stored value (and, in the worker, writes its changelog): a value mutated without
    a ``put`` is not persisted. A ``delete`` removes a retired value (in the worker, a tombstone on its
    changelog); deleting an absent key is harmless.
    """

    def get_run(self, key: str) -> RunLedger | None: ...
    def put_run(self, key: str, value: RunLedger) -> None: ...
    def get_tenant(self, key: str) -> SpendLedger | None: ...
    def put_tenant(self, key: str, value: SpendLedger) -> None: ...
    def get_user(self, key: str) -> SpendLedger | None: ...
    def put_user(self, key: str, value: SpendLedger) -> None: ...
    def get_workflow(self, key: str) -> WorkflowLedger | None: ...
    def put_workflow(self, key: str, value: WorkflowLedger) -> None: ...
    def get_manifest(self, key: str) -> TenantManifest | None: ...
    def put_manifest(self, key: str, value: TenantManifest) -> None: ...
    def get_count(self, key: str) -> StaticCount | None: ...
    def put_count(self, key: str, value: StaticCount) -> None: ...
    def get_watermark(self, key: str) -> Watermark | None: ...
    def put_watermark(self, key: str, value: Watermark) -> None: ...
    def delete_run(self, key: str) -> None: ...
    def delete_workflow(self, key: str) -> None: ...
    # Tables of the chain's other processors, by name (:class:`processors.chain.TableSpec`).
    def get_state(self, table: str, key: str) -> Any: ...
    def put_state(self, table: str, key: str, value: Any) -> None: ...
    def delete_state(self, table: str, key: str) -> None: ...
    def run_items(self) -> Iterable[tuple[str, RunLedger]]:
        """Every run ledger held, for rebuilding the retirement index after a restart or rebalance."""
        ...


@dataclass
class DictBudgetState:
    """:class:`BudgetStore` in plain dicts (tests, replays); ``dirty`` tracks the keys put per table."""

    runs: dict[str, RunLedger] = field(default_factory=dict)
    tenants: dict[str, SpendLedger] = field(default_factory=dict)
    users: dict[str, SpendLedger] = field(default_factory=dict)
    workflows: dict[str, WorkflowLedger] = field(default_factory=dict)
    manifests: dict[str, TenantManifest] = field(default_factory=dict)
    counts: dict[str, StaticCount] = field(default_factory=dict)
    watermarks: dict[str, Watermark] = field(default_factory=dict)
    dirty: dict[str, set[str]] = field(default_factory=dict)
    #: Keys deleted per table (retired), also marked dirty.
    deleted: dict[str, set[str]] = field(default_factory=dict)
    #: The other processors' tables, by name.
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _table(self, table: str) -> dict[str, Any]:
        found = getattr(self, table, None)
        return found if isinstance(found, dict) and table != "tables" else self.tables.setdefault(table, {})

    def _put(self, table: str, key: str, value: object) -> None:
        self._table(table)[key] = value
        self.dirty.setdefault(table, set()).add(key)

    def _delete(self, table: str, key: str) -> None:
        self._table(table).pop(key, None)
        self.dirty.setdefault(table, set()).add(key)
        self.deleted.setdefault(table, set()).add(key)

    def get_run(self, key: str) -> RunLedger | None:
        """The run ledger at ``key``."""
        return self.runs.get(key)

    def put_run(self, key: str, value: RunLedger) -> None:
        """Store a run ledger."""
        self._put("runs", key, value)

    def get_tenant(self, key: str) -> SpendLedger | None:
        """The tenant spend ledger at ``key``."""
        return self.tenants.get(key)

    def put_tenant(self, key: str, value: SpendLedger) -> None:
        """Store a tenant spend ledger."""
        self._put("tenants", key, value)

    def get_user(self, key: str) -> SpendLedger | None:
        """The user spend ledger at ``key``."""
        return self.users.get(key)

    def put_user(self, key: str, value: SpendLedger) -> None:
        """Store a user spend ledger."""
        self._put("users", key, value)

    def get_workflow(self, key: str) -> WorkflowLedger | None:
        """The workflow ledger at ``key``."""
        return self.workflows.get(key)

    def put_workflow(self, key: str, value: WorkflowLedger) -> None:
        """Store a workflow ledger."""
        self._put("workflows", key, value)

    def get_manifest(self, key: str) -> TenantManifest | None:
        """The manifest at ``key``."""
        return self.manifests.get(key)

    def put_manifest(self, key: str, value: TenantManifest) -> None:
        """Store a manifest."""
        self._put("manifests", key, value)

    def get_count(self, key: str) -> StaticCount | None:
        """The remembered token count at ``key``."""
        return self.counts.get(key)

    def put_count(self, key: str, value: StaticCount) -> None:
        """Remember a token count."""
        self._put("counts", key, value)

    def get_watermark(self, key: str) -> Watermark | None:
        """The tenant's event-time watermark at ``key``."""
        return self.watermarks.get(key)

    def put_watermark(self, key: str, value: Watermark) -> None:
        """Store a watermark."""
        self._put("watermarks", key, value)

    def delete_run(self, key: str) -> None:
        """Retire a run ledger."""
        self._delete("runs", key)

    def delete_workflow(self, key: str) -> None:
        """Retire a workflow ledger."""
        self._delete("workflows", key)

    def get_state(self, table: str, key: str) -> Any:
        """The value at ``key`` of another processor's table."""
        return self.tables.get(table, {}).get(key)

    def put_state(self, table: str, key: str, value: Any) -> None:
        """Store a value in another processor's table."""
        self._put(table, key, value)

    def delete_state(self, table: str, key: str) -> None:
        """Retire a value of another processor's table."""
        self._delete(table, key)

    def run_items(self) -> Iterable[tuple[str, RunLedger]]:
        """Every run ledger held."""
        return self.runs.items()
