"""``ctxflow memory rehydrate|pin|unpin``: operators' commands on a tenant's long-term store.

Each publishes one :class:`MemoryCommand` on ``memory.commands``; the worker's memory processor applies it in log
order with the tenant's candidates (:mod:`processors.memory.store_commands`). ``rehydrate`` is where the archive is
read, so the processor stays pure and a replay of the log needs no object store: this command finds the record's
``archive_ref`` (ClickHouse ``memory_records``), reads the archive from the payload store (whose read checks the
bytes against their content address), checks it is this tenant's record, and publishes the command with the
archived content; the processor checks that content against the digest of the record it holds.

:func:`register` adds the commands to the ``memory`` group, whichever module owns it (``GROUP_MEMBERS`` in
:mod:`streams.cli.main`).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from datetime import UTC, datetime
from typing import Annotated

import typer
from ctxflow.schemas.models import MemoryCommand, MemoryCommandKind, MemoryRecord, MemoryStatus
from ctxflow.sinks.payloads import CorruptPayload, PayloadStore
from ctxflow.streams.cli.context import settings_of
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.payloads import open_payload_store
from ctxflow.streams.sdk import CtxflowClient, CtxflowError
from ctxflow.streams.stack.query import QueryFailed, run_query
from rich.console import Console

console = Console(soft_wrap=True, markup=False, highlight=False)
errors = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

Tenant = Annotated[str, typer.Option("--tenant", help="The tenant whose memory it is.")]
MemoryId = Annotated[str, typer.Option("--id", help="The memory id.")]
By = Annotated[str | None, typer.Option("--by", help="Who issues it (default: the OS user).")]
Reason = Annotated[str | None, typer.Option(help="Why (kept on the command).")]


class ArchiveError(Exception):
    """The record cannot be rehydrated from its archive; the message says why."""


def payload_store(settings: Settings) -> PayloadStore:
    """The deployment's payload store (where archives and large payloads live)."""
    return open_payload_store(settings)


def archived_record(settings: Settings, store: PayloadStore, tenant_id: str, memory_id: str) -> MemoryRecord:
    """The record as it was when evicted, read from its archive and checked: its tenant, its id, its content
    against its digest (the record model checks that) and the archive's bytes against their key (the store's
    read checks that). Raises :class:`ArchiveError` saying what is wrong."""
    rows = run_query(
        settings,
        "SELECT status, archive_ref FROM memory_records FINAL WHERE tenant_id = {tenant:String} "
        "AND memory_id = {memory:String}",
        parameters={"tenant": tenant_id, "memory": memory_id},
    ).rows
    if not rows:
        raise ArchiveError(f"{tenant_id} has no memory {memory_id} (or the sink has not projected it yet)")
    status, ref = rows[0]
    if status != MemoryStatus.ARCHIVED.value or not ref:
        raise ArchiveError(f"memory {memory_id} of {tenant_id} is {status}, not archived")
    try:
        record = MemoryRecord.model_validate_json(store.get(ref))
    except KeyError as error:
        raise ArchiveError(f"the archive {ref} is missing from the payload store") from error
    except (CorruptPayload, ValueError) as error:
        raise ArchiveError(f"the archive {ref} is damaged: {error}") from error
    if (record.tenant_id, record.memory_id) != (tenant_id, memory_id):
        raise ArchiveError(f"the archive {ref} holds {record.tenant_id}/{record.memory_id}, not this record")
    return record


def _publish(settings: Settings, command: MemoryCommand) -> None:
    async def send() -> None:
        async with CtxflowClient.from_settings(settings) as client:
            await client.publish(command)

    try:
        asyncio.run(send())
    except (CtxflowError, OSError) as error:
        errors.print(f"could not publish the command: {error}", style="red")
        raise typer.Exit(1) from error


def _command(kind: MemoryCommandKind, tenant: str, memory_id: str, by: str | None, reason: str | None,
             content: str | None = None) -> MemoryCommand:
    return MemoryCommand(
        command_id=f"cmd-{uuid.uuid4()}", tenant_id=tenant, kind=kind, memory_id=memory_id,
        corrected_content=content, issued_by=by or getpass.getuser(), reason=reason, issued_at=datetime.now(UTC),
    )


def rehydrate(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None) -> None:
    """Bring an archived (evicted) record back as it was: active, same id, version + 1."""
    settings = settings_of(ctx)
    try:
        record = archived_record(settings, payload_store(settings), tenant, memory_id)
    except (ArchiveError, QueryFailed) as error:
        errors.print(f"cannot rehydrate: {error}", style="red")
        raise typer.Exit(1) from error
    _publish(settings, _command(MemoryCommandKind.REHYDRATE, tenant, memory_id, by, reason, record.content))
    console.print(f"rehydrate of {memory_id} ({tenant}) published; the worker restores version {record.version + 2}")


def pin(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None) -> None:
    """Pin a record: never evicted from the long-term store."""
    _publish(settings_of(ctx), _command(MemoryCommandKind.PIN, tenant, memory_id, by, reason))
    console.print(f"pin of {memory_id} ({tenant}) published")


def unpin(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None) -> None:
    """Unpin a record: evictable again when the store fills."""
    _publish(settings_of(ctx), _command(MemoryCommandKind.UNPIN, tenant, memory_id, by, reason))
    console.print(f"unpin of {memory_id} ({tenant}) published")


def register(group: typer.Typer) -> None:
    """Add ``rehydrate``, ``pin`` and ``unpin`` to a ``memory`` command group."""
    for command in (rehydrate, pin, unpin):
        group.command(name=command.__name__)(command)

