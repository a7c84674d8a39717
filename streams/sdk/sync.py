"""The blocking facade over the async client, for agent runtimes without an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from ctxflow.schemas.models import MemoryScope, TenantManifest
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk.client import CtxflowClient
from ctxflow.streams.sdk.context_window import ContextWindow
from ctxflow.streams.sdk.recall import DEFAULT_SCOPES, RecallHit
from ctxflow.streams.sdk.run_context import RunContext
from pydantic import BaseModel


class SyncCtxflowClient:
    """Blocking facade over :class:`CtxflowClient` for runtimes without an event loop; same guarantees.

    Records travel while a call runs (each call drives a private event loop), so :meth:`flush` at the end
    of a unit of work; a clean ``with`` exit flushes and closes. One thread per facade.
    """

    def __init__(self, bootstrap: str, **kw: Any) -> None:
        self._runner = asyncio.Runner()
        self.client = CtxflowClient(bootstrap, **kw)

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> SyncCtxflowClient:
        """A facade over :meth:`CtxflowClient.from_settings` (the deployment's broker, prefix, and where queries
        go for :meth:`recall`)."""
        facade = cls(settings.bootstrap, **kw)
        facade.client = CtxflowClient.from_settings(settings, **kw)
        return facade

    def __enter__(self) -> SyncCtxflowClient:
        try:
            self._runner.run(self.client.start())
        except BaseException:
            self._runner.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._runner.run(self.client.stop())
            self._runner.close()

    def publish(self, record: BaseModel) -> None:
        """:meth:`CtxflowClient.publish`, blocking until the record is queued."""
        self._runner.run(self.client.publish(record))

    def flush(self, timeout_s: float | None = None) -> None:
        """:meth:`CtxflowClient.flush`: blocks until every record is acknowledged, raises on failures."""
        self._runner.run(self.client.flush(timeout_s))

    def recall(self, ctx: RunContext, query: str, *, scopes: Iterable[MemoryScope] = DEFAULT_SCOPES, k: int = 5,
               embedding: Sequence[float] | None = None, publish: bool = True,
               window: ContextWindow | None = None) -> list[RecallHit]:
        """:meth:`CtxflowClient.recall`, blocking."""
        return self._runner.run(self.client.recall(ctx, query, scopes=scopes, k=k, embedding=embedding,
                                                   publish=publish, window=window))

    def latest_manifest(self, tenant_id: str) -> TenantManifest | None:
        """:meth:`CtxflowClient.latest_manifest`."""
        return self._runner.run(self.client.latest_manifest(tenant_id))
