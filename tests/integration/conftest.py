"""Fixtures of the tests that use chDB directly (the sink, its migrations and rollups), without a worker.

chDB hosts one engine per process, so a test module shares one data directory (``chdb_dsn``) and each test gets
a database of its own; clients are closed after each test, so the engine is free for the next module's path.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from ctxflow.sinks.clickhouse import ClickHouseSink


@pytest.fixture(scope="module")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module's chDB data directory."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def sink(chdb_dsn: str) -> Iterator[ClickHouseSink]:
    """A sink on a database of its own, schema created; closed after the test."""
    made = ClickHouseSink(chdb_dsn, database=f"t_{uuid.uuid4().hex[:12]}")
    made.ensure_schema()
    yield made
    made.close()


@pytest.fixture
def admin(chdb_dsn: str, sink: ClickHouseSink) -> Iterator[Client]:
    """A writable client on the sink's database: holds merges off, refreshes views, looks at unmerged rows."""
    client = clickhouse_connect.get_client(dsn=chdb_dsn, database=sink.database)
    yield client
    client.close()
