"""Topic administration: make the broker's topics match the catalogue in ``streams.topics``.

``ensure_topics`` creates every catalogue topic under the deployment's prefix with its partition count and
``cleanup.policy``, accepts topics that already exist, and then checks that what exists matches: a topic with
the wrong partition count would silently move tenants between partitions (breaking one-writer-per-tenant),
and a compacted topic created as ``delete`` would lose manifests and memory records.

Tansu 0.6 (memory storage) honours ``cleanup.policy`` in CreateTopics and reports it in DescribeConfigs,
but does not compact: superseded values of a key stay readable. Consumers of compacted topics must
therefore take the last value per key, which they must do anyway while a real broker has not compacted yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code
from ctxflow.streams.config import Settings
from ctxflow.streams.topics import ALL_TOPICS, TopicSpec

logger = logging.getLogger(__name__)


class TopicMismatch(RuntimeError):
    """An existing topic differs from the catalogue in partition count or cleanup policy."""


@dataclass(frozen=True, slots=True)
class TopicFacts:
    """What the broker says about one topic."""

    partitions: int
    cleanup_policy: str | None


async def describe_topics(admin: AIOKafkaAdminClient, names: Iterable[str]) -> dict[str, TopicFacts]:
    """Partition count and ``cleanup.policy`` of each named topic that exists (absent ones are left out).

    Only topics found in all-topics metadata are asked about by name: a metadata request naming a missing topic
    may make the broker auto-create it with its own defaults.
    """
    existing = set(await admin.list_topics())
    wanted = [name for name in names if name in existing]
    if not wanted:
        return {}
    metadata = await admin.describe_topics(wanted)
    partitions = {t["topic"]: len(t["partitions"]) for t in metadata if t["error_code"] == 0}
    policies: dict[str, str | None] = dict.fromkeys(partitions)
    if partitions:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in partitions]
        for response in await admin.describe_configs(resources):
            for resource in response.resources:
                error_code, _, _, name, entries = resource[:5]
                if error_code == 0 and name in policies:
                    policies[name] = next((e[1] for e in entries if e[0] == "cleanup.policy"), None)
    return {name: TopicFacts(count, policies[name]) for name, count in partitions.items()}


async def ensure_topics_async(
    settings: Settings, specs: Iterable[TopicSpec] = ALL_TOPICS
) -> dict[str, TopicFacts]:
    """Create missing catalogue topics; raise ``TopicMismatch`` if an existing one differs. Idempotent."""
    wanted = {
        spec.full_name(settings): NewTopic(
            spec.full_name(settings),
            spec.partition_count(settings),
            replication_factor=1,
            topic_configs={"cleanup.policy": spec.cleanup},
        )
        for spec in specs
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id=f"{settings.app_id}-admin")
    await admin.start()
    try:
        # Only what is missing, so a deployment whose topics exist needs no right to create topics.
        facts = await describe_topics(admin, wanted)
        missing = [topic for name, topic in wanted.items() if name not in facts]
        if missing:
            response = await admin.create_topics(missing)
            for name, error_code, message in response.topic_errors:
                error = for_code(error_code) if error_code else None
                if error is not None and error is not TopicAlreadyExistsError:  # another process was quicker
                    raise error(f"creating topic {name}: {message}")
                if error is None:
                    logger.info("created topic %s", name)
            facts = await describe_topics(admin, wanted)
    finally:
        await admin.close()
    problems = [
        f"{name}: want {topic.num_partitions} partitions/{topic.topic_configs['cleanup.policy']}, "
        f"have {facts[name].partitions}/{facts[name].cleanup_policy}" if name in facts else f"{name}: missing"
        for name, topic in wanted.items()
        if name not in facts
        or facts[name].partitions != topic.num_partitions
        or facts[name].cleanup_policy not in (None, topic.topic_configs["cleanup.policy"])
    ]
    if problems:
        raise TopicMismatch("topics differ from the catalogue: " + "; ".join(problems))
    return facts


def ensure_topics(settings: Settings, specs: Iterable[TopicSpec] = ALL_TOPICS) -> dict[str, TopicFacts]:
    """Blocking form of :func:`ensure_topics_async`, for the CLI and test fixtures (no running loop)."""
    return asyncio.run(ensure_topics_async(settings, specs))
