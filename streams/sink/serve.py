"""``ctxflow sink``: the ClickHouse sink as a process of its own, with ``POST /query`` and ``GET /health``.

Against a ClickHouse server, run as many as the projected topics have partitions: they share them through their
consumer group. Against an embedded chDB, one process holds the directory: run the deciding workers with
``CTXFLOW_SINK=off`` beside it (with ``auto`` they would take the sink over only after this process exits).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.stop_deadline import StopDeadline, stop_on_signals
from ctxflow.streams.sink.host import SinkHost
from ctxflow.streams.sink.web import answer_query, local_query_url

log = logging.getLogger(__name__)


def run_sink(settings: Settings) -> None:
    """Run a standalone sink in the foreground until SIGTERM or SIGINT (exits within the stop deadline).

    Raises :class:`~.ownership.BackendHeld` at once when another process holds the chDB directory.
    """
    host = SinkHost(settings, role="sink", query_url=local_query_url(settings.sink_web_port), take_over=False)
    host.claim()
    asyncio.run(_serve(settings, host))


async def _serve(settings: Settings, host: SinkHost) -> None:
    stop_on_signals(StopDeadline("the clickhouse sink", "what it had not committed is written again by the next "
                                 "sink of its group (rows collapse by identity)"), host.stop)

    async def query(request: web.Request) -> web.Response:
        status, answer = await asyncio.to_thread(answer_query, host, await request.read())
        return web.json_response(answer, status=status)

    async def health(request: web.Request) -> web.Response:
        return web.json_response(host.health())

    app = web.Application()
    app.add_routes([web.post("/query", query), web.get("/health", health)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.sink_web_port).start()
    try:
        await host.serve()
    finally:
        await runner.cleanup()
