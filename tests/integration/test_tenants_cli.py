"""``ctxflow tenants`` and ``ctxflow topics`` through the installed entry point, against the embedded broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import ItemKind, Role, Slot
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sdk import CtxflowClient, RunContext
from ctxflow.streams.sdk.manifest_files import load_manifest
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import fresh_settings
from tests.support_kafka import broker_topics, send_one_batch

CTXFLOW = Path(sys.executable).with_name("ctxflow")
EXAMPLES = Path(__file__).parents[2] / "examples" / "manifests"


def ctxflow(settings: Settings, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real CLI with only the deployment's address and topic prefix in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXFLOW_")}
    env |= {"CTXFLOW_BOOTSTRAP": settings.bootstrap, "CTXFLOW_TOPIC_PREFIX": settings.topic_prefix,
            "CTXFLOW_PARTITIONS": str(settings.partitions)}
    return subprocess.run([str(CTXFLOW), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def served(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, WorkerProcess]]:
    """One deployment with a worker for the tests that need the worker to act on a manifest (a worker costs
    several seconds to start); they use tenants of their own."""
    settings = fresh_settings(stack, tmp_path_factory.mktemp("tenants-cli") / "home")
    with WorkerProcess(settings) as worker:
        yield settings, worker


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The body rows of a printed table, by first cell."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in cells}


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def small_manifest(tenant: str, total_cap: int) -> dict[str, Any]:
    return {"tenant_id": tenant, "tier": "free", "slot_caps": {}, "total_cap": total_cap,
            "overflow": "evict_and_compress", "hard_limit": "reject"}


def test_set_get_list_round_trip(settings: Settings, tmp_path: Path) -> None:
    for name in ("free", "standard", "enterprise"):
        assert "version 1" in ok(ctxflow(settings, "tenants", "set", str(EXAMPLES / f"{name}.json"), cwd=tmp_path))

    shown = json.loads(ok(ctxflow(settings, "tenants", "get", "globex", "--json", cwd=tmp_path)))
    published = shown["manifest"]
    expected = load_manifest(EXAMPLES / "enterprise.json").manifest.model_dump(mode="json")
    assert published["version"] == 1 and published["updated_by"].startswith("ctxflow-cli")
    drop = ("version", "updated_at", "updated_by")
    assert {k: v for k, v in published.items() if k not in drop} == {k: v for k, v in expected.items() if k not in drop}
    assert shown["effective_budget"]["gauges"]["total context"]["source"] == "tenant"

    # The intern's override shadows the total cap; the enterprise tier's 15% grace moves the hard limit.
    intern = json.loads(ok(ctxflow(settings, "tenants", "get", "globex", "--user", "intern", "--json", cwd=tmp_path)))
    total = intern["effective_budget"]["gauges"]["total context"]
    assert total == {"cap": 32_000, "soft_at": 28_800, "hard_at": 36_800, "source": "user override (intern)"}
    assert intern["effective_budget"]["spend_windows"]["user"] == [
        {"window": "day", "max_tokens": 1_000_000, "max_cost_micros": 20_000_000}]
    table = ok(ctxflow(settings, "tenants", "get", "globex", "--user", "intern", cwd=tmp_path))
    assert "user override (intern)" in table and "eviction down to 80% of cap" in table

    listed = ok(ctxflow(settings, "tenants", "list", cwd=tmp_path))
    rows = table_rows(listed)  # tenant: version, tier, total cap, watermark, overflow, hard limit, overrides, ...
    assert set(rows) == {"acme", "globex", "hobbyist"}
    assert rows["globex"][:7] == ["1", "enterprise", "200,000", "0.9", "evict_and_compress", "flag", "3"]
    assert rows["hobbyist"][:7] == ["1", "free", "16,000", "0.85", "reject", "reject", "0"]

    missing = ctxflow(settings, "tenants", "get", "nobody", cwd=tmp_path)
    assert missing.returncode == 1 and "built-in default budget applies" in missing.stdout


def test_versions_grow_and_a_stale_version_is_refused(settings: Settings, tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.json", small_manifest("acme", 5000))
    for version in (1, 2, 3):
        assert f"version {version} " in ok(ctxflow(settings, "tenants", "set", str(manifest), cwd=tmp_path))

    stale = ctxflow(settings, "tenants", "set", str(manifest), "--version", "3", cwd=tmp_path)
    assert stale.returncode == 1
    assert "at version 3: version 3 would be ignored" in stale.stderr and "publish 4" in stale.stderr
    pinned = write(tmp_path / "pinned.json", {**small_manifest("acme", 4000), "version": 2})
    assert ctxflow(settings, "tenants", "set", str(pinned), cwd=tmp_path).returncode == 1

    jump = write(tmp_path / "jump.json", {**small_manifest("acme", 4000), "version": 10})
    assert "version 10 " in ok(ctxflow(settings, "tenants", "set", str(jump), cwd=tmp_path))
    assert "version 11 " in ok(ctxflow(settings, "tenants", "set", str(jump), "--version", "auto", cwd=tmp_path))
    listed = json.loads(ok(ctxflow(settings, "tenants", "list", "--json", cwd=tmp_path)))
    assert [(m["tenant_id"], m["version"], m["total_cap"]) for m in listed] == [("acme", 11, 4000)]
    assert manifest_records(settings) == 5  # the refused ones were never published


def test_versions_published_in_one_batch_are_all_read(settings: Settings, tmp_path: Path) -> None:
    # An SDK client batches what it sends within linger_ms; the broker reports such a batch short of its end.
    first = Workload(seed=3, tenants=1).manifests()[0]
    versions = [first.model_copy(update={"version": v, "total_cap": 10_000 * v}) for v in (1, 2, 3, 4)]
    asyncio.run(send_one_batch(settings, settings.topic("manifests"), first.tenant_id.encode(),
                               [Codec().encode(m) for m in versions]))

    shown = json.loads(ok(ctxflow(settings, "tenants", "get", first.tenant_id, "--json", cwd=tmp_path)))
    assert (shown["manifest"]["version"], shown["manifest"]["total_cap"]) == (4, 40_000)
    listed = json.loads(ok(ctxflow(settings, "tenants", "list", "--json", cwd=tmp_path)))
    assert [(m["tenant_id"], m["version"]) for m in listed] == [(first.tenant_id, 4)]
    assert manifest_records(settings) == 4
    manifest = write(tmp_path / "next.json", small_manifest(first.tenant_id, 5_000))
    assert "version 5 " in ok(ctxflow(settings, "tenants", "set", str(manifest), cwd=tmp_path))


def test_an_invalid_file_is_refused_with_every_field_named(settings: Settings, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", {**small_manifest("acme", 1000), "overflow": "drop", "soft_watermark": 1.5,
                                        "slot_caps": {"histroy": 10}})
    result = ctxflow(settings, "tenants", "set", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "nothing was published" in result.stderr
    assert "overflow: Input should be 'evict_and_compress' or 'reject' (got 'drop')" in result.stderr
    assert "soft_watermark: Input should be less than or equal to 1 (got 1.5)" in result.stderr
    assert "slot_caps.histroy: unknown field (allowed: history, output" in result.stderr

    inconsistent = write(tmp_path / "inconsistent.json", {**small_manifest("acme", 1000), "slot_caps": {"tools": 5000}})
    result = ctxflow(settings, "tenants", "set", str(inconsistent), cwd=tmp_path)
    assert result.returncode == 1 and "slot_caps.tools (5000) exceeds total_cap (1000)" in result.stderr
    assert manifest_records(settings) == 0


def test_an_unreachable_broker_says_what_to_run(settings: Settings, tmp_path: Path) -> None:
    nowhere = settings.model_copy(update={"bootstrap": f"127.0.0.1:{free_port()}"})
    for args in (("tenants", "list"), ("tenants", "get", "acme"), ("topics", "create"),
                 ("tenants", "set", str(EXAMPLES / "free.json"))):
        result = ctxflow(nowhere, *args, cwd=tmp_path)
        assert result.returncode == 1, args
        assert f"cannot reach the Kafka broker at {nowhere.bootstrap}" in result.stderr
        assert "ctxflow up" in result.stderr and "CTXFLOW_BOOTSTRAP" in result.stderr


def test_topics_create_is_idempotent_and_tenants_need_it(settings: Settings, tmp_path: Path) -> None:
    fresh = settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:12]}"})
    result = ctxflow(fresh, "tenants", "list", cwd=tmp_path)
    assert result.returncode == 1 and "ctxflow topics create" in result.stderr
    assert not broker_topics(fresh), "reading manifests must not auto-create the topic"

    first, second = (ctxflow(fresh, "topics", "create", cwd=tmp_path) for _ in range(2))
    assert ok(first) == ok(second)
    assert table_rows(first.stdout)[fresh.topic("manifests")] == [str(fresh.partitions), "compact"]
    assert set(ensure_topics(fresh)) == broker_topics(fresh)  # everything the catalogue wants, as it wants it
    assert "no tenant manifests" in ok(ctxflow(fresh, "tenants", "list", cwd=tmp_path))


def test_the_worker_enforces_a_lowered_total_cap(served: tuple[Settings, WorkerProcess], tmp_path: Path) -> None:
    settings, worker = served
    for tenant in ("shrink", "steady"):
        ok(ctxflow(settings, "tenants", "set", str(write(tmp_path / f"{tenant}.json", small_manifest(tenant, 10_000))),
                   cwd=tmp_path))
    before = {tenant: publish_turns(settings, tenant, 4, 130) for tenant in ("shrink", "steady")}
    worker.wait_caught_up()
    assert decisions(worker, "shrink", before["shrink"]) == set()

    lowered = ctxflow(settings, "tenants", "set", str(write(tmp_path / "low.json", small_manifest("shrink", 600))),
                      cwd=tmp_path)
    assert "version 2 " in ok(lowered)
    worker.wait_caught_up()  # the worker holds v2 before the next turns arrive
    after = {tenant: publish_turns(settings, tenant, 5, 130) for tenant in ("shrink", "steady")}
    worker.wait_caught_up()

    # Free tier: soft from 0.85 * 600 = 510 tokens, hard at the cap itself (no grace); reject tier rejects. At
    # 520 the run's four items are all among the newest four the planner keeps; at 650 the hard limit rejects,
    # and the planner, the slot now over its cap, offloads down to 60% of the new cap: the state is back to ok.
    assert decisions(worker, "shrink", after["shrink"]) == {
        ("budget_state", "soft", 520, 600, 2), ("eviction_request", "soft", 520, 600, 2),
        ("budget_state", "hard", 650, 600, 2), ("eviction_request", "hard", 650, 600, 2),
        ("rejection", "hard", 650, 600, 2), ("offload", None, 260, 600, 2), ("budget_state", "ok", 260, 600, 2),
    }
    assert decisions(worker, "steady", after["steady"]) == set()  # another tenant's change is not ours


def test_a_user_defined_tier_gets_the_qos_its_manifest_gives(
    served: tuple[Settings, WorkerProcess], tmp_path: Path
) -> None:
    settings, worker = served
    gold = small_manifest("goldco", 600) | {"tier": "gold", "qos": {"grace": 1.5, "evict_to": 0.8}}
    typo = small_manifest("typoco", 600) | {"tier": "enterprize"}
    for document in (gold, typo):
        ok(ctxflow(settings, "tenants", "set", str(write(tmp_path / "m.json", document)), cwd=tmp_path))
    shown = json.loads(ok(ctxflow(settings, "tenants", "get", "goldco", "--json", cwd=tmp_path)))
    assert shown["effective_budget"]["qos"] == {"grace": 1.5, "evict_to": 0.8, "source": "the manifest's qos"}
    assert shown["effective_budget"]["gauges"]["total context"]["hard_at"] == 900
    assert "'enterprize' is not a built-in tier" in ok(ctxflow(settings, "tenants", "get", "typoco", cwd=tmp_path))

    # Soft from 510 tokens, hard only at 900 (grace 1.5); an eviction asks to come down to 80% of the cap, and
    # the planner offloads one 130-token item to get there (a free-tier run would go down to 60%).
    run = publish_turns(settings, "goldco", 5, 130)
    worker.wait_caught_up()
    assert decisions(worker, "goldco", run) == {
        ("budget_state", "soft", 520, 600, 1), ("eviction_request", "soft", 520, 600, 1),
        ("offload", None, 390, 600, 1), ("budget_state", "ok", 390, 600, 1)}
    reason = worker.scalar(f"SELECT reason FROM decisions WHERE tenant_id = 'goldco' AND run_id = '{run}' "
                           "AND kind = 'eviction_request'")
    assert "evict or compress at least 40 tokens to reach 480 (80% of cap 600, tier gold)" in reason


def publish_turns(settings: Settings, tenant: str, count: int, tokens: int) -> str:
    """Publish ``count`` history turns of ``tokens`` each in a new run of ``tenant``; return the run id."""
    run = RunContext(tenant_id=tenant, user_id="u1", session_id="s1", agent_id="agent", model="gpt-4")

    async def publish() -> None:
        async with CtxflowClient.from_settings(settings) as client:
            for i in range(count):
                await client.publish_turn(run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"turn {i}",
                                                   token_count=tokens))

    asyncio.run(publish())
    return run.run_id


def decisions(worker: WorkerProcess, tenant: str, run_id: str) -> set[tuple[Any, ...]]:
    rows = worker.query(
        "SELECT kind, state, used_tokens, cap_tokens, manifest_version FROM decisions "
        f"WHERE tenant_id = '{tenant}' AND run_id = '{run_id}'"
    ).rows
    return {tuple(row) for row in rows}


def manifest_records(settings: Settings) -> int:
    """Records on the manifests topic (nothing compacts them on Tansu)."""

    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
        await consumer.start()
        try:
            topic = settings.topic("manifests")
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            return sum((await log_end_offsets(consumer, partitions)).values())
        finally:
            await consumer.stop()

    return asyncio.run(count())
