"""The embedded stack: real servers come up, answer, carry records, and leave no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.admin import TopicMismatch, ensure_topics
from ctxflow.streams.stack.embedded import (
    EmbeddedStack,
    StackStartError,
    StackState,
    kafka_answers,
    redis_answers,
    redis_host_port,
)
from ctxflow.streams.stack.processes import pid_alive
from ctxflow.streams.topics import ALL_TOPICS, MANIFESTS, TURNS

from tests.conftest import loopback_settings
from tests.support_kafka import catalogue_facts

CTXFLOW = Path(sys.executable).parent / "ctxflow"


def wait_gone(pids: Iterable[int], timeout_s: float = 10.0) -> list[int]:
    """Pids still alive when ``timeout_s`` runs out (empty when all exited)."""
    deadline = time.monotonic() + timeout_s
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def can_listen(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def test_stack_servers_answer(stack: EmbeddedStack) -> None:
    assert kafka_answers(stack.settings.bootstrap)
    client = redis.Redis.from_url(stack.settings.redis_url)
    try:
        client.set("ctxflow:test:ping", "pong")
        assert client.get("ctxflow:test:ping") == b"pong"
    finally:
        client.close()
    assert (stack.settings.home / "clickhouse").is_dir()
    assert set(stack.startup_s) == {"broker", "redis"}


def test_topics_match_catalogue(settings: Settings) -> None:
    found = catalogue_facts(settings)
    for spec in ALL_TOPICS:
        topic = found[spec.full_name(settings)]
        assert topic.partitions == spec.partition_count(settings)
        assert topic.cleanup_policy == spec.cleanup
    assert ensure_topics(settings) == found  # a second run accepts what exists and changes nothing


def test_existing_topic_with_other_partition_count_is_refused(settings: Settings) -> None:
    with pytest.raises(TopicMismatch, match=settings.topic(TURNS.name)):
        ensure_topics(settings.model_copy(update={"partitions": settings.partitions + 1}), [TURNS, MANIFESTS])


def test_records_round_trip_and_a_key_keeps_its_partition(settings: Settings) -> None:
    topic = settings.topic(TURNS.name)

    async def round_trip() -> list[tuple[bytes | None, bytes | None, int]]:
        bootstrap = settings.bootstrap
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=settings.app_id, auto_offset_reset="earliest"
        )
        await producer.start()
        await consumer.start()
        try:
            for i in range(6):
                key = b"tenant-a" if i % 2 else b"tenant-b"
                await producer.send_and_wait(topic, f"turn-{i}".encode(), key=key)
            got: list[tuple[bytes | None, bytes | None, int]] = []
            deadline = time.monotonic() + 15
            while len(got) < 6 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend((r.key, r.value, r.partition) for r in records)
            return got
        finally:
            await consumer.stop()
            await producer.stop()

    got = asyncio.run(round_trip())
    assert sorted(value for _, value, _ in got) == [f"turn-{i}".encode() for i in range(6)]
    partitions = {key: {p for k, _, p in got if k == key} for key, _, _ in got}
    assert all(len(parts) == 1 for parts in partitions.values())


def test_short_fetch_wait_keeps_produce_to_consume_latency_low(settings: Settings) -> None:
    """Tansu answers a parked fetch only at bisection points of max-wait, so the wait bounds latency."""
    topic = settings.topic(TURNS.name)
    tp = TopicPartition(topic, 0)

    async def latencies() -> list[float]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=0)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, fetch_max_wait_ms=10)
        await producer.start()
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            out = []
            for i in range(10):
                sent = time.perf_counter()
                await producer.send_and_wait(topic, str(i).encode(), partition=0)
                await asyncio.wait_for(consumer.getone(), 10)
                out.append(time.perf_counter() - sent)
            return out
        finally:
            await consumer.stop()
            await producer.stop()

    assert statistics.median(asyncio.run(latencies())) < 0.1


def test_no_process_outlives_the_stack(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path)
    with EmbeddedStack(settings) as stack:
        pids = list(stack.pids.values())
        assert all(pid_alive(pid) for pid in pids)
    assert wait_gone(pids) == []
    assert can_listen(*redis_host_port(settings.redis_url))


def test_killed_servers_restart_on_their_addresses(private_stack: EmbeddedStack) -> None:
    settings = private_stack.settings
    ensure_topics(settings, [TURNS])
    first = private_stack.pids
    private_stack.kill("redis")
    private_stack.kill("broker")
    assert not redis_answers(settings.redis_url)
    assert not kafka_answers(settings.bootstrap)
    private_stack.restart("broker")
    private_stack.restart("redis")
    assert redis_answers(settings.redis_url)
    assert set(ensure_topics(settings, [TURNS])) == {settings.topic(TURNS.name)}  # memory broker: made anew
    assert set(private_stack.pids.values()).isdisjoint(first.values())


def test_failed_start_stops_what_already_started(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(redis_host_port(settings.redis_url))
        squatter.listen()
        stack = EmbeddedStack(settings)
        with pytest.raises(StackStartError, match="redis"):
            stack.start()
    assert list(stack.pids) == ["broker"]
    assert wait_gone(stack.pids.values()) == []


def test_server_that_dies_during_startup_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot load module' >&2\nexit 3\n")
    fake.chmod(0o755)
    stack = EmbeddedStack(loopback_settings(tmp_path, redis_server_bin=str(fake)))
    with pytest.raises(StackStartError, match=r"(?s)redis exited with 3.*FATAL: cannot load module"):
        stack.start()
    assert wait_gone(stack.pids.values()) == []


def test_servers_die_when_the_owning_process_is_sigkilled(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path)
    script = textwrap.dedent(f"""
        import json, sys
        from ctxflow.streams.config import Settings
        from ctxflow.streams.stack.embedded import EmbeddedStack
        settings = Settings.model_validate_json({settings.model_dump_json()!r})
        with EmbeddedStack(settings) as stack:
            print(json.dumps(stack.pids), flush=True)
            sys.stdin.readline()
    """)
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path.cwd()
    )
    try:
        assert owner.stdout is not None
        pids = list(json.loads(owner.stdout.readline()).values())
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        owner.send_signal(signal.SIGKILL)
    finally:
        owner.kill()
        owner.communicate()
    assert wait_gone(pids) == []


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CTXFLOW), *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_up_status_down(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path / "home")
    # Home through the environment, addresses through flags: both routes must reach Settings.
    env = {**os.environ, "CTXFLOW_HOME": str(settings.home), "CTXFLOW_TOPIC_PREFIX": "clitest"}
    flags = ["--bootstrap", settings.bootstrap, "--redis-url", settings.redis_url]

    up = run_cli(*flags, "up", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"export CTXFLOW_BOOTSTRAP={settings.bootstrap}" in up.stdout
    state = StackState.load(settings.home)
    assert state is not None and all(state.alive().values())
    try:
        assert redis_answers(settings.redis_url)
        # No --partitions flag: `up` makes the default count, not the four the test fixtures use.
        default_partitions = Settings.model_fields["partitions"].default
        clitest = settings.model_copy(update={"topic_prefix": "clitest", "partitions": default_partitions})
        assert ensure_topics(clitest)  # raises TopicMismatch if `up` had created anything else
        assert run_cli("status", env=env).returncode == 0
        assert run_cli(*flags, "up", env=env).returncode == 1  # refuses to start a second stack
    finally:
        down = run_cli("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert wait_gone(p.pid for p in state.processes.values()) == []
    assert StackState.load(settings.home) is None
    assert run_cli("status", env=env).returncode == 1


def test_cli_up_in_the_foreground_stops_everything_on_sigterm(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path)
    argv = [str(CTXFLOW), "--home", str(settings.home), "--bootstrap", settings.bootstrap,
            "--redis-url", settings.redis_url, "up", "--foreground"]
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert cli.stdout is not None
        banner = cli.stdout.readline()
        pids = [int(pid) for pid in re.findall(r"pid (\d+)", banner)]
        assert len(pids) == 2, banner
        assert kafka_answers(settings.bootstrap)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 0
    finally:
        cli.kill()
        cli.communicate()
    assert wait_gone(pids) == []


def test_cli_up_that_fails_leaves_nothing_running(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path)
    env = {**os.environ, "CTXFLOW_HOME": str(settings.home)}
    with socket.socket() as squatter:
        squatter.bind(redis_host_port(settings.redis_url))
        squatter.listen()
        up = run_cli("--bootstrap", settings.bootstrap, "--redis-url", settings.redis_url, "up", env=env)
    assert up.returncode == 1
    assert "redis" in up.stdout
    assert StackState.load(settings.home) is None
    assert not kafka_answers(settings.bootstrap)
