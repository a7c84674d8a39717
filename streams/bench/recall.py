"""Recall latency over the retrieval index: ``python -m ctxflow.streams.bench.recall [--records N --tenants T]``.

Writes N active memory records (default 100,000) of T tenants (default 100), a seeded mix of tenant, user and
session scopes with 64-dimension embeddings, through the ClickHouse sink's own write path into a fresh chDB
directory, serves ``POST /query`` from this process as a worker does (:func:`streams.sink.web.answer_query`), and
times the SDK's :func:`streams.sdk.recall.find` (SQL, HTTP, JSON, the visibility check) for random runs: lexical
queries and embedding queries, ``k = 5``. Prints one JSON line (p50, p99, max per kind, in ms). ``ctxflow bench``
runs it as phase (e''').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryRecord, MemoryScope, MemoryStatus, MemoryType
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk.recall import find
from ctxflow.streams.sdk.run_context import RunContext
from ctxflow.streams.sink.web import answer_query

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DIMS = 64
_VOCABULARY = (
    "invoice seats region deploy rollback latency budget contract renewal owner timezone pager schedule warehouse "
    "shipment refund discount plan export ledger shard migration backup storage quota alert report dashboard "
    "meeting standup release incident customer vendor supplier account billing")
_WORDS = tuple(_VOCABULARY.split())
_SCOPES = (MemoryScope.TENANT, MemoryScope.USER, MemoryScope.SESSION)


def _records(n: int, tenants: int, rng: random.Random) -> list[MemoryRecord]:
    out = []
    for i in range(n):
        tenant, scope = f"tenant-{i % tenants:03d}", _SCOPES[i % 3]
        owner = {MemoryScope.TENANT: None, MemoryScope.USER: f"u-{rng.randrange(10)}",
                 MemoryScope.SESSION: f"s-{rng.randrange(10)}"}[scope]
        text = " ".join(rng.choices(_WORDS, k=12)) + f" {i}"
        out.append(MemoryRecord(
            memory_id=f"mem-{i:07d}", tenant_id=tenant, user_id=owner if scope is MemoryScope.USER else "u-0",
            session_id=owner if scope is MemoryScope.SESSION else "s-0", scope=scope, type=MemoryType.FACT,
            status=MemoryStatus.ACTIVE, version=2, content=text, content_digest=content_digest(text), created_at=T0,
            updated_at=T0, owner_id=owner, embedding=[rng.uniform(-1, 1) for _ in range(DIMS)]))
    return out


class _Host:
    """What :func:`answer_query` needs of a sink host: the backend this process holds."""

    def __init__(self, sink: ClickHouseSink) -> None:
        self.backend = sink


def _serve(sink: ClickHouseSink, port: int, ready: threading.Event, stop: threading.Event) -> None:
    async def main() -> None:
        async def query(request: web.Request) -> web.Response:
            status, answer = await asyncio.to_thread(answer_query, _Host(sink), await request.read())  # type: ignore[arg-type]
            return web.json_response(answer, status=status)

        app = web.Application()
        app.add_routes([web.post("/query", query)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2), "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


def run(records: int, tenants: int, queries: int, seed: int = 7) -> dict[str, Any]:
    """Write, serve, time; returns the JSON line's fields."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="ctxflow-recall-bench-") as home:
        sink = ClickHouseSink(f"chdb://{Path(home) / 'clickhouse'}")
        sink.ensure_schema()
        began = time.perf_counter()
        for record in _records(records, tenants, rng):
            sink.add(record)
        sink.flush()
        write_s = time.perf_counter() - began
        port, ready, stop = _free_port(), threading.Event(), threading.Event()
        server = threading.Thread(target=_serve, args=(sink, port, ready, stop), daemon=True)
        server.start()
        ready.wait(30)
        settings = Settings(home=Path(home), web_port=port)
        timings: dict[str, list[float]] = {"lexical": [], "vector": []}
        hits = 0
        try:
            for n in range(queries):
                ctx = RunContext(tenant_id=f"tenant-{rng.randrange(tenants):03d}", user_id=f"u-{rng.randrange(10)}",
                                 session_id=f"s-{rng.randrange(10)}", agent_id="bench", model="gpt-4o",
                                 run_id=f"r-{n}")
                kind = "vector" if n % 2 else "lexical"
                embedding = [rng.uniform(-1, 1) for _ in range(DIMS)] if kind == "vector" else None
                query = " ".join(rng.choices(_WORDS, k=3))
                started = time.perf_counter()
                hits += len(find(settings, ctx, query, k=5, embedding=embedding))
                timings[kind].append(time.perf_counter() - started)
        finally:
            stop.set()
            server.join(10)
            sink.close()
    return {"bench": "recall", "records": records, "tenants": tenants, "queries": queries, "k": 5,
            "write_s": round(write_s, 2), "hits_per_query": round(hits / max(queries, 1), 2),
            **{f"{kind}_{name}": value for kind, samples in timings.items()
               for name, value in _percentiles(samples).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--queries", type=int, default=400)
    args = parser.parse_args()
    print(json.dumps(run(args.records, args.tenants, args.queries)))


if __name__ == "__main__":
    main()
