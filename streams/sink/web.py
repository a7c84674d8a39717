"""The HTTP answers of a process that may hold the ClickHouse sink: ``POST /query`` and the sink's ``/health``.

Framework-free (the worker serves them through Faust's web views, ``ctxflow sink`` through aiohttp): each
function returns ``(HTTP status, JSON body)``.
"""

from __future__ import annotations

import json
from typing import Any

from ctxflow.sinks.clickhouse import ReadOnlyViolation
from ctxflow.streams.sink.host import SinkHost

JsonAnswer = tuple[int, dict[str, Any]]


def local_query_url(port: int) -> str:
    """The query endpoint of a ctxflow process listening on ``127.0.0.1:port``."""
    return f"http://127.0.0.1:{port}/query"


def answer_query(host: SinkHost | None, request: bytes) -> JsonAnswer:
    """Run the JSON ``request`` ``{"sql": ..., "parameters": {...}}`` on the backend this process holds:
    ``{"columns", "rows"}``; 403 for a statement that would write, 400 for one that fails or a request that is
    not such JSON, 409 (naming the holder) when this process holds no backend. Blocking: call it from a thread."""
    backend = host.backend if host is not None else None
    if backend is None:
        holder = host.health() if host is not None else {"state": "off"}
        where = f"; {holder['owner_role']} pid {holder['owner_pid']} holds it" if holder.get("owner_pid") else ""
        return 409, {"error": f"this process holds no ClickHouse backend (sink {holder['state']}{where}); "
                              "`ctxflow query` finds the process that does"}
    try:
        body = json.loads(request)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
        return 400, {"error": 'send {"sql": "SELECT ...", "parameters": {...}}'}
    try:
        result = backend.query(body["sql"], body.get("parameters"))
    except ReadOnlyViolation as error:
        return 403, {"error": str(error)}
    except Exception as error:
        return 400, {"error": f"{type(error).__name__}: {error}"}
    return 200, result.as_json()
