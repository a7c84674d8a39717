"""The analyst views of ``ctxflow report``: each one SQL query, written once against a :class:`Scope`.

The terminal tables, the HTML file and the Grafana panels named in :attr:`View.panel` run the same text; only
the scope differs (bound parameters here, datasource macros in Grafana). Every table is read with ``FINAL``
(the analyst path would add it anyway; Grafana's datasource would not). Money is in micro-USD as the cost
projection keeps it, dollars in every view; every cost figure comes with its observed and estimated parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from ctxflow.streams.report.scope import Scope


class Format(StrEnum):
    """How a column's values read to a person."""

    TEXT = "text"
    COUNT = "count"
    TOKENS = "tokens"
    USD = "usd"
    SHARE = "share"  # 0..1 in, percent out
    CHANGE = "change"  # a relative change, signed percent out
    RATIO = "ratio"  # 4.2x
    SCORE = "score"  # 0..1, two decimals
    MS = "ms"

    @property
    def numeric(self) -> bool:
        """A number (aligned right in tables), not text."""
        return self is not Format.TEXT


@dataclass(frozen=True, slots=True)
class Column:
    """A result column (``name`` as the SQL aliases it), its header and how to show its values."""

    name: str
    header: str
    format: Format = Format.TEXT


@dataclass(frozen=True, slots=True)
class Chart:
    """How the HTML draws a view: ``bar`` (one bar group per ``label`` row) or ``line`` (``label`` is the x axis,
    one line per ``series`` value and per ``values`` column); ``stacked`` bars add up to the row's total."""

    kind: str
    label: str
    values: tuple[str, ...]
    format: Format
    series: str | None = None
    stacked: bool = False


@dataclass(frozen=True, slots=True)
class View:
    """One section of the report: its query, columns, optional chart, and the Grafana dashboard (a file under
    ``dashboards/``) whose panel of the same title runs the same query."""

    key: str
    title: str
    description: str
    sql: Callable[[Scope], str]
    columns: tuple[Column, ...]
    chart: Chart | None = None
    dashboard: str | None = None
    #: Shown in the terminal (a long time series is left to the HTML and Grafana).
    terminal: bool = True
    #: Part of the compact report the demo prints.
    compact: bool = False


#: Cost lines hold micro-USD; views show dollars, so that Grafana's currency unit reads them as the terminal does.
_COST_SPLIT = ("sumIf(micros, NOT estimated) / 1e6 AS observed_usd, "
               "sumIf(micros, estimated) / 1e6 AS estimated_usd, sum(micros) / 1e6 AS total_usd")
_COST_COLUMNS = (Column("observed_usd", "observed USD", Format.USD),
                 Column("estimated_usd", "estimated USD", Format.USD),
                 Column("total_usd", "total USD", Format.USD))
_EVICTING = "('evict', 'mask', 'offload', 'swap')"
#: Decisions that read a context gauge (a slot, or the total context), not a consumption cap: the rule of
#: ``streams.demo.run._context_gauge``, with admission checks (which compare the total context to its cap).
_CONTEXT_GAUGE = "(slot IS NOT NULL OR kind = 'admission' OR position(reason, 'total context') > 0)"


def promotion_outcomes(scope: Scope) -> str:
    """One row per memory candidate and what the memory gate decided (``tenant_id``, ``candidate_id``,
    ``outcome``: active, quarantined or provisional for an accepted candidate, else merged or rejected; ``rule``;
    ``decided_at``), from the gate's verdicts.

    The one place promotion and quarantine rates come from.
    """
    return ("SELECT tenant_id, candidate_id, if(outcome = 'accepted', ifNull(status, 'provisional'), outcome) "
            "AS outcome, rule, occurred_at AS decided_at "
            f"FROM memory_verdicts FINAL WHERE {scope.window('occurred_at')} AND {scope.tenants('tenant_id')}")


def _ingest_lags(scope: Scope) -> str:
    """Every turn, usage report and run event ingested in range: its table and ms from event to insert."""
    return " UNION ALL ".join(
        f"SELECT '{table}' AS source, ingested_at, dateDiff('millisecond', occurred_at, ingested_at) AS lag_ms "
        f"FROM {table} FINAL WHERE {scope.window('ingested_at')} AND {scope.tenants('tenant_id')}"
        for table in ("turns", "usage", "runs"))


COST_PER_TENANT = View(
    "cost_per_tenant", "Cost per tenant",
    "Priced cost lines: the observed and estimated parts apart (an estimate prices a missing or partial usage "
    "report, or a model without a list price), then the total by surface, observed and estimated together.",
    lambda s: f"SELECT tenant_id, uniqExact(run_id) AS runs, {_COST_SPLIT}, "
              "sumIf(micros, surface = 'inference') / 1e6 AS inference_usd, "
              "sumIf(micros, surface = 'retrieval') / 1e6 AS retrieval_usd, "
              "sumIf(micros, surface = 'tooling') / 1e6 AS tooling_usd, "
              "sumIf(micros, surface = 'persistence') / 1e6 AS persistence_usd "
              f"FROM costs FINAL WHERE {s.window('occurred_at')} AND {s.tenants('tenant_id')} "
              "GROUP BY tenant_id ORDER BY total_usd DESC, tenant_id",
    (Column("tenant_id", "tenant"), Column("runs", "runs", Format.COUNT), *_COST_COLUMNS,
     Column("inference_usd", "inference", Format.USD), Column("retrieval_usd", "retrieval", Format.USD),
     Column("tooling_usd", "tooling", Format.USD), Column("persistence_usd", "persistence", Format.USD)),
    Chart("bar", "tenant_id", ("observed_usd", "estimated_usd"), Format.USD, stacked=True),
    dashboard="runs-and-cost.json", compact=True,
)

COST_PER_SUB_AGENT = View(
    "cost_per_sub_agent", "Cost per agent and sub-agent",
    "Cost lines grouped by the agent that ran them; 'per workflow' is its cost divided by the workflows it took "
    "part in. A sub-agent is a run with a parent.",
    lambda s: "SELECT tenant_id, agent_id, "
              "multiIf(countIf(ifNull(parent_run_id, '') = '') = 0, 'sub-agent', "
              "countIf(ifNull(parent_run_id, '') != '') = 0, 'root', 'both') AS role, "
              f"uniqExact(workflow_id) AS workflows, uniqExact(run_id) AS runs, {_COST_SPLIT}, "
              "total_usd / workflows AS per_workflow_usd "
              f"FROM costs FINAL WHERE {s.window('occurred_at')} AND {s.tenants('tenant_id')} "
              "GROUP BY tenant_id, agent_id ORDER BY total_usd DESC, tenant_id, agent_id LIMIT 15",
    (Column("tenant_id", "tenant"), Column("agent_id", "agent"), Column("role", "role"),
     Column("workflows", "workflows", Format.COUNT), Column("runs", "runs", Format.COUNT), *_COST_COLUMNS,
     Column("per_workflow_usd", "USD per workflow", Format.USD)),
    Chart("bar", "agent_id", ("observed_usd", "estimated_usd"), Format.USD, stacked=True),
    dashboard="runs-and-cost.json",
)

TOP_RUNS = View(
    "top_runs", "Top runs by cost",
    "The costliest runs that started in range, from their run envelopes.",
    lambda s: "SELECT tenant_id, run_id, agent_id, depth, toString(status) AS run_status, "
              "cost_micros / 1e6 AS cost_usd, "
              "if(cost_estimated, 'estimated', 'observed') AS cost_basis, "
              "input_tokens + output_tokens + reasoning_tokens AS tokens, duration_ms "
              f"FROM envelopes FINAL WHERE {s.window('started_at')} AND {s.tenants('tenant_id')} "
              "ORDER BY cost_usd DESC, run_id LIMIT 10",
    (Column("tenant_id", "tenant"), Column("run_id", "run"), Column("agent_id", "agent"),
     Column("depth", "depth", Format.COUNT), Column("run_status", "status"),
     Column("cost_usd", "cost USD", Format.USD), Column("cost_basis", "cost is"),
     Column("tokens", "tokens", Format.TOKENS), Column("duration_ms", "duration", Format.MS)),
    dashboard="runs-and-cost.json",
)

RUN_COST_WEEKLY = View(
    "run_cost_weekly", "Cost per run, week over week",
    "Finished runs by the week they started: a cost per run that climbs while the work stays the same is "
    "context accumulating. 'vs last week' compares with the tenant's previous calendar week.",
    lambda s: "SELECT week, tenant_id, runs, mean_usd, p90_usd, estimated_share, mean_input_tokens, "
              "if(previous_week = week - 7 AND previous_mean > 0, mean_usd / previous_mean - 1, NULL) AS change "
              "FROM (SELECT toMonday(started_at) AS week, tenant_id, count() AS runs, "
              "avg(cost_micros) / 1e6 AS mean_usd, quantileExact(0.9)(cost_micros) / 1e6 AS p90_usd, "
              "countIf(cost_estimated) / count() AS estimated_share, avg(input_tokens) AS mean_input_tokens, "
              "lagInFrame(week) OVER (PARTITION BY tenant_id ORDER BY week ROWS BETWEEN 1 PRECEDING AND CURRENT "
              "ROW) AS previous_week, lagInFrame(mean_usd) OVER (PARTITION BY tenant_id ORDER BY week ROWS "
              "BETWEEN 1 PRECEDING AND CURRENT ROW) AS previous_mean "
              f"FROM envelopes FINAL WHERE {s.window('started_at')} AND {s.tenants('tenant_id')} "
              "AND status != 'open' GROUP BY week, tenant_id) ORDER BY week, tenant_id",
    (Column("week", "week of"), Column("tenant_id", "tenant"), Column("runs", "runs", Format.COUNT),
     Column("mean_usd", "USD per run", Format.USD), Column("p90_usd", "p90 USD", Format.USD),
     Column("estimated_share", "runs estimated", Format.SHARE), Column("mean_input_tokens", "input tokens/run",
                                                                   Format.TOKENS),
     Column("change", "vs last week", Format.CHANGE)),
    Chart("line", "week", ("mean_usd",), Format.USD, series="tenant_id"),
    dashboard="runs-and-cost.json", compact=True,
)

UTILIZATION = View(
    "utilization", "Context utilization percentiles",
    "Fill (used / cap) of each slot and of the total context whenever the governor read the gauge: budget "
    "transitions, eviction decisions and admission checks. Runs under pressure are sampled more often.",
    lambda s: "SELECT ifNull(toString(slot), 'total') AS gauge, count() AS samples, "
              "quantileExact(0.5)(fill) AS p50, quantileExact(0.9)(fill) AS p90, quantileExact(0.99)(fill) AS p99, "
              "max(fill) AS peak FROM (SELECT slot, used_tokens / cap_tokens AS fill FROM decisions FINAL "
              f"WHERE {s.window('decided_at')} AND {s.tenants('tenant_id')} AND cap_tokens > 0 "
              f"AND used_tokens IS NOT NULL AND {_CONTEXT_GAUGE}) GROUP BY gauge ORDER BY gauge = 'total', gauge",
    (Column("gauge", "gauge"), Column("samples", "samples", Format.COUNT), Column("p50", "p50", Format.SHARE),
     Column("p90", "p90", Format.SHARE), Column("p99", "p99", Format.SHARE), Column("peak", "max", Format.SHARE)),
    Chart("bar", "gauge", ("p50", "p90", "p99"), Format.SHARE),
    dashboard="tenant-budgets.json", compact=True,
)

EVICTION_BY_SLOT = View(
    "eviction_by_slot", "Eviction rate per slot",
    "What the planner took out of each slot (evict, mask, offload, swap) against what entered it as turns: "
    "'rate' is items taken out per item that entered, 'freed' the share of entered tokens freed.",
    lambda s: "SELECT slot, entered_items, entered_tokens, evictions, masks, offloads, swaps, items_out, "
              "freed_tokens, if(entered_items > 0, items_out / entered_items, NULL) AS rate, "
              "if(entered_tokens > 0, freed_tokens / entered_tokens, NULL) AS freed_share "
              "FROM (SELECT toString(slot) AS slot, countIf(kind = 'evict') AS evictions, "
              "countIf(kind = 'mask') AS masks, countIf(kind = 'offload') AS offloads, "
              "countIf(kind = 'swap') AS swaps, sum(length(actions)) AS items_out, "
              "toUInt64(sum(ifNull(tokens_freed, 0))) AS freed_tokens FROM decisions FINAL "
              f"WHERE {s.window('decided_at')} AND {s.tenants('tenant_id')} AND kind IN {_EVICTING} "
              "AND slot IS NOT NULL GROUP BY slot) AS d "
              "FULL OUTER JOIN (SELECT toString(slot) AS slot, count() AS entered_items, "
              "sum(token_count) AS entered_tokens FROM turns FINAL "
              f"WHERE {s.window('occurred_at')} AND {s.tenants('tenant_id')} GROUP BY slot) AS t USING slot "
              "ORDER BY freed_tokens DESC, slot",
    (Column("slot", "slot"), Column("entered_items", "items in", Format.COUNT),
     Column("entered_tokens", "tokens in", Format.TOKENS), Column("evictions", "evictions", Format.COUNT),
     Column("masks", "masks", Format.COUNT), Column("offloads", "offloads", Format.COUNT),
     Column("swaps", "swaps", Format.COUNT), Column("items_out", "items out", Format.COUNT),
     Column("freed_tokens", "tokens freed", Format.TOKENS), Column("rate", "rate", Format.SHARE),
     Column("freed_share", "freed", Format.SHARE)),
    Chart("bar", "slot", ("rate", "freed_share"), Format.SHARE),
    dashboard="tenant-budgets.json", compact=True,
)

COMPRESSION = View(
    "compression", "Compression ratio and fidelity",
    "Summaries swapped in for their sources: ratio is source tokens per summary token; fidelity is the share of "
    "the sources' identifiers and numbers the summary kept (1.00: all).",
    lambda s: "SELECT tenant_id, countIf(kind = 'compress') AS requested, countIf(kind = 'swap') AS swapped, "
              "sumIf(length(actions), kind = 'swap') AS sources, "
              "sumIf(arraySum(tupleElement(actions, 'tokens')), kind = 'swap') AS source_tokens, "
              "toInt64(source_tokens) - toInt64(sumIf(tokens_freed, kind = 'swap')) AS summary_tokens, "
              "if(summary_tokens > 0, source_tokens / summary_tokens, NULL) AS ratio, "
              "avgIf(summary_fidelity, kind = 'swap') AS mean_fidelity, "
              "minIf(summary_fidelity, kind = 'swap') AS min_fidelity, "
              "countIf(kind = 'swap' AND summary_fidelity < 0.9) AS below_90 FROM decisions FINAL "
              f"WHERE {s.window('decided_at')} AND {s.tenants('tenant_id')} AND kind IN ('compress', 'swap') "
              "GROUP BY tenant_id ORDER BY swapped DESC, tenant_id",
    (Column("tenant_id", "tenant"), Column("requested", "requested", Format.COUNT),
     Column("swapped", "swapped in", Format.COUNT), Column("sources", "sources", Format.COUNT),
     Column("source_tokens", "source tokens", Format.TOKENS), Column("summary_tokens", "summary tokens",
                                                                      Format.TOKENS),
     Column("ratio", "ratio", Format.RATIO), Column("mean_fidelity", "mean fidelity", Format.SCORE),
     Column("min_fidelity", "min fidelity", Format.SCORE), Column("below_90", "below 0.90", Format.COUNT)),
    Chart("bar", "tenant_id", ("mean_fidelity", "min_fidelity"), Format.SCORE),
    dashboard="tenant-budgets.json",
)

PROMOTION = View(
    "promotion", "Memory promotion and quarantine",
    "Memory candidates judged in range by the gate's verdict: promoted (active), quarantined for review, merged "
    "into an existing record, or rejected (by rule); the rates are shares of all candidates.",
    lambda s: "SELECT tenant_id, count() AS candidates, countIf(outcome = 'active') AS promoted, "
              "countIf(outcome = 'quarantined') AS quarantined, countIf(outcome = 'merged') AS merged, "
              "countIf(outcome = 'rejected') AS rejected, promoted / candidates AS promotion_rate, "
              f"quarantined / candidates AS quarantine_rate FROM ({promotion_outcomes(s)}) "
              "GROUP BY tenant_id ORDER BY candidates DESC, tenant_id",
    (Column("tenant_id", "tenant"), Column("candidates", "candidates", Format.COUNT),
     Column("promoted", "promoted", Format.COUNT), Column("quarantined", "quarantined", Format.COUNT),
     Column("merged", "merged", Format.COUNT), Column("rejected", "rejected", Format.COUNT),
     Column("promotion_rate", "promotion rate", Format.SHARE),
     Column("quarantine_rate", "quarantine rate", Format.SHARE)),
    Chart("bar", "tenant_id", ("promotion_rate", "quarantine_rate"), Format.SHARE),
    dashboard="tenant-budgets.json",
)

INGEST_LAG = View(
    "ingest_lag", "Ingest lag",
    "From an event's own time to its insert into ClickHouse, per table, for events inserted in range (a "
    "replayed event counts from its last insert); 'idle' is the time since the newest insert.",
    lambda s: "SELECT source, count() AS events, quantileExact(0.5)(lag_ms) AS p50_ms, "
              "quantileExact(0.99)(lag_ms) AS p99_ms, max(lag_ms) AS max_ms, "
              "dateDiff('millisecond', max(ingested_at), now64(3)) AS idle_ms "
              f"FROM ({_ingest_lags(s)}) GROUP BY source ORDER BY source",
    (Column("source", "table"), Column("events", "events", Format.COUNT), Column("p50_ms", "p50", Format.MS),
     Column("p99_ms", "p99", Format.MS), Column("max_ms", "max", Format.MS), Column("idle_ms", "idle", Format.MS)),
    dashboard="pipeline-health.json", compact=True,
)

INGEST_LAG_OVER_TIME = View(
    "ingest_lag_over_time", "Ingest lag over time",
    "p50 and p99 of the lag above, per table and time bucket.",
    lambda s: f"SELECT {s.bucket('ingested_at')} AS time, source, quantileExact(0.5)(lag_ms) AS p50_ms, "
              f"quantileExact(0.99)(lag_ms) AS p99_ms FROM ({_ingest_lags(s)}) GROUP BY time, source "
              "ORDER BY time, source",
    (Column("time", "time"), Column("source", "table"), Column("p50_ms", "p50", Format.MS),
     Column("p99_ms", "p99", Format.MS)),
    Chart("line", "time", ("p50_ms", "p99_ms"), Format.MS, series="source"),
    dashboard="pipeline-health.json", terminal=False,
)

VIEWS: tuple[View, ...] = (COST_PER_TENANT, COST_PER_SUB_AGENT, TOP_RUNS, RUN_COST_WEEKLY, UTILIZATION,
                           EVICTION_BY_SLOT, COMPRESSION, PROMOTION, INGEST_LAG, INGEST_LAG_OVER_TIME)
"""Every view, in report order."""
