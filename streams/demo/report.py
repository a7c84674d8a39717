"""The end-of-demo report: what the worker durably did, read back from ClickHouse, and admission checks
answered from Redis, as an agent would make them.

Every number comes from the worker's ClickHouse (through its query endpoint), after its committed offsets
reached the end of every input, so it shows what was durably processed, not what was sent. The one thing
ClickHouse does not keep is a summary's text and summarizer (a payload, and provenance beyond id, depth and
fidelity): the example swap takes those from the decision as the decisions topic carried it, and shows it only
once ClickHouse holds the same decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ctxflow.processors.admission import AdmissionAnswer, check_admission
from ctxflow.processors.eviction.features import extract
from ctxflow.processors.pricing import DEFAULT_PRICES
from ctxflow.schemas.models import Decision, DecisionKind, EvictionStrategy, OverflowBehaviour, Slot
from ctxflow.sinks.redis import read_headroom
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.report.collect import collect, settings_query
from ctxflow.streams.report.html import write_html
from ctxflow.streams.report.scope import ReportScope
from ctxflow.streams.report.terminal import print_report
from ctxflow.streams.report.views import VIEWS
from ctxflow.streams.stack.worker_process import WorkerProcess
from rich.console import Console
from rich.table import Table

_SLOTS = tuple(slot.value for slot in Slot)
#: What an agent of each checked run plans to add before its next call (slot -> tokens).
_PLAN = {Slot.HISTORY: 800, Slot.RETRIEVED: 600, Slot.OUTPUT: 500}
_BUDGET_KINDS = "('budget_state', 'rejection', 'spend_exhausted')"
_SHOWN_TRANSITIONS = 12
#: A context gauge (slot or total), not a consumption cap: the rule of streams.demo.run._context_gauge, in SQL.
_CONTEXT = "(slot IS NOT NULL OR startsWith(reason, 'total context'))"
#: The gauge a budget_state decision is about, from its slot or its reason (a workflow's id left out).
_GAUGE = ("multiIf(slot IS NOT NULL, concat('slot ', toString(slot)), "
          "replaceRegexpOne(splitByString(' went ', splitByString(' (', reason)[1])[1], '^workflow \\S+ ', "
          "'workflow '))")
_SHOWN_TEXT = 150
_SHOWN_LINES = 6
#: How many user-caused recalls the example is chosen from.
_RECALL_CANDIDATES = 40
#: Views that compare an event's own time with the wall clock: the demo's workload keeps its own clock (from
#: ``Workload.start``, faster than real time), so its event-to-insert lag would mean nothing.
_WALL_CLOCK_VIEWS = ("ingest_lag", "ingest_lag_over_time")


def _n(value: int | str | None) -> str:
    return f"{int(value or 0):,}"


class DemoReport:
    """The end-of-demo report, every number read from ClickHouse through the running worker."""

    def __init__(self, worker: WorkerProcess, workload: Workload, console: Console, shown_home: Path,
                 published: dict[DecisionKind, list[Decision]] | None = None) -> None:
        self.worker, self.console, self.shown_home = worker, console, shown_home
        self.tenants = workload.tenants
        self.runaway = workload.runaway_tenant.tenant_id if workload.runaway_tenant else ""
        self.published = published or {}
        self.turns = 0

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.worker.query(sql).rows

    def print_all(self) -> bool:
        """Print every section; False when an invariant the demo shows (privacy) is broken."""
        budget = self._per_tenant()
        self._relief()
        self._runaway_section(budget)
        self._example_swap()
        self._example_recall()
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
        decided = Table("tenant", "soft watermark", "hard limit", "rejections", "spend exhausted",
                        "eviction requests", "dead letters", title="Per tenant: budget decisions")
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

    def _relief(self) -> None:
        """Per tenant: what the eviction planner did, and how often a context gauge came back to ok."""
        done = {r[0]: r[1:] for r in self.rows(
            "SELECT tenant_id, countIf(kind = 'evict'), countIf(kind = 'mask'), countIf(kind = 'compress'), "
            "countIf(kind = 'swap'), countIf(kind = 'offload'), countIf(kind = 'recall'), sum(tokens_freed), "
            f"countIf(kind = 'budget_state' AND state = 'ok' AND previous_state != 'ok' AND {_CONTEXT}) "
            "FROM decisions GROUP BY tenant_id")}
        table = Table("tenant", "strategy", "evictions", "masks", "compressions", "swaps", "offloads", "recalls",
                      "tokens freed", "back to ok", title="Per tenant: what the eviction planner did (relief)")
        for t in self.tenants:
            manifest = t.manifest
            strategy = (manifest.eviction.strategy if manifest.eviction else EvictionStrategy.HYBRID).value
            if manifest.overflow is OverflowBehaviour.REJECT:
                strategy = "none (overflow: reject)"
            table.add_row(t.tenant_id, strategy, *(_n(v) for v in done.get(t.tenant_id, (0,) * 8)))
        self.console.print(table)

    def _runaway_section(self, budget: dict[str, tuple[int, ...]]) -> None:
        tenant = self.runaway
        moves: dict[str, Counter[str]] = {}
        for gauge, before, after, n in self.rows(
                f"SELECT {_GAUGE} AS gauge, previous_state, state, count() FROM decisions "
                f"WHERE tenant_id = '{tenant}' AND kind = 'budget_state' GROUP BY gauge, previous_state, state"):
            moves.setdefault(gauge, Counter())[f"{before} -> {after}"] += int(n)
        columns = [m for m in ("ok -> soft", "soft -> ok", "soft -> hard", "hard -> soft", "hard -> ok", "ok -> hard")
                   if any(m in c for c in moves.values())]
        summary = Table("gauge", *(f"{m} (relief)" if m.endswith("-> ok") else m for m in columns),
                        title=f"Runaway tenant {tenant}: budget-state transitions per gauge")
        for gauge in sorted(moves, key=lambda g: (not g.startswith("slot"), g)):
            summary.add_row(gauge, *(_n(moves[gauge][m]) for m in columns))
        self.console.print(summary)
        # decided_at is the batch's wall clock (one value per batch): order by the source event's time instead.
        sources = " UNION ALL ".join(f"SELECT event_id, occurred_at AS at FROM {table} WHERE tenant_id = '{tenant}'"
                                     for table in ("turns", "usage", "runs"))
        rows = self.rows(
            "SELECT toString(e.at), d.run_id, d.kind, d.previous_state, d.state, d.used_tokens, d.cap_tokens, "
            f"d.reason FROM decisions AS d LEFT JOIN ({sources}) AS e ON d.source_event_id = e.event_id "
            f"WHERE d.tenant_id = '{tenant}' AND d.kind IN {_BUDGET_KINDS} "
            # One event's decisions in the order they were made: up first, then relief back down.
            "ORDER BY e.at, d.state = 'ok', d.used_tokens, d.kind")
        table = Table("event time", "run", "decision", "used / cap", "reason",
                      title=f"Runaway tenant {tenant}: the first transitions in event-time order")
        for at, run, kind, before, after, used, cap, reason in rows[:_SHOWN_TRANSITIONS]:
            what = f"{before} -> {after}" if kind == "budget_state" else kind
            table.add_row(at[11:23], run[:8], what, f"{_n(used)} / {_n(cap)}", reason)
        self.console.print(table)
        if len(rows) > _SHOWN_TRANSITIONS:
            self.console.print(f"... and {len(rows) - _SHOWN_TRANSITIONS:,} more (see the queries below)")
        _, hard, rejections, spent, _, context_hard = budget.get(tenant, (0,) * 6)
        relieved = sum(c[m] for c in moves.values() for m in ("soft -> ok", "hard -> ok"))
        self.console.print(f"runaway tenant {tenant} hit its hard limit {hard} times ({context_hard} on context "
                           f"slots or total, {rejections} rejections); relief brought its context back to ok "
                           f"{relieved:,} times; its spend was exhausted {spent} times (run, workflow or daily "
                           "token caps)",
                           style="bold")
        others = [t.tenant_id for t in self.tenants if t.tenant_id != tenant]
        rejected = {t: budget[t][2] for t in others if t in budget and budget[t][2]}
        context = {t: budget[t][5] for t in others if t in budget and budget[t][5]}
        caps = {t: budget[t][1] - budget[t][5] for t in others if t in budget and budget[t][1] > budget[t][5]}
        if rejected or context:
            self.console.print(f"other tenants with rejections {rejected or 'none'}, with context hard limits "
                               f"{context or 'none'}", style="red")
        else:
            own = f"; own run/workflow/window token caps reached: {caps}" if caps else ""
            self.console.print(f"other tenants ({', '.join(others)}): 0 rejections, 0 context hard limits, "
                               f"unaffected by {tenant}{own}", style="yellow" if caps else "green")

    def _example_swap(self) -> None:
        """One swap: the summary that replaced its sources, with provenance and fidelity."""
        swaps = self.published.get(DecisionKind.SWAP, [])
        # The runaway's history first (what its agent said), a first summary (not one of summaries), most sources.
        ranked = sorted(swaps, key=lambda d: (d.tenant_id != self.runaway, d.slot is not Slot.HISTORY,
                                              d.summary is None or d.summary.depth != 1, -len(d.actions)))
        for swap in ranked[:20]:
            durable = self.rows(
                "SELECT summary_id, summary_depth, summary_fidelity, length(actions), tokens_freed FROM decisions "
                f"WHERE tenant_id = '{swap.tenant_id}' AND decision_id = '{swap.decision_id}'")
            if not durable or swap.summary is None:
                continue
            summary_id, depth, fidelity, sources, freed = durable[0]
            p = swap.summary
            replaced = sum(a.tokens for a in swap.actions)
            self.console.print(
                f"example swap ({swap.tenant_id} run {(swap.run_id or '')[:8]}, {swap.strategy}, slot "
                f"{swap.slot.value if swap.slot else '-'}): summary {summary_id} by {p.summarizer} "
                f"{p.summarizer_version}, depth {depth}, fidelity {float(fidelity):.2f}, {sources} sources "
                f"({replaced:,} tokens) replaced by {p.token_count:,} tokens, {_n(freed)} freed", style="bold")
            lines = (p.text or "(no_retention: the text stays with the agent)").splitlines()
            for line in lines[:_SHOWN_LINES]:
                self.console.print(f"  | {line[:_SHOWN_TEXT]}{' ...' if len(line) > _SHOWN_TEXT else ''}",
                                   soft_wrap=True)
            if len(lines) > _SHOWN_LINES:
                self.console.print(f"  | ... {len(lines) - _SHOWN_LINES} more lines", soft_wrap=True)
            return
        self.console.print("example swap: none (no summary was swapped in)", style="yellow")

    def _example_recall(self) -> None:
        """One recall a user turn caused: what it named and what came back (the one whose items share the most
        with the turn among the first :data:`_RECALL_CANDIDATES`)."""
        tenant = self.runaway
        total, by_user = self.rows(
            "SELECT count(), countIf(t.role = 'user') FROM decisions AS d LEFT JOIN (SELECT event_id, role FROM turns "
            f"WHERE tenant_id = '{tenant}') AS t ON d.source_event_id = t.event_id "
            f"WHERE d.tenant_id = '{tenant}' AND d.kind = 'recall'")[0]
        found = [(run, [_action(a) for a in actions], asked) for run, actions, asked in self.rows(
            "SELECT d.run_id, d.actions, t.content FROM decisions AS d INNER JOIN (SELECT event_id, content, "
            f"occurred_at FROM turns WHERE tenant_id = '{tenant}' AND role = 'user' AND content IS NOT NULL) AS t "
            f"ON d.source_event_id = t.event_id WHERE d.tenant_id = '{tenant}' AND d.kind = 'recall' "
            f"ORDER BY t.occurred_at LIMIT {_RECALL_CANDIDATES}")]
        if not found:
            self.console.print(f"example recall: none of {tenant}'s {_n(total)} recalls followed a user turn",
                               style="yellow")
            return
        wanted = sorted({item_id for _, actions, _ in found for item_id, _ in actions})
        items = {r[0]: r[1:] for r in self.rows(
            "SELECT item_id, role, kind, content FROM turns "
            f"WHERE tenant_id = '{tenant}' AND item_id IN ({', '.join(repr(i) for i in wanted)})")}

        def shared_terms(asked: str, item_id: str) -> set[str]:
            content = items.get(item_id, (None, None, None))[2]
            if not content:
                return set()
            named, held = extract(asked), extract(content)
            return (named.identifiers | named.numbers) & (held.identifiers | held.numbers)

        def score(candidate: tuple[str, list[tuple[str, int]], str]) -> tuple[int, int]:
            _, actions, asked = candidate
            per_item = [shared_terms(asked, item_id) for item_id, _ in actions]
            return sum(1 for terms in per_item if terms) * 2 - len(per_item), len(set().union(*per_item))

        run, actions, asked = max(found, key=score)
        shared = set().union(*(shared_terms(asked, item_id) for item_id, _ in actions))
        self.console.print(
            f"example recall ({tenant} run {run[:8]}; {_n(by_user)} of its {_n(total)} recalls followed a user turn): "
            f"the user asked \"{' '.join(asked.split())}\"", style="bold", soft_wrap=True)
        self.console.print(f"  {len(actions)} offloaded items came back ({sum(t for _, t in actions):,} tokens), "
                           f"naming {', '.join(sorted(shared)) or 'terms the turn named'}:", soft_wrap=True)
        for item_id, tokens in actions:
            role, kind, content = items.get(item_id, ("assistant", "summary", None))
            head = " ".join((content or item_id).split())
            what = kind.replace("_", " ") if role == "tool" else f"{role} {kind.replace('_', ' ')}"
            self.console.print(f"    {what} ({tokens} tokens): {head[:90]}"
                               f"{' ...' if len(head) > 90 else ''}", soft_wrap=True)

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
            f"SELECT decided_at, kind, state, tokens_freed, reason FROM decisions WHERE tenant_id = '{runaway}' "
            "AND kind != 'usage_reconciled' ORDER BY decided_at LIMIT 20",
            "SELECT tenant_id, strategy, kind, count(), sum(tokens_freed) FROM decisions WHERE kind IN "
            "('evict', 'mask', 'compress', 'swap', 'offload', 'recall') GROUP BY ALL ORDER BY ALL",
            "SELECT tenant_id, slot, summary_id, summary_depth, summary_fidelity, length(actions) AS sources, "
            "tokens_freed FROM decisions WHERE kind = 'swap' ORDER BY decided_at LIMIT 10",
            "SELECT tenant_id, model, count() AS calls, sum(input_tokens + output_tokens) AS tokens, "
            "quantile(0.99)(latency_ms) AS p99_ms FROM usage GROUP BY tenant_id, model",
            "SELECT source_topic, source_offset, reason_code, reason FROM dead_letters",
        )
        self.console.print(
            "Next: query what the worker wrote. While a worker runs, `ctxflow query` goes through it (chDB "
            "allows one engine per process); this demo's worker has stopped, so these open the chDB it left:")
        for sql in queries:
            self.console.print(f'  CTXFLOW_HOME={self.shown_home} ctxflow query "{sql}"', soft_wrap=True)


def print_analyst_report(settings: Settings, since: dt.datetime, console: Console, shown_home: Path) -> Path:
    """``ctxflow report --compact`` over everything the demo wrote since ``since`` (read from the chDB it left,
    as that command would), and the full report as HTML in the demo's home; returns the HTML file's path."""
    scope = ReportScope(since, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    views = [view for view in VIEWS if view.key not in _WALL_CLOCK_VIEWS]
    made = collect(settings_query(settings), scope, source=f"the chDB the demo left in {shown_home}", views=views)
    print_report(made, console, compact=True)
    path = write_html(made, settings.home / "report.html")
    console.print(f"ingest lag is left out: the demo's events carry a simulated clock from {since:%Y-%m-%d %H:%M}. "
                  f"The full report: CTXFLOW_HOME={shown_home} ctxflow report --since {since:%Y-%m-%d}", soft_wrap=True)
    console.print(f"HTML report: {path}", soft_wrap=True)
    return path


def _action(action: dict[str, Any] | tuple[Any, ...]) -> tuple[str, int]:
    """(item id, tokens) of one ``decisions.actions`` element (a named tuple: a dict in JSON, else a tuple)."""
    if isinstance(action, dict):
        return str(action["item_id"]), int(action["tokens"])
    return str(action[0]), int(action[2])


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
