"""Analyst queries from the command line.

chDB hosts one engine per process and locks its data directory, so while a process holds the ClickHouse sink
(a worker, or ``ctxflow sink``) it is the only one that can open the chDB path. ``run_query`` therefore asks that
process (``POST /query`` at the URL its owner file names, :mod:`streams.sink.ownership`), else the worker on
``web_port``, and opens the DSN itself only when none answers. Against a ClickHouse server the worker is not
needed, but going through it keeps one code path.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from ctxflow.sinks.clickhouse import QueryResult
from ctxflow.streams.config import Settings
from ctxflow.streams.sink.ownership import current_owner, open_backend
from ctxflow.streams.sink.web import local_query_url

log = logging.getLogger(__name__)


class QueryFailed(Exception):
    """The query was refused or failed; the message says why and what to do."""


def worker_url(settings: Settings) -> str:
    """Where the local worker serves queries."""
    return local_query_url(settings.web_port)


def query_url(settings: Settings) -> str:
    """Where queries go: the live holder of the chDB directory when it announced one, else the local worker."""
    owner = current_owner(settings)
    return owner.query_url if owner is not None and owner.query_url else worker_url(settings)


def run_query(settings: Settings, sql: str, timeout_s: float = 60.0, *, direct_fallback: bool = True,
              parameters: dict[str, Any] | None = None) -> QueryResult:
    """Run a read-only query where :func:`query_url` says, else (``direct_fallback``) on the DSN itself.

    ``parameters`` bind ``{name:Type}`` placeholders (JSON values: pass timestamps as text)."""
    url = query_url(settings)
    payload = {"sql": sql} if parameters is None else {"sql": sql, "parameters": parameters}
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise QueryFailed(json.loads(error.read() or b"{}").get("error", str(error))) from error
    except (urllib.error.URLError, ConnectionError) as error:
        if not direct_fallback:
            raise QueryFailed(f"nothing answered queries on {url}: {error}") from error
        log.info("no worker answered; querying the DSN directly", extra={"dsn": settings.chdb_dsn})
        return _direct(settings, sql, parameters)
    return QueryResult(tuple(body["columns"]), [tuple(row) for row in body["rows"]])


def _direct(settings: Settings, sql: str, parameters: dict[str, Any] | None) -> QueryResult:
    try:
        sink = open_backend(settings)
    except Exception as error:
        raise QueryFailed(
            f"nothing answered on {query_url(settings)} and {settings.chdb_dsn} could not be opened ({error}); "
            "start a worker (ctxflow worker) or point CTXFLOW_CLICKHOUSE_DSN at a ClickHouse server"
        ) from error
    try:
        return sink.query(sql, parameters)
    except Exception as error:
        raise QueryFailed(f"query failed: {error}") from error
    finally:
        sink.close()
