"""The end-of-demo report: what the worker durably did, read back from ClickHouse, and admission checks
answered from Redis, as an agent would make them.

Every number comes from the worker's ClickHouse (through its query endpoint), after its committed offsets
reached the end of every input, so it shows what was durably processed, not what was sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ctxflow.processors.admission import AdmissionAnswer, check_admission
from ctxflow.processors.pricing import DEFAULT_PRICES
from ctxflow.schemas.models import Slot
from ctxflow.sinks.redis import read_headroom
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.stack.worker_process import WorkerProcess
from rich.console import Console
from rich.table import Table

_SLOTS = tuple(slot.value for slot in Slot)
#: What an agent of each checked run plans to add before its next call (slot -> tokens).
_PLAN = {Slot.HISTORY: 800, Slot.RETRIEVED: 600, Slot.OUTPUT: 500}
_BUDGET_KINDS = "('budget_state', 'rejection', 'spend_exhausted')"
_SHOWN_TRANSITIONS = 14


def _n(value: int | str | None) -> str:
    return f"{int(value or 0):,}"


class DemoReport:
    """The end-of-demo report, every number read from ClickHouse through the running worker."""

    def __init__(self, worker: WorkerProcess, workload: Workload, console: Console, shown_home: Path) -> None:
        self.worker, self.console, self.shown_home = worker, console, shown_home
        self.tenants = workload.tenants
        self.runaway = workload.runaway_tenant.tenant_id if workload.runaway_tenant else ""
        self.turns = 0

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.worker.query(sql).rows

    def print_all(self) -> bool:
        """Print every section; False when an invariant the demo shows (privacy) is broken."""
        budget = self._per_tenant()
        self._runaway_section(budget)
        self._dead_letters()
        private = self._privacy()
        self._admission(budget)
        self._next_steps()
        return private

    def _per_tenant(self) -> dict[str, tuple[int, ...]]:
        runs = {r[0]: r[1:] for r in self.rows(
            "SELECT tenant_id, countIf(phase = 'started'), countIf(phase = 'started' AND parent_run_id IS NOT NULL) "
            "FROM runs GROUP BY tenant_id")}
        slots: dict[str, Counter[str]] = {t.tenant_id: Counter() for t in self.tenants}
        turns: Counter[str] = Counter()
        for tenant, slot, count, tokens in self.rows(
                "SELECT tenant_id, slot, count(), sum(token_count) FROM turns GROUP BY tenant_id, slot"):
            slots.setdefault(tenant, Counter())[slot] += int(tokens or 0)
            turns[tenant] += int(count)
        self.turns = sum(turns.values())
        usage: Counter[str] = Counter()
        cost: Counter[str] = Counter()
        guessed: set[str] = set()
        for tenant, model, *kinds in self.rows(
                "SELECT tenant_id, model, sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
                "sum(cache_write_tokens), sum(reasoning_tokens) FROM usage GROUP BY tenant_id, model"):
            price, estimated = DEFAULT_PRICES.price(model)
            per_mtok = (price.input, price.output, price.cached_read, price.cache_write, price.reasoning)
            usage[tenant] += sum(int(k) for k in kinds)
            cost[tenant] += sum(int(k) * p for k, p in zip(kinds, per_mtok, strict=True)) / 1e12
            if estimated:
                guessed.add(model)
        budget = {r[0]: r[1:] for r in self.rows(
            "SELECT tenant_id, countIf(kind = 'budget_state' AND state = 'soft' AND previous_state = 'ok'), "
            "countIf(kind = 'budget_state' AND state = 'hard'), countIf(kind = 'rejection'), "
            "countIf(kind = 'spend_exhausted'), countIf(kind = 'eviction_request'), "
            # the rule of streams.demo.run._context_gauge
            "countIf(kind = 'budget_state' AND state = 'hard' AND (slot IS NOT NULL OR startsWith(reason, 'total "
            "context'))) FROM decisions GROUP BY tenant_id")}
        letters = dict(self.rows("SELECT tenant_id, count() FROM dead_letters GROUP BY tenant_id"))

        traffic = Table("tenant", "tier", "privacy", "runs", "sub-agent runs", "turns", "context tokens",
                        "usage tokens", "est. cost USD", title="Per tenant: traffic, tokens and cost")
        by_slot = Table("tenant", *_SLOTS, title="Per tenant: context tokens by slot")
        decided = Table("tenant", "soft watermark", "hard limit", "rejections", "spend exhausted", "evictions",
                        "dead letters", title="Per tenant: budget decisions")
        for t in self.tenants:
            name, (started, children) = t.tenant_id, runs.get(t.tenant_id, (0, 0))
            traffic.add_row(name, t.tier, "no_retention" if t.no_retention else "retained", _n(started),
                            _n(children), _n(turns[name]), _n(slots[name].total()), _n(usage[name]),
                            f"{cost[name]:,.2f}")
            by_slot.add_row(name, *(_n(slots[name][s]) for s in _SLOTS))
            decided.add_row(name, *(_n(v) for v in budget.get(name, (0,) * 6)[:5]), _n(letters.get(name, 0)))
        if letters.get(""):
            decided.add_row("(unreadable)", *("-",) * 5, _n(letters[""]))
        for table in (traffic, by_slot, decided):
            self.console.print(table)
        self.console.print(f"cost: {DEFAULT_PRICES.version} list prices"
                           + (f"; {', '.join(sorted(guessed))} priced at the fallback rate" if guessed else ""))
        return budget

    def _runaway_section(self, budget: dict[str, tuple[int, ...]]) -> None:
        # decided_at is the batch's wall clock (one value per batch): order by the source event's time instead.
        tenant = self.runaway
        sources = " UNION ALL ".join(f"SELECT event_id, occurred_at AS at FROM {table} WHERE tenant_id = '{tenant}'"
                                     for table in ("turns", "usage", "runs"))
        rows = self.rows(
            "SELECT toString(e.at), d.run_id, d.kind, d.previous_state, d.state, d.used_tokens, d.cap_tokens, "
            f"d.reason FROM decisions AS d LEFT JOIN ({sources}) AS e ON d.source_event_id = e.event_id "
            f"WHERE d.tenant_id = '{tenant}' AND d.kind IN {_BUDGET_KINDS} ORDER BY e.at, d.used_tokens, d.kind")
        table = Table("event time", "run", "decision", "used / cap", "reason",
                      title=f"Runaway tenant {tenant}: watermark and hard-limit transitions in event-time order")
        for at, run, kind, before, after, used, cap, reason in rows[:_SHOWN_TRANSITIONS]:
            what = f"{before} -> {after}" if kind == "budget_state" else kind
            table.add_row(at[11:23], run[:8], what, f"{_n(used)} / {_n(cap)}", reason)
        self.console.print(table)
        if len(rows) > _SHOWN_TRANSITIONS:
            self.console.print(f"... and {len(rows) - _SHOWN_TRANSITIONS} more (see the queries below)")
        _, hard, rejections, *_, context_hard = budget.get(tenant, (0,) * 6)
        self.console.print(f"runaway tenant {tenant} hit its hard limit {hard} times ({context_hard} on context "
                           f"slots or total, {rejections} rejections)", style="bold")
        others = [t.tenant_id for t in self.tenants if t.tenant_id != tenant]
        context = {t: budget[t][5] for t in others if t in budget and budget[t][5]}
        caps = {t: budget[t][1] - budget[t][5] for t in others if t in budget and budget[t][1] > budget[t][5]}
        if not context and not caps:
            self.console.print(f"other tenants ({', '.join(others)}): 0 hard-limit decisions, unaffected",
                               style="green")
        elif not context:
            self.console.print(f"other tenants ({', '.join(others)}): 0 context hard limits, unaffected by "
                               f"{tenant}; own run/workflow/window token caps reached: {caps}", style="yellow")
        else:
            self.console.print(f"other tenants with context hard limits: {context}", style="red")

    def _dead_letters(self) -> None:
        table = Table("tenant", "source", "offset", "reason code", "reason", title="Dead letters")
        for tenant, topic, partition, offset, code, reason in self.rows(
                "SELECT tenant_id, source_topic, source_partition, source_offset, reason_code, reason "
                "FROM dead_letters ORDER BY source_topic, source_offset"):
            table.add_row(tenant or "(unreadable)", f"{topic}[{partition}]", str(offset), code, reason)
        self.console.print(table)

    def _privacy(self) -> bool:
        private, leaked, kept = self.rows(
            "SELECT countIf(privacy = 'no_retention'), countIf(privacy = 'no_retention' AND content IS NOT NULL), "
            "countIf(privacy = 'retained' AND content IS NOT NULL) FROM turns")[0]
        ok = int(leaked) == 0
        self.console.print(
            f"privacy: {_n(private)} no_retention turns stored, {_n(leaked)} of them with content "
            f"({_n(kept)} retained turns keep theirs): {'OK' if ok else 'VIOLATED'}",
            style="green" if ok else "bold red")
        return ok

    def _admission(self, budget: dict[str, tuple[int, ...]]) -> None:
        runaway_run = self.rows(
            f"SELECT run_id FROM turns WHERE tenant_id = '{self.runaway}' GROUP BY run_id "
            "ORDER BY sum(token_count) DESC LIMIT 1")
        healthy = next((t.tenant_id for t in self.tenants
                        if t.tenant_id != self.runaway and not budget.get(t.tenant_id, (0, 0))[1]), None)
        healthy_run = self.rows(
            f"SELECT run_id FROM turns WHERE tenant_id = '{healthy}' GROUP BY run_id "
            "ORDER BY max(occurred_at) DESC LIMIT 1") if healthy else []
        checks = [(self.runaway, r[0]) for r in runaway_run] + [(str(healthy), r[0]) for r in healthy_run]
        plan = ", ".join(f"{slot.value} {tokens}" for slot, tokens in _PLAN.items())
        self.console.print(f"admission check from Redis (one GET per run), planning {plan} tokens:")
        for tenant, run, answer, ms in asyncio.run(_admit(self.worker.settings.redis_url, checks)):
            self.console.print(f"  {tenant} run {run[:8]}: {answer.reason} ({ms:.1f} ms)",
                               style="green" if answer.admitted else "red")

    def _next_steps(self) -> None:
        runaway = self.runaway
        queries = (
            "SELECT tenant_id, slot, sum(token_count) AS tokens FROM turns GROUP BY tenant_id, slot "
            "ORDER BY tenant_id, tokens DESC",
            f"SELECT decided_at, kind, state, reason FROM decisions WHERE tenant_id = '{runaway}' "
            "AND kind != 'usage_reconciled' ORDER BY decided_at LIMIT 20",
            "SELECT tenant_id, model, count() AS calls, sum(input_tokens + output_tokens) AS tokens, "
            "quantile(0.99)(latency_ms) AS p99_ms FROM usage GROUP BY tenant_id, model",
            "SELECT source_topic, source_offset, reason_code, reason FROM dead_letters",
        )
        self.console.print(
            "Next: query what the worker wrote. While a worker runs, `ctxflow query` goes through it (chDB "
            "allows one engine per process); this demo's worker has stopped, so these open the chDB it left:")
        for sql in queries:
            self.console.print(f'  CTXFLOW_HOME={self.shown_home} ctxflow query "{sql}"', soft_wrap=True)


async def _admit(url: str, checks: list[tuple[str, str]]) -> list[tuple[str, str, AdmissionAnswer, float]]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    answers = []
    try:
        for tenant, run in checks:
            began = time.perf_counter()
            headroom = await read_headroom(client, tenant, run)
            answers.append((tenant, run, check_admission(headroom, _PLAN), (time.perf_counter() - began) * 1000))
    finally:
        await client.aclose()
    return answers
