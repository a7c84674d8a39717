"""``ctxflow memory rehydrate|pin|unpin``: operators' commands on a tenant's long-term store.

Each publishes one :class:`MemoryCommand` on ``memory.commands`` and, as ``review`` and ``delete`` do
(:func:`streams.cli.memory.submit_command`), waits until the worker has applied it, or says why it refused it; the
worker's memory processor applies it in log order with the tenant's candidates
(:mod:`processors.memory.store_commands`). ``rehydrate`` is where the archive is
read, so the processor stays pure and a replay of the log needs no object store: this command finds the record's
``archive_ref`` (ClickHouse ``memory_records``), reads the archive from the payload store (whose read checks the
bytes against their content address), checks it is this tenant's record, and publishes the command with the
archived content; the processor checks that content against the digest of the record it holds.

:func:`register` adds the commands to the ``memory`` group, whichever module owns it (``GROUP_MEMBERS`` in
:mod:`streams.cli.main`).
"""

from __future__ import annotations

from typing import Annotated

import typer
from ctxflow.schemas.models import MemoryCommandKind, MemoryRecord, MemoryStatus
from ctxflow.sinks.payloads import CorruptPayload, PayloadStore
from ctxflow.streams.cli.context import settings_of
from ctxflow.streams.cli.memory import Timeout, Wait, new_command, submit_command
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.payloads import open_payload_store
from ctxflow.streams.stack.query import QueryFailed, run_query
from rich.console import Console

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


def rehydrate(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None,
              wait: Wait = True, timeout: Timeout = 60.0) -> None:
    """Bring an archived (evicted) record back as it was: active, same id, version + 1."""
    settings = settings_of(ctx)
    try:
        record = archived_record(settings, payload_store(settings), tenant, memory_id)
    except (ArchiveError, QueryFailed) as error:
        errors.print(f"cannot rehydrate: {error}", style="red")
        raise typer.Exit(1) from error
    command = new_command(tenant, MemoryCommandKind.REHYDRATE, by, reason, memory_id=memory_id,
                          corrected_content=record.content)
    submit_command(settings, command, wait, timeout)


def pin(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None,
        wait: Wait = True, timeout: Timeout = 60.0) -> None:
    """Pin a record: never evicted from the long-term store."""
    submit_command(settings_of(ctx), new_command(tenant, MemoryCommandKind.PIN, by, reason, memory_id=memory_id),
                   wait, timeout)


def unpin(ctx: typer.Context, tenant: Tenant, memory_id: MemoryId, by: By = None, reason: Reason = None,
          wait: Wait = True, timeout: Timeout = 60.0) -> None:
    """Unpin a record: evictable again when the store fills."""
    submit_command(settings_of(ctx), new_command(tenant, MemoryCommandKind.UNPIN, by, reason, memory_id=memory_id),
                   wait, timeout)


def register(group: typer.Typer) -> None:
    """Add ``rehydrate``, ``pin`` and ``unpin`` to a ``memory`` command group."""
    for command in (rehydrate, pin, unpin):
        group.command(name=command.__name__)(command)

