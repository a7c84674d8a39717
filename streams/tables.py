"""The budget token tables as Faust tables, and the store that persists them in the safe order.

Six changelog-backed tables hold the state of the tenants whose partitions this worker owns: run ledgers
(the authority for dedup), tenant and user spend ledgers, workflow ledgers, remembered static-item token
counts, and tenant manifests. Values are domain objects in memory; each table has a codec that writes them
to its changelog compactly and reads them back on recovery.

Why not ``table[key] = value``: Faust would produce one changelog record per assignment, to the partition of
the *current* event. A batch spans partitions, and the crash argument in :mod:`processors.ledger` needs the
aggregates durable before the run ledgers. :class:`TableBudgetStore` therefore writes the in-memory store
directly, remembers each dirty key with the partition of the record that wrote it, and :meth:`persist`
produces one changelog record per dirty key: aggregates first (awaiting their acks), then run ledgers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import faust
from faust.serializers.codecs import Codec

from processors.ledger import RunLedger, WorkflowLedger
from processors.windows import SpendLedger
from schemas.models import TenantManifest

_DUMP = json.JSONEncoder(separators=(",", ":")).encode


class _ValueCodec(Codec):
    """JSON through a domain object's own snapshot functions."""

    def __init__(self, dump: Callable[[Any], Any], load: Callable[[Any], Any]) -> None:
        super().__init__()
        self._dump, self._load = dump, load

    def _dumps(self, obj: Any) -> bytes:
        return _DUMP(self._dump(obj)).encode()

    def _loads(self, s: bytes) -> Any:
        return self._load(json.loads(s))


class _Utf8(Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.encode() if isinstance(obj, str) else bytes(obj)

    def _loads(self, s: bytes) -> Any:
        return s.decode()


class _ManifestCodec(Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.model_dump_json().encode()

    def _loads(self, s: bytes) -> Any:
        return TenantManifest.model_validate_json(s)


#: Table name -> value codec. Order matters only in AGGREGATES / RUNS below.
VALUE_CODECS: dict[str, Codec] = {
    "runs": _ValueCodec(RunLedger.to_list, RunLedger.from_list),
    "tenants": _ValueCodec(SpendLedger.to_dict, SpendLedger.from_dict),
    "users": _ValueCodec(SpendLedger.to_dict, SpendLedger.from_dict),
    "workflows": _ValueCodec(WorkflowLedger.to_dict, WorkflowLedger.from_dict),
    "counts": _ValueCodec(int, int),
    "manifests": _ManifestCodec(),
}
#: Persisted before run ledgers: see the crash argument in processors.ledger.
AGGREGATES = ("manifests", "counts", "tenants", "users", "workflows")
RUNS = ("runs",)


def declare_tables(app: faust.App, partitions: int) -> dict[str, faust.Table]:
    """Create the budget tables on ``app`` (co-partitioned with the tenant-keyed input topics)."""
    tables = {}
    for name, codec in VALUE_CODECS.items():
        # Faust derives a changelog's serializers from model types; ours are plain domain objects with their own
        # codecs, so the changelog topic is declared here with them (same name and settings Faust would use).
        changelog = app.topic(
            f"{app.conf.id}-budget-{name}-changelog",
            schema=faust.Schema(key_serializer=_Utf8(), value_serializer=codec),
            partitions=partitions,
            compacting=True,
            deleting=False,
            internal=True,
        )
        tables[name] = app.Table(
            f"budget-{name}", default=None, partitions=partitions, changelog_topic=changelog,
            help=f"ctxflow budget {name}",
        )
    return tables


class TableBudgetStore:
    """:class:`processors.types.BudgetStore` over Faust tables, persisted in the crash-safe order.

    Set :attr:`partition` to the source partition of the record before processing it: every value the
    record writes is persisted to that changelog partition (a tenant's keys live in its input partition).
    """

    def __init__(self, tables: dict[str, faust.Table]) -> None:
        self._tables = tables
        # The memory store's plain dicts: the hot path reads and writes them directly; ``_key_partition`` is
        # how the store drops keys of partitions this worker no longer owns after a rebalance.
        self._data = {name: table.data.data for name, table in tables.items()}
        self._key_partition = {name: table.data._key_partition for name, table in tables.items()}
        self._dirty: dict[str, dict[str, int]] = {name: {} for name in tables}
        self.partition = 0

    def _get(self, name: str, key: str) -> Any:
        return self._data[name].get(key)

    def _put(self, name: str, key: str, value: Any) -> None:
        self._data[name][key] = value
        self._dirty[name][key] = self._key_partition[name][key] = self.partition

    def get_run(self, key: str) -> RunLedger | None:
        return self._get("runs", key)

    def put_run(self, key: str, value: RunLedger) -> None:
        self._put("runs", key, value)

    def get_tenant(self, key: str) -> SpendLedger | None:
        return self._get("tenants", key)

    def put_tenant(self, key: str, value: SpendLedger) -> None:
        self._put("tenants", key, value)

    def get_user(self, key: str) -> SpendLedger | None:
        return self._get("users", key)

    def put_user(self, key: str, value: SpendLedger) -> None:
        self._put("users", key, value)

    def get_workflow(self, key: str) -> WorkflowLedger | None:
        return self._get("workflows", key)

    def put_workflow(self, key: str, value: WorkflowLedger) -> None:
        self._put("workflows", key, value)

    def get_manifest(self, key: str) -> TenantManifest | None:
        return self._get("manifests", key)

    def put_manifest(self, key: str, value: TenantManifest) -> None:
        self._put("manifests", key, value)

    def get_count(self, key: str) -> int | None:
        return self._get("counts", key)

    def put_count(self, key: str, value: int) -> None:
        self._put("counts", key, value)

    def dirty_runs(self) -> list[tuple[str, RunLedger]]:
        """The run ledgers written since the last :meth:`persist` (for projections)."""
        data = self._data["runs"]
        return [(key, data[key]) for key in self._dirty["runs"]]

    async def persist(self) -> int:
        """Produce the changelog of every dirty value: aggregates, await acks, then runs, await acks.

        Returns the number of changelog records written. Raises if the broker refuses a record, in which
        case the batch must not be acknowledged (it will be replayed, and replays are idempotent).
        """
        written = 0
        for group in (AGGREGATES, RUNS):
            pending = []
            for name in group:
                table, data, dirty = self._tables[name], self._data[name], self._dirty[name]
                for key, partition in dirty.items():
                    pending.append(await table.changelog_topic.send(key=key, value=data[key], partition=partition))
                dirty.clear()
            if pending:
                await asyncio.gather(*pending)
                written += len(pending)
        return written
