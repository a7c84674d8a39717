"""The workload generator: deterministic, well-formed traffic with one runaway tenant (no Kafka)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
import tiktoken
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.schemas.models import (
    AdmissionRequest,
    ItemKind,
    MemoryCandidate,
    PrivacyMode,
    Role,
    RunEvent,
    RunPhase,
    Slot,
    TurnEvent,
    UsageReport,
    content_digest,
)
from ctxflow.streams.demo.workload import TOKENIZER, Workload
from ctxflow.streams.sdk import RunContext, redact
from pydantic import BaseModel

START = datetime(2025, 2, 3, 8, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def events() -> list[BaseModel]:
    return list(Workload(seed=5, duration_s=900, start=START).events())


def event_id(event: BaseModel) -> str:
    return event.request_id if isinstance(event, AdmissionRequest) else event.event_id  # type: ignore[attr-defined]


def test_same_seed_same_events_and_another_seed_different() -> None:
    first = list(Workload(seed=9, max_events=2_000, start=START).events())
    assert first == list(Workload(seed=9, max_events=2_000, start=START).events())
    assert first != list(Workload(seed=10, max_events=2_000, start=START).events())
    assert len(first) == 2_000


def test_ids_are_unique_and_seq_counts_up_from_zero_per_run(events: list[BaseModel]) -> None:
    ids = [event_id(e) for e in events]
    assert len(ids) == len(set(ids))
    seqs: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if isinstance(event, TurnEvent):
            seqs[event.run_id].append(event.seq)
    assert len(seqs) > 50
    assert all(seq == list(range(len(seq))) for seq in seqs.values())


def test_events_advance_in_time_from_the_start_at_millisecond_precision(events: list[BaseModel]) -> None:
    times = [getattr(e, "occurred_at", None) or e.requested_at for e in events]  # type: ignore[attr-defined]
    assert times == sorted(times)
    assert times[0] >= START and times[-1] <= START + timedelta(seconds=900)
    assert all(t.microsecond % 1000 == 0 for t in times)


def test_sub_agents_belong_to_their_roots_workflow_and_start_inside_it(events: list[BaseModel]) -> None:
    runs = {e.run_id: e for e in events if isinstance(e, RunEvent) and e.phase == RunPhase.STARTED}
    children = [r for r in runs.values() if r.parent_run_id is not None]
    assert any(runs[c.parent_run_id].parent_run_id for c in children)  # nested sub-agents exist too
    for child in children:
        root = child
        while root.parent_run_id is not None:
            root = runs[root.parent_run_id]
        assert child.workflow_id == root.run_id == root.workflow_id
        # A session of its own, under its parent's (so under its root's): its session memory is its own.
        assert child.tenant_id == root.tenant_id
        assert child.session_id == f"{runs[child.parent_run_id].session_id}/{child.run_id}"
        assert child.session_id.startswith(f"{root.session_id}/")
        if runs[child.parent_run_id].privacy == PrivacyMode.NO_RETENTION:
            assert child.privacy == PrivacyMode.NO_RETENTION
    started = [e.run_id for e in events if isinstance(e, RunEvent) and e.phase == RunPhase.STARTED]
    assert all(started.index(c.parent_run_id) < started.index(c.run_id) for c in children)  # type: ignore[arg-type]


def test_every_tool_result_answers_an_earlier_call_of_its_run(events: list[BaseModel]) -> None:
    calls: set[tuple[str, str | None]] = set()
    results = 0
    for event in events:
        if isinstance(event, TurnEvent) and event.kind == ItemKind.TOOL_CALL:
            calls.add((event.run_id, event.tool_call_id))
        elif isinstance(event, TurnEvent) and event.kind == ItemKind.TOOL_RESULT:
            assert (event.run_id, event.tool_call_id) in calls
            results += 1
    assert results > 100


def test_static_prefix_is_identical_across_a_tenants_runs(events: list[BaseModel]) -> None:
    digests: dict[tuple[str, Slot], set[str | None]] = defaultdict(set)
    for event in events:
        if isinstance(event, TurnEvent) and event.slot in (Slot.SYSTEM, Slot.TOOLS):
            digests[(event.tenant_id, event.slot)].add(event.content_digest)
    assert digests and all(len(found) == 1 for found in digests.values())


def test_token_counts_are_exact_cl100k_counts(events: list[BaseModel]) -> None:
    encoding = tiktoken.get_encoding(TOKENIZER)
    turns = [e for e in events if isinstance(e, TurnEvent)]
    for turn in turns[:: max(1, len(turns) // 300)]:
        assert turn.content is not None and turn.token_count == len(encoding.encode(turn.content))


def test_usage_has_real_providers_warm_caches_and_some_interrupted_streams(events: list[BaseModel]) -> None:
    usage = [e for e in events if isinstance(e, UsageReport)]
    assert {u.provider for u in usage} == {"openai", "anthropic", "google"}
    assert any(not u.complete and u.streamed for u in usage)
    assert sum(u.cached_read_tokens for u in usage) > sum(u.cache_write_tokens for u in usage)
    assert all(u.latency_ms > 0 and u.input_tokens > 0 for u in usage)


def test_one_runaway_tenant_grows_past_its_hard_limit_and_never_finalizes(events: list[BaseModel]) -> None:
    workload = Workload(seed=5, start=START)
    runaway = workload.runaway_tenant
    assert runaway is not None and [t.tenant_id for t in workload.tenants if t.runaway] == [runaway.tenant_id]
    cap = runaway.manifest.total_cap
    loop_run = next(e.run_id for e in events if isinstance(e, TurnEvent) and e.tenant_id == runaway.tenant_id)
    assert not any(isinstance(e, RunEvent) and e.run_id == loop_run and e.phase == RunPhase.FINALIZED
                   for e in events)
    # More traffic means more tokens for the looping run, without end.
    totals = [Workload.ground_truth(itertools.islice(events, n)).run_tokens[(runaway.tenant_id, loop_run)]
              for n in (len(events) // 4, len(events) // 2, len(events))]
    assert totals == sorted(set(totals)) and totals[0] > runaway.manifest.soft_watermark * cap
    assert totals[-1] > 5 * cap
    # Everyone else stays under the soft watermark of every cap.
    truth = Workload.ground_truth(events)
    watermark = {t.tenant_id: t.manifest.soft_watermark * t.manifest.total_cap for t in workload.tenants}
    assert all(tokens < watermark[tenant] for (tenant, run), tokens in truth.run_tokens.items()
               if run != loop_run)


def test_ground_truth_counts_each_event_once() -> None:
    events = list(Workload(seed=2, max_events=500, start=START).events())
    once = Workload.ground_truth(events)
    assert Workload.ground_truth(events + events[::3]) == once
    turns = [e for e in events if isinstance(e, TurnEvent)]
    assert sum(once.tenant_tokens.values()) == sum(t.token_count or 0 for t in turns)
    assert sum(once.slot_tokens.values()) == sum(once.run_tokens.values()) == sum(once.tenant_tokens.values())


def test_no_retention_traffic_carries_no_content_after_the_privacy_step(events: list[BaseModel]) -> None:
    private = [e for e in events if getattr(e, "privacy", None) == PrivacyMode.NO_RETENTION]
    assert any(isinstance(e, TurnEvent) for e in private)
    assert {e.tenant_id for e in private} >= {t.tenant_id for t in Workload(seed=5).tenants if t.no_retention}
    for event in private:
        sent = redact(event)
        assert getattr(sent, "content", None) is None
        if isinstance(event, TurnEvent | MemoryCandidate):
            assert sent.content_digest == content_digest(event.content or "")  # type: ignore[attr-defined]
            assert getattr(sent, "token_count", None) == getattr(event, "token_count", None)
    retained = next(e for e in events if isinstance(e, TurnEvent) and e.privacy == PrivacyMode.RETAINED)
    assert redact(retained) is retained


def test_run_context_numbers_turns_and_never_weakens_privacy_down_the_tree() -> None:
    ids = (f"id-{n}" for n in itertools.count())
    root = RunContext(tenant_id="acme", user_id="u", session_id="s", agent_id="a", model="m",
                      privacy=PrivacyMode.NO_RETENTION, id_factory=lambda: next(ids), clock=lambda: START)
    child = root.child("helper", privacy=PrivacyMode.RETAINED)
    grandchild = child.child("critic")
    assert (child.parent_run_id, child.workflow_id, grandchild.workflow_id) == (root.run_id,) * 3
    assert child.privacy == grandchild.privacy == PrivacyMode.NO_RETENTION
    call = child.tool_call("lookup order")
    result = child.tool_result(call, "order shipped")
    assert (call.seq, result.seq, call.tool_call_id) == (0, 1, result.tool_call_id)
    assert call.content_digest == content_digest("lookup order") and call.role == Role.ASSISTANT
    with pytest.raises(ValueError, match="content"):
        root.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY)


def test_poison_records_are_rejected_for_their_stated_reason() -> None:
    codec = Codec()
    poison = Workload(seed=1, start=START).poison_records(codec)
    assert len({p.expected_reason for p in poison}) == 3
    models = {"turns": TurnEvent, "usage": UsageReport}
    for record in poison:
        with pytest.raises(RejectedRecord) as rejected:
            codec.decode(record.value, models[record.topic.name])
        assert rejected.value.reason_code == record.expected_reason, record.description
