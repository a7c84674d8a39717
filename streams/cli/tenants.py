"""``ctxflow tenants set/get/list`` (budget manifests) and ``ctxflow topics create`` (the topic catalogue).

Manifests live on the compacted ``manifests`` topic keyed by tenant id. Readers show what the worker enforces
(:func:`streams.sdk.manifest_files.latest_per_tenant`): per tenant, the first manifest with the highest version.
``set`` validates the whole file before touching the broker, assigns or checks the
version against the tenant's history, publishes with :meth:`CtxflowClient.set_manifest`, then reads the log
back: of two operators who raced to the same version, the loser is told the worker keeps the other one.

Every command first checks that the broker answers and that the topic exists, through all-topics metadata:
a metadata request naming a missing topic makes Tansu auto-create it with the wrong partition count (the
SDK refuses a missing topic with the same :class:`streams.sdk.TopicMissing`). ``get`` and ``list`` read the
whole log, as ``set`` does, and show what the worker enforces (as ``CtxflowClient.latest_manifest`` does).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from ctxflow.schemas.codec import Codec, RejectedRecord
from ctxflow.schemas.models import TenantManifest
from ctxflow.streams.cli.budget_view import budget_json, budget_tables
from ctxflow.streams.cli.context import operator_name, settings_of, unreachable
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sdk import CtxflowClient, CtxflowError, TopicMissing
from ctxflow.streams.sdk.manifest_files import (
    ManifestFileError,
    StaleVersion,
    assign_version,
    first_with_version,
    latest_per_tenant,
    latest_version,
    load_manifest,
    stamp,
)
from ctxflow.streams.stack.admin import TopicMismatch, ensure_topics
from ctxflow.streams.stack.embedded import kafka_answers
from ctxflow.streams.topics import MANIFESTS
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Tenant budget manifests: set, get, list.", no_args_is_help=True, add_completion=False)
topics_app = typer.Typer(help="The topic catalogue on the broker.", no_args_is_help=True, add_completion=False)
# Wide when piped, so `tenants list` stays one row per tenant in logs and scripts.
console = Console(soft_wrap=True, markup=False, highlight=False, width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
log = logging.getLogger(__name__)
T = TypeVar("T")
ManifestLog = list[tuple[str, TenantManifest | None]]


class VersionRace(RuntimeError):
    """Another manifest with the same version was published first: the worker keeps that one."""


def _fail(message: str) -> NoReturn:
    errors.print(message, style="red")
    raise typer.Exit(1)


def _run(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run broker work; an unreachable broker or a missing topic becomes a message saying what to run."""
    if not kafka_answers(settings.bootstrap):
        work.close()
        _fail(unreachable(settings))
    try:
        return asyncio.run(work)
    except TopicMissing as error:
        _fail(str(error))
    except (KafkaError, CtxflowError, OSError, TimeoutError) as error:
        _fail(f"{unreachable(settings)} ({type(error).__name__}: {error})")


async def read_manifest_log(settings: Settings, timeout_s: float = 15.0) -> ManifestLog:
    """Every ``(tenant_id, manifest, or None for a tombstone)`` on the manifests topic up to its end offsets as
    of the call, in offset order per partition (so per tenant). Undecodable records are logged and skipped."""
    topic, codec = settings.topic(MANIFESTS.name), Codec(settings.schema_registry_url, settings.max_content_bytes)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="ctxflow-tenants")
    found: ManifestLog = []
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            if topic not in await consumer.topics():
                raise TopicMissing(topic, settings)
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            ends = await log_end_offsets(consumer, partitions)
            await consumer.seek_to_beginning(*partitions)
            while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(*partitions, timeout_ms=200)).values():
                    found.extend(entry for record in records if (entry := _entry(codec, record)) is not None)
    finally:
        await consumer.stop()
    return found


def _entry(codec: Codec, record: Any) -> tuple[str, TenantManifest | None] | None:
    try:
        value = None if record.value is None else codec.decode(record.value, TenantManifest)
    except RejectedRecord as error:
        log.warning("skipping undecodable manifest at %s[%s]@%s: %s", record.topic, record.partition,
                    record.offset, error)
        return None
    return (record.key.decode() if record.key is not None else getattr(value, "tenant_id", "")), value


def _history(entries: ManifestLog, tenant_id: str) -> list[TenantManifest]:
    return [m for key, m in entries if key == tenant_id and m is not None]


async def _publish(settings: Settings, draft: TenantManifest, requested: int | None, by: str) -> TenantManifest:
    tenant = draft.tenant_id
    latest = latest_version(_history(await read_manifest_log(settings), tenant))
    manifest = stamp(draft, assign_version(tenant, requested, latest), datetime.now(UTC), by)
    async with CtxflowClient.from_settings(settings, connect_timeout_s=5.0, client_id="ctxflow-tenants") as client:
        await client.set_manifest(manifest)
        await client.flush(timeout_s=30.0)
    kept = first_with_version(_history(await read_manifest_log(settings), tenant), manifest.version)
    if kept != manifest:
        who = "nobody" if kept is None else kept.updated_by
        raise VersionRace(f"version {manifest.version} of tenant {tenant!r} was published first by {who}; the "
                           "worker keeps that one, not this file: run `ctxflow tenants set` again")
    return manifest


@app.command("set")
def set_manifest(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Manifest file: .json, .toml, or .yaml/.yml (needs PyYAML).")],
    version: Annotated[str | None, typer.Option(
        "--version", metavar="auto|N", help="auto: latest + 1 (the default when the file has no version).")] = None,
    by: Annotated[str | None, typer.Option(help="Recorded as updated_by (default: ctxflow-cli:<login>).")] = None,
) -> None:
    """Validate a manifest file and publish it as the tenant's next version; nothing is sent if it is invalid."""
    settings = settings_of(ctx)
    try:
        draft = load_manifest(file)
    except ManifestFileError as error:
        _fail("\n  - ".join([f"{file} is not a valid manifest; nothing was published:", *error.problems]))
    if version is not None and version != "auto" and not version.isdigit():
        raise typer.BadParameter(f"{version!r}: use auto or a positive integer", param_hint="--version")
    requested = None if version == "auto" else int(version) if version else draft.requested_version
    try:
        manifest = _run(settings, _publish(settings, draft.manifest, requested, by or operator_name()))
    except StaleVersion as error:
        _fail(f"{error}; nothing was published")
    except VersionRace as error:
        _fail(str(error))
    console.print(f"published tenant {manifest.tenant_id} version {manifest.version} to "
                  f"{settings.topic(MANIFESTS.name)} (updated_by {manifest.updated_by})")
    for table in budget_tables(manifest.tenant_id, manifest, None):
        console.print(table)


@app.command("get")
def get_manifest(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    user: Annotated[str | None, typer.Option(help="Show the effective budget of this user.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: {manifest, effective_budget}.")] = False,
) -> None:
    """The tenant's latest manifest and effective budget; exits 1 when the tenant has none (default budget)."""
    settings = settings_of(ctx)
    manifest = latest_per_tenant(_run(settings, read_manifest_log(settings))).get(tenant)
    if as_json:
        console.print_json(data={"manifest": None if manifest is None else manifest.model_dump(mode="json"),
                                 "effective_budget": budget_json(tenant, manifest, user)})
    else:
        if manifest is None:
            console.print(f"tenant {tenant} has no manifest: the built-in default budget applies (observe only)")
        for table in budget_tables(tenant, manifest, user):
            console.print(table)
    if manifest is None:
        raise typer.Exit(1)


@app.command("list")
def list_manifests(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Every tenant with a manifest: latest version, tier, total cap, watermark and limit behaviour."""
    settings = settings_of(ctx)
    latest = latest_per_tenant(_run(settings, read_manifest_log(settings)))
    if as_json:
        console.print_json(data=[m.model_dump(mode="json") for m in latest.values()])
        return
    table = Table("tenant", "version", "tier", "total cap", "watermark", "overflow", "hard limit", "user overrides",
                  "updated")
    for m in latest.values():
        table.add_row(m.tenant_id, str(m.version), m.tier, f"{m.total_cap:,}", str(m.soft_watermark),
                      m.overflow.value, m.hard_limit.value, str(len(m.user_overrides)),
                      f"{m.updated_at:%Y-%m-%d %H:%M:%S} by {m.updated_by or '-'}")
    console.print(table if latest else f"no tenant manifests on {settings.topic(MANIFESTS.name)}")


@topics_app.command("create")
def create_topics(ctx: typer.Context) -> None:
    """Create the catalogue's missing topics; existing ones are kept (a mismatching one fails). Idempotent."""
    settings = settings_of(ctx)
    if not kafka_answers(settings.bootstrap):
        _fail(unreachable(settings))
    try:
        facts = ensure_topics(settings)
    except TopicMismatch as error:
        _fail(f"{error}: delete those topics or use another CTXFLOW_TOPIC_PREFIX")
    except (KafkaError, OSError, TimeoutError) as error:
        _fail(f"{unreachable(settings)} ({type(error).__name__}: {error})")
    table = Table("topic", "partitions", "cleanup.policy")
    for name, fact in sorted(facts.items()):
        table.add_row(name, str(fact.partitions), fact.cleanup_policy or "?")
    console.print(table)
