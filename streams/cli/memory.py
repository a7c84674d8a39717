"""``ctxflow memory list|show|review|delete``: what a tenant's memory holds, and operators' decisions on it.

``list`` and ``show`` read ClickHouse's ``memory_records`` (de-duplicated: the latest version of each record)
through the path ``ctxflow query`` uses. ``review`` and ``delete`` (and ``rehydrate``, ``pin``, ``unpin``:
:mod:`streams.cli.memory_store`) publish a :class:`MemoryCommand` on
``memory.commands`` and, unless ``--no-wait``, wait until the worker has applied it
(:mod:`streams.stack.memory_ops`): they print the records it wrote, or the reason it refused the command, and
exit 1 when it refused or no worker applied it in time.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer
from aiokafka.errors import KafkaError
from ctxflow.schemas.models import MemoryCommand, MemoryCommandKind, MemoryStatus, ReviewAction
from ctxflow.streams.cli.context import operator_name, settings_of, unreachable
from ctxflow.streams.cli.tenants import console, errors
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import CtxflowError, TopicMissing
from ctxflow.streams.stack.embedded import kafka_answers
from ctxflow.streams.stack.memory_ops import Outcome, WorkerNotApplying, submit
from ctxflow.streams.stack.query import QueryFailed, run_query
from rich.table import Table

app = typer.Typer(help="A tenant's governed memory: list, show, review, delete, rehydrate, pin, unpin.",
                  no_args_is_help=True,
                  add_completion=False)

_LIST_COLUMNS = ("memory_id", "scope", "type", "status", "version", "user_id", "subject", "attribute",
                 "updated_at", "expires_at", "reason")
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
By = Annotated[str | None, typer.Option("--by", help="Who decides (recorded; default: ctxflow-cli:<login>).")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the worker has applied the command.")]
Timeout = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for the worker.")]


def _fail(message: str) -> NoReturn:
    errors.print(message, style="red")
    raise typer.Exit(1)


def _query(settings: Settings, sql: str, parameters: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple]]:
    try:
        result = run_query(settings, sql, parameters=parameters)
    except QueryFailed as error:
        _fail(str(error))
    return result.columns, result.rows


def _table(columns: tuple[str, ...], rows: list[tuple]) -> Table:
    table = Table(*columns)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table


@app.command("list")
def list_records(
    ctx: typer.Context,
    tenant: Tenant,
    status: Annotated[MemoryStatus | None, typer.Option(help="Only records in this status.")] = None,
) -> None:
    """The tenant's memory records (latest version of each), oldest change first."""
    where = "tenant_id = {tenant:String}" + (" AND status = {status:String}" if status else "")
    columns, rows = _query(settings_of(ctx), f"SELECT {', '.join(_LIST_COLUMNS)} FROM memory_records WHERE {where} "
                           "ORDER BY updated_at, memory_id",
                           {"tenant": tenant, "status": status.value if status else ""})
    console.print(_table(columns, rows) if rows else f"tenant {tenant} has no memory records"
                  + (f" in status {status.value}" if status else ""))


@app.command("show")
def show_record(ctx: typer.Context, tenant: Tenant, memory_id: Annotated[str, typer.Option("--id")]) -> None:
    """Every field of one record's latest version (content is empty for a tombstone)."""
    columns, rows = _query(settings_of(ctx), "SELECT * FROM memory_records WHERE tenant_id = {tenant:String} AND "
                           "memory_id = {id:String}", {"tenant": tenant, "id": memory_id})
    if not rows:
        _fail(f"tenant {tenant} has no memory {memory_id} in ClickHouse (a record the worker just wrote may take a "
              "few seconds to be projected)")
    console.print(_table(("field", "value"), [(c, v) for c, v in zip(columns, rows[0], strict=True)]))


@app.command("review")
def review_record(
    ctx: typer.Context,
    tenant: Tenant,
    memory_id: Annotated[str | None, typer.Option("--id", help="The quarantined record.")] = None,
    reinstate: Annotated[bool, typer.Option("--reinstate", help="It is right: make it active.")] = False,
    correct: Annotated[str | None, typer.Option("--correct", metavar="TEXT", help="Replace it by TEXT.")] = None,
    value: Annotated[str | None, typer.Option("--value", help="The corrected value (with --correct).")] = None,
    revoke: Annotated[bool, typer.Option("--revoke", help="It is wrong: make it a tombstone.")] = False,
    by: By = None,
    reason: Annotated[str | None, typer.Option(help="Why (recorded on the command).")] = None,
    wait: Wait = True,
    timeout: Timeout = 60.0,
) -> None:
    """Decide on a quarantined record; without an action, list the tenant's open review items."""
    actions = [a for a, on in ((ReviewAction.REINSTATE, reinstate), (ReviewAction.CORRECT, correct is not None),
                               (ReviewAction.REVOKE, revoke)) if on]
    settings = settings_of(ctx)
    if not actions:
        columns, rows = _query(settings, "SELECT memory_id, subject, attribute, value, verification, updated_at, "
                               "reason FROM memory_records WHERE tenant_id = {tenant:String} AND status = "
                               "'quarantined' ORDER BY updated_at", {"tenant": tenant})
        console.print(_table(columns, rows) if rows else f"tenant {tenant} has no open review items")
        return
    if len(actions) > 1:
        raise typer.BadParameter("choose one of --reinstate, --correct TEXT, --revoke")
    if memory_id is None:
        raise typer.BadParameter("an action needs the record's --id")
    if value is not None and correct is None:
        raise typer.BadParameter("--value goes with --correct")
    command = new_command(tenant, MemoryCommandKind.REVIEW, by, reason, memory_id=memory_id, action=actions[0],
                       corrected_content=correct, corrected_value=value)
    submit_command(settings, command, wait, timeout)


@app.command("delete")
def delete_records(
    ctx: typer.Context,
    tenant: Tenant,
    user: Annotated[str | None, typer.Option("--user", help="Every record of this user.")] = None,
    memory_id: Annotated[str | None, typer.Option("--id", help="One record.")] = None,
    by: By = None,
    reason: Annotated[str | None, typer.Option(help="Why (recorded on the tombstones).")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    wait: Wait = True,
    timeout: Timeout = 60.0,
) -> None:
    """Delete one record (--id), a user's records (--user), or, naming neither, the tenant's whole memory: each
    becomes a tombstone, and its content leaves every projection (docs/memory.md)."""
    if user is not None and memory_id is not None:
        raise typer.BadParameter("name --user or --id, not both")
    what = (f"memory {memory_id}" if memory_id else f"every memory of user {user}" if user
            else "EVERY memory record")
    if not yes and not typer.confirm(f"Delete {what} of tenant {tenant}? This cannot be undone", default=False):
        _fail("nothing was deleted")
    command = new_command(tenant, MemoryCommandKind.DELETE, by, reason, memory_id=memory_id, user_id=user)
    submit_command(settings_of(ctx), command, wait, timeout)


def new_command(tenant: str, kind: MemoryCommandKind, by: str | None, reason: str | None, **fields: Any
                ) -> MemoryCommand:
    """An operator's command, issued now by ``by`` (default: this login); a malformed one is a usage error."""
    try:
        return MemoryCommand(command_id=f"cmd-{uuid.uuid4().hex}", tenant_id=tenant, kind=kind,
                             issued_by=by or operator_name(), reason=reason, issued_at=datetime.now(UTC), **fields)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


def submit_command(settings: Settings, command: MemoryCommand, wait: bool, timeout: float) -> None:
    """Publish ``command``; with ``wait``, report what the worker did (exit 1 when it refused or did not apply it
    within ``timeout`` seconds)."""
    if not kafka_answers(settings.bootstrap):
        _fail(unreachable(settings))
    try:
        with console.status(f"publishing {command.kind.value} command {command.command_id}") as status:
            outcome = asyncio.run(submit(settings, command, wait_s=timeout if wait else None,
                                         progress=lambda line: status.update(line)))
    except WorkerNotApplying as error:
        _fail(str(error))
    except TopicMissing as error:
        _fail(str(error))
    except (KafkaError, CtxflowError, OSError, TimeoutError) as error:
        _fail(f"{unreachable(settings)} ({type(error).__name__}: {error})")
    if outcome is None:
        console.print(f"published {command.kind.value} command {command.command_id}; not waiting for the worker")
        return
    _report(outcome)


def _report(outcome: Outcome) -> None:
    command = outcome.command
    if outcome.refused is not None:
        _fail(f"the worker refused command {command.command_id}: {outcome.refused}")
    console.print(f"applied {command.kind.value} command {command.command_id}: {len(outcome.records)} record(s) "
                  "changed")
    if outcome.records:
        console.print(_table(("memory_id", "status", "version", "reason"),
                             [(r.memory_id, r.status.value, r.version, r.reason) for r in outcome.records]))
