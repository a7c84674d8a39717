"""The S3-compatible payload store against a real S3 server process (moto's standalone server on a free loopback
port): the local store's guarantees hold, and a worker configured with ``CTXFLOW_PAYLOAD_STORE=s3://...`` stores
large memory payloads there before producing the records naming them."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ctxflow.processors.memory.processor import payload_ref
from ctxflow.schemas import content_digest
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import MemoryRecord, MemoryScope, MemoryType, SlotCaps, TenantManifest
from ctxflow.sinks.payloads import CorruptPayload
from ctxflow.sinks.s3_payloads import S3PayloadStore
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.payloads import open_payload_store
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import fresh_settings
from tests.support_kafka import read_topics, wait_processed
from tests.support_traffic import publish

TEXT = "Working style: small pull requests, tests first. " * 300
BUCKET = "ctxflow-payloads"
KEYS = {"payload_s3_region": "us-east-1", "payload_s3_access_key_id": "test",
        "payload_s3_secret_access_key": "test"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        store = S3PayloadStore.connect(BUCKET, endpoint_url=url, region="us-east-1", access_key_id="test",
                                       secret_access_key="test")
        store.client.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _store(endpoint: str, prefix: str) -> S3PayloadStore:
    store = open_payload_store(Settings(payload_store=f"s3://{BUCKET}/{prefix}", payload_s3_endpoint=endpoint, **KEYS))
    assert isinstance(store, S3PayloadStore)
    return store


def test_a_payload_round_trips_idempotently_under_its_prefix(s3_endpoint: str) -> None:
    store = _store(s3_endpoint, "rt")
    ref = payload_ref("acme", content_digest(TEXT))
    store.put(ref, TEXT.encode())
    store.put(ref, TEXT.encode())  # a replayed write
    assert store.get(ref).decode() == TEXT
    listed = store.client.list_objects_v2(Bucket=BUCKET, Prefix="rt/")["Contents"]
    assert [o["Key"] for o in listed] == [f"rt/{ref}"]


def test_damage_is_detected_tenants_are_separate_and_delete_is_idempotent(s3_endpoint: str) -> None:
    store = _store(s3_endpoint, "checks")
    mine, theirs = payload_ref("acme", content_digest(TEXT)), payload_ref("ACME", content_digest(TEXT))
    with pytest.raises(CorruptPayload):
        store.put(mine, b"something else")
    store.put(mine, TEXT.encode())
    with pytest.raises(KeyError):
        store.get(theirs)
    store.client.put_object(Bucket=BUCKET, Key=f"checks/{mine}", Body=b"tampered")
    with pytest.raises(CorruptPayload):
        store.get(mine)
    store.delete(mine)
    store.delete(mine)
    with pytest.raises(KeyError):
        store.get(mine)
    with pytest.raises(ValueError, match="not a payload key"):
        store.get("../etc/passwd")


def test_the_worker_stores_large_memory_payloads_in_the_bucket(
    s3_endpoint: str, stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = fresh_settings(stack, tmp_path_factory.mktemp("s3-worker") / "home")
    settings = base.model_copy(update={"payload_store": f"s3://{BUCKET}/worker", "payload_s3_endpoint": s3_endpoint,
                                       **KEYS})
    now = datetime.now(UTC)
    run = RunContext(tenant_id="s3-e2e", user_id="ada", session_id="s-1", agent_id="a", model="gpt-4o")
    big = "Runbook.\n" + "\n".join(f"step {i}: check shard {i:04d}" for i in range(600))
    with WorkerProcess(settings):
        publish(settings, [TenantManifest(tenant_id="s3-e2e", version=1, tier="pro", slot_caps=SlotCaps(),
                                          total_cap=1_000_000, updated_at=now), run.started(at=now),
                           run.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, big, confidence=0.9, at=now)])
        wait_processed(settings, sink=False)
    codec = Codec(settings.schema_registry_url)
    records = [codec.decode(r.value, MemoryRecord)
               for r in asyncio.run(read_topics(settings, ["memory.records"]))]
    (ref,) = {r.payload_ref for r in records if r.tenant_id == "s3-e2e"}
    assert ref is not None
    stored = _store(s3_endpoint, "worker").get(ref)
    assert hashlib.sha256(stored).hexdigest() == content_digest(big) and stored.decode() == big
    assert not Path(settings.payload_root).exists()  # nothing went to the local directory
