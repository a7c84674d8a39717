"""Exactly-once totals under duplicates and crashes, and tenant isolation: property tests without a broker.

The worker's processor chain runs (budget, eviction planner: small history caps make it evict, envelopes: runs
that never finalize are closed after the idle timeout). The crash model follows the worker's persistence order
(``streams.runtime.pipeline``): after each batch it writes what the batch published (decisions, envelopes, cost
lines), then aggregate values (tenant, user, workflow ledgers, in any order), then run ledgers, then envelope
states, then the planner's working sets, then watermarks, then the consumer offsets. A crash persists a random
prefix of that list; the restarted worker rebuilds its state from what was persisted (through the changelog
snapshots) and re-reads every topic from its committed offset, interleaving the topics differently from the
first time.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ctxflow.processors.budget import BudgetProcessor, Event
from ctxflow.processors.chain import default_chain
from ctxflow.processors.envelopes.integrity import integrity_hash
from ctxflow.processors.envelopes.processor import DEFAULT_IDLE_TIMEOUT_S
from ctxflow.processors.envelopes.state import RunState
from ctxflow.processors.eviction.workset import WorkingSet
from ctxflow.processors.ledger import RunLedger, WorkflowLedger
from ctxflow.processors.manifest import SLOT_INDEX
from ctxflow.processors.pricing import DEFAULT_PRICES, usage_tokens
from ctxflow.processors.retention import Watermark
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, tenant_of_key
from ctxflow.processors.windows import WINDOW_KINDS, SpendLedger, to_ms, window_index
from ctxflow.schemas.models import (
    CostLine,
    Decision,
    DecisionKind,
    RunEnvelope,
    RunEvent,
    Slot,
    SlotCaps,
    TurnEvent,
    UsageReport,
    UserOverride,
    content_digest,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.unit.test_budget_factories import NOW, manifest, run_event, turn, usage, window

BASE = datetime(2024, 2, 29, 22, 40, tzinfo=UTC)  # the traffic crosses an hour, a day and a month boundary
TOPICS = ("turns", "usage", "runs")
COUNTER = TokenCounter()
TIERS = ("free", "standard", "enterprise")


def prompt_of(tenant: str) -> str:
    """The tenant's system prompt (every tenant's differs)."""
    return f"You are the {tenant} assistant. Follow {tenant} policy. " * 12


def manifests(tenants: list[str]) -> list:
    return [
        manifest(
            t,
            tier=TIERS[i % 3],
            slot_caps=SlotCaps(history=500, tools=300),
            total_cap=1500,
            spend_windows=[window("hour", 800), window("day", 2500, cost=20_000)],
            run_cap_tokens=1000,
            workflow_cap_tokens=2000,
            subagent_share=0.5,
            user_overrides={"u1": UserOverride(spend_windows=[window("hour", 300)])},
        )
        for i, t in enumerate(tenants)
    ]


@dataclass
class Workload:
    """What producers sent: per-topic logs (with duplicates and reordering) and the distinct records."""

    logs: dict[str, list[Event]] = field(default_factory=lambda: {t: [] for t in TOPICS})
    distinct: list[Event] = field(default_factory=list)


def workload(rng: random.Random, tenants: list[str], runs: int, dup_rate: float) -> Workload:
    timeline: list[tuple[float, str, Event]] = []
    for tenant in tenants:
        for r in range(runs):
            run_id, user = f"run{r}", f"u{rng.randint(0, 1)}"
            parent = None if r == 0 or rng.random() < 0.4 else "run0"
            who = {"run": run_id, "tenant": tenant, "user_id": user, "agent_id": f"agent{r % 2}"}
            start = rng.uniform(0, 100)

            def at(minutes: float) -> datetime:
                return BASE + timedelta(milliseconds=int(minutes * 60_000))

            if rng.random() < 0.8:
                ev = run_event(
                    "started",
                    parent=parent,
                    workflow="run0" if parent else run_id,
                    occurred_at=at(start),
                    **who,
                )
                timeline.append((start, "runs", ev))
            prompt = prompt_of(tenant)  # the tenant's system prompt: sent in full, or only its digest
            bare = {"content": None if rng.random() < 0.6 else prompt, "content_digest": content_digest(prompt)}
            system = turn(
                0, 0, slot=Slot.SYSTEM, token_count=None, parent_run_id=parent, occurred_at=at(start), **bare, **who
            )
            timeline.append((start - 0.5, "turns", system))
            for seq in range(1, rng.randint(2, 10)):
                t = start + seq + rng.uniform(-1.5, 1.5)  # neighbours may swap: reordered within the run
                slot = rng.choice([Slot.HISTORY, Slot.HISTORY, Slot.TOOLS, Slot.RETRIEVED])
                ev = turn(seq, rng.randint(0, 160), slot=slot, parent_run_id=parent, occurred_at=at(t), **who)
                timeline.append((t, "turns", ev))
            for c in range(rng.randint(0, 3)):
                t = start + rng.uniform(0, 12)
                ev = usage(
                    f"call{c}",
                    rng.randint(0, 400),
                    rng.randint(0, 100),
                    complete=rng.random() > 0.15,
                    occurred_at=at(t),
                    **who,
                )
                timeline.append((t, "usage", ev))
            if rng.random() < 0.7:
                t = start + 12 + rng.uniform(0, 5)
                ev = run_event(
                    "finalized",
                    parent=parent,
                    workflow="run0" if parent else run_id,
                    occurred_at=at(t),
                    **who,
                )
                timeline.append((t, "runs", ev))
    timeline.sort(key=lambda x: x[0])
    w = Workload()
    for _, topic, ev in timeline:
        w.distinct.append(ev)
        w.logs[topic].append(ev)
    for log in w.logs.values():  # producer retries: a copy lands later, at a new offset
        for ev in list(log):
            if rng.random() < dup_rate:
                log.insert(rng.randint(log.index(ev) + 1, len(log)), ev)
    return w


class Worker:
    """A budget worker over ``DictBudgetState``: persists each batch in the worker's order; may crash."""

    def __init__(self, w: Workload, tenants: list[str], rng: random.Random) -> None:
        self.w, self.rng, self.manifests = w, rng, manifests(tenants)
        self.durable: dict[str, dict] = {
            "runs": {}, "tenants": {}, "users": {}, "workflows": {}, "counts": {}, "worksets": {}, "envelopes": {},
            "watermarks": {},
        }
        self.decisions: dict[str, Decision] = {}
        #: What went out on envelopes and costs, in order (a topic keeps every copy; readers keep the last).
        self.published: list[RunEnvelope | CostLine] = []
        self.committed = dict.fromkeys(TOPICS, 0)
        self.restart()

    def restart(self) -> None:
        d = self.durable
        self.state = DictBudgetState(
            runs={k: RunLedger.from_list(v) for k, v in d["runs"].items()},
            tenants={k: SpendLedger.from_dict(v) for k, v in d["tenants"].items()},
            users={k: SpendLedger.from_dict(v) for k, v in d["users"].items()},
            workflows={k: WorkflowLedger.from_dict(v) for k, v in d["workflows"].items()},
            counts=dict(d["counts"]),
            manifests={m.tenant_id: m for m in self.manifests},
            watermarks={k: Watermark.from_list(v) for k, v in d["watermarks"].items()},
            tables={
                "worksets": {k: WorkingSet.from_bytes(v) for k, v in d["worksets"].items()},
                "envelopes": {k: RunState.from_bytes(v) for k, v in d["envelopes"].items()},
            },
        )
        self.chain = default_chain(BudgetProcessor(COUNTER))
        self.position = dict(self.committed)

    def run(self, crashes: int, crash_rate: float) -> None:
        while pending := [t for t in TOPICS if self.position[t] < len(self.w.logs[t])]:
            out: list[Decision | RunEnvelope | CostLine] = []
            for _ in range(self.rng.randint(1, 6)):
                if not (pending := [t for t in TOPICS if self.position[t] < len(self.w.logs[t])]):
                    break
                topic = self.rng.choice(pending)  # the topics interleave differently on every pass
                offset = self.position[topic]
                self.position[topic] += 1
                record, pos = self.w.logs[topic][offset], Position(topic, 0, offset)
                out += [o for o in self.chain.process(record, pos, self.state, NOW)
                        if isinstance(o, Decision | RunEnvelope | CostLine)]
            if crashes and self.rng.random() < crash_rate:
                crashes -= 1
                self.persist(out, cut=True)
                self.restart()
            else:
                self.persist(out, cut=False)

    def persist(self, out: list[Decision | RunEnvelope | CostLine], cut: bool) -> None:
        dirty, self.state.dirty = self.state.dirty, {}
        tables = ("tenants", "users", "workflows", "counts")
        aggregates = [(t, k) for t in tables for k in sorted(dirty.get(t, ()))]
        self.rng.shuffle(aggregates)
        runs = [("runs", k) for k in sorted(dirty.get("runs", ()))]
        self.rng.shuffle(runs)
        later_first = []  # each processor's table in its own phase, the later processor's first
        for table in ("envelopes", "worksets"):
            keys = [(table, k) for k in sorted(dirty.get(table, ()))]
            self.rng.shuffle(keys)
            later_first += keys
        marks = [("watermarks", k) for k in sorted(dirty.get("watermarks", ()))]
        writes = [("decision", d) for d in out] + aggregates + runs + later_first + marks + [("commit", None)]
        for kind, item in writes[: self.rng.randrange(len(writes))] if cut else writes:
            if kind == "decision":
                if isinstance(item, Decision):
                    self.decisions[item.decision_id] = item
                else:
                    self.published.append(item)
            elif kind == "commit":
                self.committed = dict(self.position)
            elif kind == "runs":
                self.durable["runs"][item] = self.state.runs[item].to_list()
            elif kind in ("worksets", "envelopes"):
                value = self.state.tables[kind].get(item)  # retired: a tombstone
                if value is None:
                    self.durable[kind].pop(item, None)
                else:
                    self.durable[kind][item] = value.to_bytes()
            elif kind == "watermarks":
                self.durable["watermarks"][item] = self.state.watermarks[item].to_list()
            elif kind == "counts":
                self.durable["counts"][item] = self.state.counts[item]
            else:
                self.durable[kind][item] = getattr(self.state, kind)[item].to_dict()


def truth(w: Workload) -> dict:
    """Totals computed directly from the distinct records, with no processor involved."""
    runs: dict[str, dict] = defaultdict(
        lambda: {
            "slots": [0] * 6,
            "rep": 0,
            "cost": 0,
            "calls": 0,
            "incomplete": False,
            "final": None,
            "known": False,
            "records": 0,
        }
    )
    seen_prompt: set[str] = set()
    for ev in w.distinct:
        r = runs[f"{ev.tenant_id}:{ev.run_id}"]
        r.update(tenant=ev.tenant_id, user=ev.user_id, run=ev.run_id, records=r["records"] + 1)
        if isinstance(ev, TurnEvent):
            tokens = ev.token_count
            if tokens is None:  # a system prompt: counted from content, or from the tenant's earlier count
                prompt_tokens = COUNTER.count(prompt_of(ev.tenant_id), ev.model).tokens
                if ev.content is not None:
                    seen_prompt.add(ev.tenant_id)
                tokens = prompt_tokens if ev.tenant_id in seen_prompt else 0
            r["slots"][SLOT_INDEX[ev.slot]] += tokens
            r["known"] |= ev.parent_run_id is None
            r.setdefault("workflow", ev.run_id if ev.parent_run_id is None else None)
        elif isinstance(ev, UsageReport):
            r["rep"] += usage_tokens(ev)
            r["cost"] += DEFAULT_PRICES.usage_cost(ev).micros
            r["calls"] += 1
            r["incomplete"] |= not ev.complete or usage_tokens(ev) == 0  # a call logged at zero is estimated too
            r["usage_times"] = [
                *r.get("usage_times", []),
                (to_ms(ev.occurred_at), usage_tokens(ev), r["cost"]),
            ]
        elif isinstance(ev, RunEvent):
            r["known"], r["workflow"] = True, ev.workflow_id
            if ev.phase == "finalized":
                r["final"] = to_ms(ev.occurred_at)
    contributions: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for r in runs.values():
        ws = sum(r["slots"])
        top = max(ws - r["rep"], 0) if r["final"] is not None and (not r["calls"] or r["incomplete"]) else 0
        top_cost = DEFAULT_PRICES.estimate_cost("gpt-4o", top).micros if top else 0
        r["tokens"], r["all_cost"] = r["rep"] + top, r["cost"] + top_cost
        for owner in (r["tenant"], f"{r['tenant']}:{r['user']}"):
            if r["final"] is not None:
                contributions[owner].append((r["final"], top, top_cost))
    for ev in w.distinct:
        if isinstance(ev, UsageReport):
            cost = DEFAULT_PRICES.usage_cost(ev).micros
            for owner in (ev.tenant_id, f"{ev.tenant_id}:{ev.user_id}"):
                contributions[owner].append((to_ms(ev.occurred_at), usage_tokens(ev), cost))
    return {"runs": runs, "contributions": contributions}


def check_totals(durable: dict[str, dict], w: Workload) -> None:
    expected = truth(w)
    for key, r in expected["runs"].items():
        run = RunLedger.from_list(durable["runs"][key])
        assert list(run.tokens) == r["slots"], key
        assert (run.reported_tokens, run.reported_cost, run.reports, run.applied) == (
            r["rep"],
            r["cost"],
            r["calls"],
            r["records"],
        ), key
    for owner, items in expected["contributions"].items():
        table = "users" if ":" in owner else "tenants"
        ledger = SpendLedger.from_dict(durable[table][owner])
        assert (ledger.tokens, ledger.cost) == (sum(i[1] for i in items), sum(i[2] for i in items)), owner
        for kind, counter in zip(WINDOW_KINDS, ledger.counters, strict=True):
            newest = max(window_index(kind, t) for t, _, _ in items)
            assert counter.index == newest, (owner, kind)
            for idx, got in (
                (newest, (counter.tokens, counter.cost)),
                (newest - 1, (counter.prev_tokens, counter.prev_cost)),
            ):
                want = [(n, c) for t, n, c in items if window_index(kind, t) == idx]
                assert got == (sum(n for n, _ in want), sum(c for _, c in want)), (owner, kind, idx)
    flows: dict[str, int] = defaultdict(int)
    for r in expected["runs"].values():
        if r["known"]:
            flows[f"{r['tenant']}:{r['workflow']}"] += r["tokens"]
    for key, tokens in flows.items():
        got = WorkflowLedger.from_dict(durable["workflows"][key]).tokens if key in durable["workflows"] else 0
        assert got == tokens, key


def final_outputs(published: list[RunEnvelope | CostLine]) -> tuple[dict[str, RunEnvelope], dict[str, CostLine]]:
    """What readers keep of ``envelopes`` and ``costs``: a run's highest envelope version (the last of equals), and
    the last line of each id (the ClickHouse tables' rules)."""
    envelopes: dict[str, RunEnvelope] = {}
    lines: dict[str, CostLine] = {}
    for o in published:
        if isinstance(o, CostLine):
            lines[o.cost_id] = o
        elif (held := envelopes.get(key := f"{o.tenant_id}:{o.run_id}")) is None or (
                o.envelope_version >= held.envelope_version):
            envelopes[key] = o
    return envelopes, lines


def check_envelopes(published: list[RunEnvelope | CostLine], w: Workload) -> None:
    """Envelopes and cost lines against the distinct records: which runs closed (finalized, or idle past the
    timeout by the tenant's final watermark), their counts, tokens, estimates, costs and integrity hashes."""
    envelopes, lines = final_outputs(published)
    for record in published:  # built without a second validation (processors.envelopes.records)
        assert type(record).model_validate(record.model_dump()) == record
    runs = truth(w)["runs"]
    idle, low, last = DEFAULT_IDLE_TIMEOUT_S * 1000, defaultdict(dict), defaultdict(int)
    bucket = idle // 16
    retained: dict[str, int] = defaultdict(int)
    for ev in w.distinct:
        ms, key = to_ms(ev.occurred_at), f"{ev.tenant_id}:{ev.run_id}"
        low[ev.tenant_id][type(ev)] = max(low[ev.tenant_id].get(type(ev), ms), ms)
        last[key] = max(last[key], ms)
        if isinstance(ev, TurnEvent) and ev.content is not None:
            retained[key] += len(ev.content.encode())
    expected = {}
    for key, r in runs.items():
        if r["final"] is not None:
            expected[key] = "succeeded"
        elif len(marks := low[r["tenant"]]) == 3 and ((last[key] + idle) // bucket + 1) * bucket <= min(marks.values()):
            expected[key] = "abandoned"
    assert {k: e.status for k, e in envelopes.items()} == expected
    for key, env in envelopes.items():
        r = runs[key]
        estimated = max(sum(r["slots"]) - r["rep"], 0) if not r["calls"] or r["incomplete"] else 0
        usage = (env.input_tokens, env.output_tokens, env.cached_read_tokens, env.cache_write_tokens,
                 env.reasoning_tokens)
        assert (env.event_count, sum(usage), env.estimated_tokens) == (r["records"], r["rep"], estimated), key
        layers = (env.global_tokens, env.tenant_tokens, env.user_tokens, env.retrieved_tokens, env.session_tokens)
        assert sum(layers) == sum(r["slots"]) == env.static_prefix_tokens + env.dynamic_tokens, key
        assert env.inference_micros == r["cost"] + DEFAULT_PRICES.estimate_cost("gpt-4o", estimated).micros, key
        assert env.persistence_micros == DEFAULT_PRICES.storage_cost(retained[key] * 30).micros, key
        mine = [(t, [e for e in w.logs[t] if f"{e.tenant_id}:{e.run_id}" == key]) for t in TOPICS]
        assert env.integrity_hash == integrity_hash(env.tenant_id, env.run_id, *(e for _, e in mine)), key
        assert sum(c.micros for c in lines.values() if f"{c.tenant_id}:{c.run_id}" == key) == env.cost_micros, key
    assert len({c.source_event_id for c in lines.values() if c.surface == "inference"} - {
        e.event_id for e in w.distinct if isinstance(e, UsageReport)} - {f"close:{e.run_id}" for e in envelopes.values()
    }) == 0


def context_decisions(decisions: dict[str, Decision], w: Workload) -> set[str]:
    """Ids of slot/total decisions: they depend only on the turns stream, so every pass must agree."""
    turn_ids = {e.event_id for e in w.distinct if isinstance(e, TurnEvent)}
    return {
        i
        for i, d in decisions.items()
        if d.source_event_id in turn_ids and (d.slot is not None or d.reason.startswith("total context"))
    }


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tenants=st.integers(1, 3),
    runs=st.integers(1, 4),
    dup_rate=st.sampled_from([0.0, 0.2, 0.5]),
    crashes=st.integers(0, 4),
    crash_rate=st.sampled_from([0.2, 0.5]),
)
# A digest-only system prompt before the content copy that counts it; the crash makes the count durable but
# not the first run's ledger, and the replay must still count the prompt as it did the first time.
@example(seed=790, tenants=1, runs=2, dup_rate=0.0, crashes=1, crash_rate=0.5)
def test_crashes_and_duplicates_never_change_totals_or_lose_decisions(
    seed: int, tenants: int, runs: int, dup_rate: float, crashes: int, crash_rate: float
) -> None:
    rng = random.Random(seed)
    names = ["acme", "globex", "initech"][:tenants]
    w = workload(rng, names, runs, dup_rate)
    crashed = Worker(w, names, random.Random(seed + 1))
    crashed.run(crashes, crash_rate)
    reference = Worker(w, names, random.Random(seed + 2))
    reference.run(0, 0.0)
    check_totals(crashed.durable, w)
    check_totals(reference.durable, w)
    assert context_decisions(crashed.decisions, w) == context_decisions(reference.decisions, w)
    # The planner's working sets end the same after any crash, and the budget's live tokens agree with them.
    assert crashed.durable["worksets"] == reference.durable["worksets"]
    for key, value in crashed.durable["worksets"].items():
        ws, run = WorkingSet.from_bytes(value), RunLedger.from_list(crashed.durable["runs"][key])
        assert [run.live(i) for i in range(6)] == [ws.live_tokens(i) for i in range(6)], key
    reconciled = {d.source_event_id for d in crashed.decisions.values() if d.kind is DecisionKind.USAGE_RECONCILED}
    finals = {e.event_id for e in w.distinct if isinstance(e, UsageReport) or getattr(e, "phase", None) == "finalized"}
    assert reconciled == finals
    # Envelopes and cost lines: what a reader keeps is the same after any crash (ids included), and right.
    assert final_outputs(crashed.published) == final_outputs(reference.published)
    assert crashed.durable["envelopes"] == reference.durable["envelopes"]
    check_envelopes(reference.published, w)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tenants=st.integers(2, 5))
# Two runs of one tenant close at one record: a live index and one rebuilt from the store must close them in
# the same order.
@example(seed=164, tenants=3)
def test_each_tenant_sees_exactly_what_it_would_see_alone(seed: int, tenants: int) -> None:
    rng = random.Random(seed)
    names = [f"tenant-{i}" for i in range(tenants)]
    w = workload(rng, names, 3, 0.2)
    records = [(t, o, ev) for t in TOPICS for o, ev in enumerate(w.logs[t])]
    rng.shuffle(records)
    records.sort(key=lambda r: (r[1], r[0]))  # interleave tenants; keep offsets ascending per topic
    shared = DictBudgetState(manifests={m.tenant_id: m for m in manifests(names)})
    shared_out: dict[str, list[Decision]] = defaultdict(list)
    chain = default_chain(BudgetProcessor(COUNTER))
    for topic, offset, ev in records:
        for d in chain.process(ev, Position(topic, 0, offset), shared, NOW):
            assert d.tenant_id == ev.tenant_id
            shared_out[ev.tenant_id].append(d)
    for name in names:
        alone = DictBudgetState(manifests={m.tenant_id: m for m in manifests(names) if m.tenant_id == name})
        alone_out = [
            d
            for topic, offset, ev in records
            if ev.tenant_id == name
            for d in default_chain(BudgetProcessor(TokenCounter())).process(ev, Position(topic, 0, offset), alone, NOW)
        ]
        assert alone_out == shared_out[name]
        for table in ("runs", "tenants", "users", "workflows"):
            mine = {k: v for k, v in getattr(shared, table).items() if tenant_of_key(k) == name}
            assert mine == getattr(alone, table), (name, table)
        mine = {k: v.to_bytes() for k, v in shared.tables["worksets"].items() if tenant_of_key(k) == name}
        assert mine == {k: v.to_bytes() for k, v in alone.tables["worksets"].items()}, name
