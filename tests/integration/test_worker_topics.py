"""``ctxflow worker`` makes its topics as the catalogue says, or refuses to start when existing ones differ."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerNotReady, WorkerProcess
from ctxflow.streams.topics import ALL_TOPICS, TURNS

from tests.support_kafka import broker_topics, catalogue_facts


def test_worker_on_a_bare_broker_creates_every_topic_as_the_catalogue_says(stack: EmbeddedStack,
                                                                            tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    bare = stack.settings.model_copy(update={"topic_prefix": f"bare{tag}", "app_id": f"app-{tag}",
                                             "home": tmp_path, "web_port": free_port()})
    assert not broker_topics(bare)
    with WorkerProcess(bare):
        found = catalogue_facts(bare)
    # Left to Faust and the broker, the manifests topic came without its compact policy and the decisions and
    # dead-letter topics did not exist until the first produce made the broker create them its own way.
    for spec in ALL_TOPICS:
        name = spec.full_name(bare)
        assert name in found, f"{name} missing"
        assert found[name].partitions == spec.partition_count(bare), name
        assert found[name].cleanup_policy == spec.cleanup, name


def test_worker_refuses_to_start_on_topics_that_differ_from_the_catalogue(settings: Settings) -> None:
    # The test's topics exist with settings.partitions; a worker configured for another count must not run on
    # them: tenants would be read from partitions other than the ones their producers write.
    wrong = settings.model_copy(update={"partitions": settings.partitions + 1})
    with pytest.raises(WorkerNotReady) as refused:
        WorkerProcess(wrong).start(ready_timeout_s=60)
    message = str(refused.value)
    assert "ctxflow worker cannot start" in message
    assert settings.topic(TURNS.name) in message
    assert "CTXFLOW_PARTITIONS" in message
    assert catalogue_facts(settings)[settings.topic(TURNS.name)].partitions == settings.partitions
