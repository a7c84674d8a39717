"""Recall: a run's query over the retrieval index of active memories, and the retrieval events it reports.

The index is the ClickHouse table ``memory_index`` (:mod:`sinks.clickhouse_ddl`): the sink writes every memory
record there, and a record that leaves ``active`` becomes a deleted row, so a ``FINAL`` read (the query path's
``final=1``) serves active records only. The query goes where ``ctxflow query`` goes
(:func:`streams.stack.query.run_query`: the process holding the chDB directory, else the worker on
``web_port``; a ClickHouse server's DSN directly when none answers), read-only.

What a run may see is decided twice: in SQL (the run's tenant, exactly; tenant-scope records; user-scope records
of the run's user; session-scope records of the run's session) and again on the rows that come back, so a query
bug cannot hand a run another tenant's or another user's memory.

Ranking: with an ``embedding``, cosine distance (``cosineDistance``) to the records' embeddings of the same
dimension (records without one are not candidates); otherwise lexical: the query's distinct word tokens that
the record's text, subject, attribute and value hold (tokens from one Python tokenizer,
:func:`~sinks.clickhouse_ddl.index_terms`, at index and query time; at least one must match), each weighing its
inverse document frequency ``log((n + 1) / (df + 0.5))`` over the ``n`` records the run may see, ``df`` of which
hold it, so "the customer" counts for little and "invoices" for much; ties broken by
``ngramDistanceCaseInsensitiveUTF8`` to the whole query (closer first), then by id. Both read only the tenant's
rows (the table is ordered by tenant first), and need no index to build.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ctxflow.schemas.models import ContextLayer, ItemKind, MemoryScope, MemoryType, Role, Slot, TurnEvent
from ctxflow.sinks.clickhouse_ddl import index_terms
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.payloads import open_payload_store
from ctxflow.streams.sdk.run_context import RunContext
from ctxflow.streams.stack.query import run_query

#: Scopes a recall reads unless told otherwise (global memory is the constitution, sent as the system prompt).
DEFAULT_SCOPES: tuple[MemoryScope, ...] = (MemoryScope.SESSION, MemoryScope.USER, MemoryScope.TENANT)
_LAYER = {MemoryScope.GLOBAL: ContextLayer.GLOBAL, MemoryScope.TENANT: ContextLayer.TENANT,
          MemoryScope.USER: ContextLayer.USER, MemoryScope.SESSION: ContextLayer.SESSION}
_COLUMNS = ("tenant_id", "memory_id", "scope", "type", "owner_id", "text", "subject", "attribute", "value",
            "payload_ref", "content_digest", "version")


@dataclass(frozen=True, slots=True)
class RecallHit:
    """One active memory a recall returned. ``score``: cosine distance (embedding), or the sum of the matched
    query terms' weights, each its rarity among the records the run may see (lexical). ``text`` is the record's
    content; for a record whose content lives in the payload store it is read from there, and None when that
    store is not reachable from this process."""

    memory_id: str
    scope: MemoryScope
    type: MemoryType
    text: str | None
    score: float
    subject: str | None = None
    attribute: str | None = None
    value: str | None = None
    payload_ref: str | None = None
    content_digest: str = ""
    version: int = 0


def recall_query(ctx: RunContext, query: str, scopes: Iterable[MemoryScope], k: int,
                 embedding: Sequence[float] | None) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters of one recall (see the module docstring)."""
    params: dict[str, Any] = {
        "tenant": ctx.tenant_id, "user": ctx.user_id, "session": ctx.session_id, "k": k,
        "scopes": sorted({MemoryScope(s).value for s in scopes}), "query": query,
    }
    visible = (
        "tenant_id = {tenant:String} AND has({scopes:Array(String)}, scope) AND ("
        "scope = 'tenant' OR (scope = 'user' AND owner_id = {user:String}) "
        "OR (scope = 'session' AND owner_id = {session:String}))"
        " AND (expires_at IS NULL OR expires_at > now64(3))"
    )
    columns = ", ".join(_COLUMNS)
    if embedding is not None:
        params["embedding"], params["dims"] = [float(x) for x in embedding], len(embedding)
        sql = (f"SELECT {columns}, cosineDistance(embedding, {{embedding:Array(Float32)}}) AS score "
               f"FROM memory_index WHERE {visible} AND length(embedding) = {{dims:UInt32}} "
               "ORDER BY score ASC, memory_id LIMIT {k:UInt32}")
    else:
        params["terms"] = index_terms(query)
        # Each query term weighs its inverse document frequency among the records this run may see (n records,
        # df of them holding the term): a word most of them hold ranks little, a rare one much.
        sql = (f"WITH ifNull((SELECT count() FROM memory_index WHERE {visible}), 0) AS n, "
               "(SELECT arrayResize(sumForEach(arrayMap(t -> toUInt64(has(terms, t)), {terms:Array(String)})), "
               f"length({{terms:Array(String)}}), toUInt64(0)) FROM memory_index WHERE {visible}) AS df, "
               "arrayMap(d -> log((n + 1) / (d + 0.5)), df) AS idf "
               f"SELECT {columns}, arraySum(arrayMap((t, w) -> if(has(terms, t), w, 0), "
               "{terms:Array(String)}, idf)) AS score "
               f"FROM memory_index WHERE {visible} AND hasAny(terms, {{terms:Array(String)}}) "
               "ORDER BY score DESC, ngramDistanceCaseInsensitiveUTF8(ifNull(text, ''), {query:String}) ASC, "
               "memory_id LIMIT {k:UInt32}")
    return sql, params


def visible_to(ctx: RunContext, tenant_id: str, scope: MemoryScope, owner_id: str) -> bool:
    """Whether a record of ``tenant_id``, ``scope`` and ``owner_id`` may be served to the run ``ctx``."""
    if tenant_id != ctx.tenant_id:
        return False
    if scope is MemoryScope.USER:
        return owner_id == ctx.user_id
    if scope is MemoryScope.SESSION:
        return owner_id == ctx.session_id
    return scope is MemoryScope.TENANT


def find(settings: Settings, ctx: RunContext, query: str, *, scopes: Iterable[MemoryScope] = DEFAULT_SCOPES,
         k: int = 5, embedding: Sequence[float] | None = None, timeout_s: float = 10.0) -> list[RecallHit]:
    """The run's ``k`` best active memories for ``query`` (blocking: one HTTP query, see the module docstring)."""
    if k <= 0:
        return []
    sql, params = recall_query(ctx, query, scopes, k, embedding)
    # A chDB directory belongs to the process serving queries: never open it from an agent's process.
    direct = not settings.chdb_dsn.startswith("chdb:")
    result = run_query(settings, sql, timeout_s, direct_fallback=direct, parameters=params)
    hits = []
    for row in result.rows:
        tenant, mid, scope, type_, owner, text, subject, attribute, value, ref, digest, version, score = row
        scope = MemoryScope(scope)
        if not visible_to(ctx, tenant, scope, owner):
            continue
        if text is None and ref is not None:
            text = _payload_text(settings, ref)
        hits.append(RecallHit(mid, scope, MemoryType(type_), text, float(score), subject, attribute, value, ref,
                              digest, int(version)))
    return hits


def _payload_text(settings: Settings, ref: str) -> str | None:
    """A payload-store record's content, when this process can read the store (a local directory or a bucket)."""
    try:
        return open_payload_store(settings).get(ref).decode("utf-8")
    except Exception:  # absent, damaged, unreachable, not permitted (S3 errors are botocore's): no text, a hit still
        return None


def retrieval_turn(ctx: RunContext, hit: RecallHit, at: datetime | None = None) -> TurnEvent:
    """The retrieval event of ``hit`` for run ``ctx``: a ``memory`` item in the ``retrieved`` slot whose item id
    is the memory id, layer from its scope, content its text (the client drops it for a no-retention run, as for
    every turn). It is what makes the budget count the memory and the worker know the run holds it."""
    return ctx.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, hit.text,
                    content_digest=None if hit.text is not None else hit.content_digest, item_id=hit.memory_id,
                    layer=_LAYER[hit.scope], at=at)
