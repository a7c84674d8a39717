"""Bounded state (processors.retention): runs retire after the window in event time, deterministically, and a
record later than the window is refused with a reason, never counted; within the window dedup stays exact."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from ctxflow.processors.budget import BudgetProcessor, Event
from ctxflow.processors.ledger import RunLedger
from ctxflow.processors.retention import Retention, RetirementIndex, Watermark
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key, workflow_key
from ctxflow.processors.windows import SpendLedger
from ctxflow.schemas.contract import OutsideDedupWindow
from ctxflow.schemas.models import SpendWindowKind
from ctxflow.streams.runtime.tables import VALUE_CODECS
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_budget_factories import NOW, manifest, run_event, turn, usage

WINDOW = Retention.of_seconds(3600)
BASE = datetime(2025, 3, 3, 0, 0, tzinfo=UTC)
COUNTER = TokenCounter()
TOPICS = ("turns", "usage", "runs")


def at(minutes: float) -> datetime:
    return BASE + timedelta(milliseconds=int(minutes * 60_000))


def run_records(tenant: str, r: int, start: float, child_of: int | None = None) -> list[tuple[str, Event]]:
    """One finished run: started, two turns, one usage report, finalized, over two minutes from ``start``."""
    run = f"run{r}"
    parent = f"run{child_of}" if child_of is not None else None
    flow = {"parent": parent, "workflow": parent or run}
    return [
        ("runs", run_event("started", run=run, tenant=tenant, occurred_at=at(start), **flow)),
        ("turns", turn(0, 50, run=run, tenant=tenant, parent_run_id=parent, occurred_at=at(start + 0.2))),
        ("turns", turn(1, 30, run=run, tenant=tenant, parent_run_id=parent, occurred_at=at(start + 0.5))),
        ("usage", usage("c1", 100 + r, 10, run=run, tenant=tenant, occurred_at=at(start + 1))),
        ("runs", run_event("finalized", run=run, tenant=tenant, occurred_at=at(start + 2), **flow)),
    ]


def logs_of(records: list[tuple[str, Event]]) -> dict[str, list[Event]]:
    logs: dict[str, list[Event]] = {t: [] for t in TOPICS}
    for topic, event in records:
        logs[topic].append(event)
    return logs


class Feed:
    """A processor over a dict store; records go in with their real per-topic offsets; refusals are kept."""

    def __init__(self, tenants: list[str], retention: Retention = WINDOW) -> None:
        self.state = DictBudgetState(manifests={t: manifest(t) for t in tenants})
        self.processor = BudgetProcessor(COUNTER, retention=retention)
        self.refused: list[tuple[str, int, str]] = []

    def apply(self, topic: str, offset: int, event: Event) -> None:
        try:
            self.processor.process(event, Position(topic, 0, offset), self.state, NOW)
        except OutsideDedupWindow as error:
            self.refused.append((topic, offset, error.reason))

    def interleave(self, logs: dict[str, list[Event]], rng: random.Random, restart_every: int = 0) -> None:
        """Every log in offset order, the topics interleaved at random (as the worker's fetches do) once each
        carried its first record (a stream's first record holds retirement back from then on)."""
        position = dict.fromkeys(logs, 0)
        done = 0
        while pending := [t for t in logs if position[t] < len(logs[t])]:
            unseen = [t for t in pending if position[t] == 0]
            topic = unseen[0] if unseen else rng.choice(pending)
            self.apply(topic, position[topic], logs[topic][position[topic]])
            position[topic] += 1
            done += 1
            if restart_every and done % restart_every == 0:
                self.processor = BudgetProcessor(COUNTER, retention=self.processor.retention)  # index rebuilt

    def usage_tokens(self, tenant: str) -> int:
        ledger: SpendLedger = self.state.tenants[tenant]
        return ledger.usage(SpendWindowKind.MONTH)[0]


def test_a_run_retires_a_window_after_its_last_event_and_a_late_duplicate_is_refused_not_counted() -> None:
    feed = Feed(["acme"])
    early = run_records("acme", 0, start=0)
    later = run_records("acme", 1, start=30) + run_records("acme", 2, start=90)
    logs = logs_of(early + later)
    for topic, log in logs.items():
        for offset, event in enumerate(log):
            feed.apply(topic, offset, event)
    # Every stream is past run0's last event by more than the window (plus a bucket): run0 is gone; run1 is not.
    assert run_key("acme", "run0") not in feed.state.runs
    assert {run_key("acme", "run1"), run_key("acme", "run2")} <= feed.state.runs.keys()
    assert feed.state.deleted["runs"] == {run_key("acme", "run0")}
    assert workflow_key("acme", "run0") not in feed.state.workflows
    counted = feed.usage_tokens("acme")

    # run0's usage report again, at a new offset: its dedup state is gone, so counting it would count it twice.
    resent = early[3][1]
    feed.apply("usage", len(logs["usage"]), resent)
    assert feed.usage_tokens("acme") == counted
    assert run_key("acme", "run0") not in feed.state.runs
    (topic, offset, reason), = feed.refused
    assert (topic, offset) == ("usage", len(logs["usage"]))
    assert "older than the dedup window (retention 3600 s)" in reason and "CTXFLOW_RUN_RETENTION_S" in reason

    # run2's usage again, inside the window: still deduplicated exactly (not refused, not counted).
    feed.apply("usage", len(logs["usage"]) + 1, later[8][1])
    assert feed.usage_tokens("acme") == counted and len(feed.refused) == 1


def test_a_workflow_retires_with_the_last_of_its_runs() -> None:
    feed = Feed(["acme"])
    records = run_records("acme", 0, start=0) + run_records("acme", 1, start=40, child_of=0)
    records += run_records("acme", 2, start=100) + run_records("acme", 3, start=170)
    logs = logs_of(records)
    feed.interleave(logs, random.Random(1))
    # run0 retired long ago, but its child run1 (same workflow) was active later: the workflow went with run1.
    assert feed.state.deleted["runs"] >= {run_key("acme", "run0"), run_key("acme", "run1")}
    assert workflow_key("acme", "run0") in feed.state.deleted["workflows"]
    assert workflow_key("acme", "run3") in feed.state.workflows


def test_a_record_the_watermark_already_covers_is_skipped_outright() -> None:
    feed = Feed(["acme"])
    records = run_records("acme", 0, start=0)
    logs = logs_of(records)
    for topic, log in logs.items():
        for offset, event in enumerate(log):
            feed.apply(topic, offset, event)
    before = feed.state.runs[run_key("acme", "run0")].to_list()
    del feed.state.runs[run_key("acme", "run0")]  # as if its ledger were lost: the watermark alone must skip
    feed.apply("usage", 0, logs["usage"][0])
    assert run_key("acme", "run0") not in feed.state.runs and before


def test_one_tenants_clock_never_retires_or_refuses_another_tenants_state() -> None:
    feed = Feed(["acme", "globex"])
    records = run_records("acme", 0, start=0) + run_records("globex", 0, start=0)
    records += run_records("globex", 1, start=500)  # globex far ahead: acme is untouched
    logs = logs_of(records)
    for topic, log in logs.items():
        for offset, event in enumerate(log):
            feed.apply(topic, offset, event)
    assert run_key("acme", "run0") in feed.state.runs and run_key("globex", "run0") not in feed.state.runs
    feed.apply("usage", len(logs["usage"]), usage("c2", 5, run="run0", tenant="acme", occurred_at=at(3)))
    assert not feed.refused


def test_the_index_hands_over_a_bucket_once_the_cutoff_passes_it() -> None:
    index = RetirementIndex(bucket_ms=100)
    index.note("a", None, 50)
    index.note("a", 50, 70)  # same bucket: filed once
    index.note("b", None, 150)
    index.note("a", 70, 260)  # moved on: filed again, the old entry stays (lazy)
    assert len(index) == 3
    assert index.due(100) == ["a"] and index.due(100) == []
    assert index.due(300) == ["b", "a"] and len(index) == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), runs=st.integers(3, 14), dup_rate=st.sampled_from([0.0, 0.3]))
def test_retirement_and_refusals_do_not_depend_on_how_the_streams_interleave(seed: int, runs: int, dup_rate: float
                                                                              ) -> None:
    """Runs spread over several windows, duplicates nearby and late: every interleaving of the three streams
    (and a processor restarted mid-way, whose index is rebuilt from the store) retires the same runs and
    workflows, refuses the same records and counts every distinct usage report once."""
    rng = random.Random(seed)
    records: list[tuple[str, Event]] = []
    for r in range(runs):
        child_of = r - 1 if r and rng.random() < 0.3 else None
        records += run_records("acme", r, start=r * rng.uniform(10, 50), child_of=child_of)
    distinct_usage = sum(e.input_tokens + e.output_tokens for t, e in records if t == "usage")
    records.sort(key=lambda te: te[1].occurred_at)
    logs = logs_of(records)
    for log in logs.values():  # resends: most soon after, some long after their run retired
        for event in list(log):
            if rng.random() < dup_rate:
                soon = log.index(event) + rng.randint(1, 3)
                log.insert(min(soon, len(log)) if rng.random() < 0.8 else len(log), event)
    outcomes = []
    for attempt in range(3):
        feed = Feed(["acme"])
        feed.interleave(logs, random.Random(seed + attempt), restart_every=7 * attempt)
        outcomes.append((set(feed.state.runs), set(feed.state.workflows), sorted(feed.refused)))
        assert feed.usage_tokens("acme") <= distinct_usage
        refused_usage = {o for t, o, _ in feed.refused if t == "usage"}
        counted = {e.event_id for o, e in enumerate(logs["usage"]) if o not in refused_usage}
        assert counted == {e.event_id for t, e in records if t == "usage"}, "a distinct report was refused"
        assert feed.usage_tokens("acme") == distinct_usage
    assert outcomes[0] == outcomes[1] == outcomes[2]


@pytest.mark.parametrize("seconds", [0.0005, 3600.0])
def test_a_window_is_never_shorter_than_a_millisecond(seconds: float) -> None:
    retention = Retention.of_seconds(seconds)
    assert retention.window_ms >= 1 and retention.bucket_ms >= 1


def test_watermarks_and_run_ledgers_round_trip_through_their_changelog_codecs() -> None:
    mark = Watermark()
    mark.advance(1, 42, 1_741_000_000_000)
    assert VALUE_CODECS["watermarks"].loads(VALUE_CODECS["watermarks"].dumps(mark)) == mark
    ledger = RunLedger(last_ms=1_741_000_000_123)
    assert VALUE_CODECS["runs"].loads(VALUE_CODECS["runs"].dumps(ledger)) == ledger
    # A ledger written before retention existed has no last activity: it is never filed for retirement
    # until its next record.
    assert RunLedger.from_list(ledger.to_list()[:15]).last_ms == -1
