"""Where a report view's SQL gets its time range, tenant selection and time buckets.

A view's SQL is written once against :class:`Scope`; :class:`ReportScope` fills it for ``ctxflow report`` with
bound query parameters, :class:`GrafanaScope` with the ClickHouse datasource's macros and the dashboards'
``tenant`` variable. The same text therefore runs in the terminal, in the HTML file and in a Grafana panel.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: Bucket widths a report's time series may use, in seconds: the first that gives at most ``max_buckets``.
_STEPS_S = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)


class Scope(Protocol):
    """What a view's SQL asks of the place it runs in."""

    def window(self, column: str) -> str:
        """A condition: ``column`` (a timestamp) lies in the reported time range."""
        ...

    def tenants(self, column: str) -> str:
        """A condition: ``column`` (a tenant id) is one of the selected tenants (any, when none is selected)."""
        ...

    def bucket(self, column: str) -> str:
        """``column`` truncated to the start of its time-series bucket (a ``DateTime``)."""
        ...


@dataclass(frozen=True, slots=True)
class ReportScope:
    """The range ``[since, until)`` and ``tenant_ids`` (empty: all) as bound parameters of the analyst path."""

    since: dt.datetime
    until: dt.datetime
    tenant_ids: tuple[str, ...] = ()
    max_buckets: int = 48
    parameters: dict[str, Any] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.until.tzinfo is None:
            raise ValueError("a report's range needs time-zone aware timestamps")
        object.__setattr__(self, "parameters", {
            "since": self.since.astimezone(dt.UTC).strftime(_TIME_FORMAT)[:-3],
            "until": self.until.astimezone(dt.UTC).strftime(_TIME_FORMAT)[:-3],
            "tenants": list(self.tenant_ids),
            "step_s": self.step_s,
        })

    @classmethod
    def last_days(cls, days: float, tenant_ids: tuple[str, ...] = (), now: dt.datetime | None = None) -> ReportScope:
        """The ``days`` up to ``now`` (default: the wall clock)."""
        until = now or dt.datetime.now(dt.UTC)
        return cls(until - dt.timedelta(days=days), until, tenant_ids)

    @property
    def step_s(self) -> int:
        """Width of a time-series bucket: the narrowest of a few round widths that fits in ``max_buckets``."""
        span = (self.until - self.since).total_seconds()
        return next((s for s in _STEPS_S if span / s <= self.max_buckets), _STEPS_S[-1])

    def window(self, column: str) -> str:
        return (f"{column} >= {{since:DateTime64(3, 'UTC')}} AND {column} < {{until:DateTime64(3, 'UTC')}}")

    def tenants(self, column: str) -> str:
        return f"(empty({{tenants:Array(String)}}) OR has({{tenants:Array(String)}}, {column}))"

    def bucket(self, column: str) -> str:
        return f"toStartOfInterval(toDateTime({column}), INTERVAL {{step_s:UInt32}} second)"


class GrafanaScope:
    """The grafana-clickhouse-datasource macros and the dashboards' multi-value ``tenant`` variable."""

    def window(self, column: str) -> str:
        return f"$__timeFilter({column})"

    def tenants(self, column: str) -> str:
        return f"$__conditionalAll({column} IN (${{tenant:singlequote}}), $tenant)"

    def bucket(self, column: str) -> str:
        return f"$__timeInterval({column})"
