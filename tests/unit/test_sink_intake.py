"""What the sink does with each record: the workers' verdicts decide their input records, in offset order.

``BodyStore`` is a real, tiny sink: it keeps what it is given, by Avro body or by model, as ``ClickHouseSink``
buffers them (no database here: what is written is the intake's decision, not ClickHouse's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import ConsumerRecord, TopicPartition
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import Decision, DecisionKind, ItemKind, Role, Slot, TurnEvent
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.sink.intake import Route, SinkIntake
from ctxflow.streams.sink.verdict import Verdicts
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

CODEC = Codec()
TURNS, DECISIONS = "t.turns", "t.decisions"
ROUTES = {TURNS: Route(TurnEvent, keyed=True, decided_by_workers=True),
          DECISIONS: Route(Decision, keyed=False, decided_by_workers=False)}


@dataclass
class BodyStore:
    bodies: list[bytes] = field(default_factory=list)
    models: list[BaseModel] = field(default_factory=list)

    def add_avro(self, value: bytes, offset: int) -> bool:
        self.bodies.append(value)
        return True

    def add_encoded(self, record: BaseModel, value: bytes, offset: int) -> None:
        self.models.append(record)

    def add(self, record: BaseModel) -> None:
        self.models.append(record)


def _turn(seq: int) -> bytes:
    run = RunContext(tenant_id="acme", user_id="u", session_id="s", agent_id="a", model="gpt-4o", run_id="r")
    return CODEC.encode(run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"turn {seq}", token_count=1))


def _record(topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None = b"acme"
            ) -> ConsumerRecord:
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, len(key or b""), len(value or b""), [])


def _intake(store: BodyStore) -> SinkIntake:
    return SinkIntake(store, CODEC, ROUTES, Verdicts())  # type: ignore[arg-type]  (BodyStore keeps what it gets)


@settings(max_examples=60, deadline=None)
@given(records=st.integers(1, 30), refused=st.sets(st.integers(0, 29)), steps=st.lists(st.integers(0, 30), max_size=6))
def test_input_records_are_written_in_order_as_the_workers_decided_and_never_covered_while_held(
    records: int, refused: set[int], steps: list[int]
) -> None:
    store = BodyStore()
    intake = _intake(store)
    values = [_turn(i) for i in range(records)]
    for offset in refused:
        intake.verdicts.refuse(TURNS, 0, offset)
    intake.take(_record(TURNS, 0, offset, value) for offset, value in enumerate(values))
    decided = 0
    for step in [*steps, records]:  # the workers' committed offset moves on, maybe backwards in what we learn
        intake.verdicts.decide_below(TURNS, 0, step)
        intake.release()
        decided = max(decided, step)
        placed = min(decided, records)
        assert store.bodies == [v for o, v in enumerate(values[:placed]) if o not in refused]
        assert intake.held == records - placed
        assert intake.pending.get(TopicPartition(TURNS, 0), 0) == placed  # a commit covers only decided records
    assert intake.skipped == len({o for o in refused if o < records})


def test_the_workers_own_records_are_decoded_and_what_does_not_decode_is_skipped() -> None:
    store = BodyStore()
    intake = _intake(store)
    decision = Decision(decision_id="d1", tenant_id="acme", kind=DecisionKind.BUDGET_STATE, reason="soft",
                        decided_at=datetime(2026, 12, 6, tzinfo=UTC))
    intake.take([_record(DECISIONS, 1, 7, CODEC.encode(decision), b"acme:r"),
                 _record(DECISIONS, 1, 8, b"garbage"), _record(DECISIONS, 1, 9, None)])
    assert store.models == [decision] and not store.bodies and intake.held == 0
    assert intake.skipped == 2 and intake.pending == {TopicPartition(DECISIONS, 1): 10}


def test_a_revoked_partition_forgets_what_it_held() -> None:
    intake = _intake(BodyStore())
    intake.take([_record(TURNS, 3, 0, _turn(0))])
    assert intake.held == 1
    intake.forget([TopicPartition(TURNS, 3)])
    assert intake.held == 0 and not intake.pending
