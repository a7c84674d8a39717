"""What the envelope processor costs, in process and without Kafka: CPU per record, output records, state bytes.

The throughput corpus's workload (:class:`~streams.demo.workload.Workload`: every record type, runs finalizing,
usage reports, tool calls, retrievals, memory candidates) goes through two chains over ``DictBudgetState``: the
budget and planner alone, and the default chain (with envelopes). Thread CPU is measured around each
``process`` call of each chain, and around the envelope processor's own calls in the second; encoding what it
publishes (Avro, as the worker's outlet does) is timed apart, since the shell pays it per output record. The
garbage collector is tuned as the worker tunes it (``streams.runtime.worker``): with Python's defaults, the
records the second chain publishes trigger full collections that the worker never runs, and the difference
between the chains doubled. Run: ``python -m ctxflow.streams.bench.envelopes [events]``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain, default_chain
from ctxflow.processors.envelopes.processor import TABLE, EnvelopeProcessor
from ctxflow.processors.eviction.planner import EvictionPlanner
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import CostLine, RunEnvelope, TenantManifest
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.runtime import gc_policy
from ctxflow.streams.runtime.inputs import INPUT_MODELS
from pydantic import BaseModel

_TOPIC_OF = {model: topic for topic, model in INPUT_MODELS.items()}
_NOW = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class EnvelopeCost:
    """The envelope processor's figures over one workload."""

    records: int
    without_us: float  # chain CPU per record, budget and planner only
    with_us: float  # chain CPU per record, default chain
    processor_us: float  # the envelope processor's own CPU per record
    encode_us: float  # Avro encoding of its outputs, per input record
    envelopes: int
    cost_lines: int
    state_bytes: float  # changelog bytes per run state held at the end


def _run(chain: ProcessorChain, events: list[BaseModel], manifests: list[TenantManifest],
         timed: EnvelopeProcessor | None = None) -> tuple[int, int, list[BaseModel], DictBudgetState]:
    state = DictBudgetState(manifests={m.tenant_id: m for m in manifests})
    offsets: dict[str, int] = {}
    spent, own, out = 0, 0, []
    if timed is not None:
        inner = timed.process

        def process(*args: object, **kw: object) -> list:  # type: ignore[type-arg]
            nonlocal own
            started = time.thread_time_ns()
            result = inner(*args, **kw)  # type: ignore[arg-type]
            own += time.thread_time_ns() - started
            return result

        timed.process = process  # type: ignore[method-assign]
    for event in events:
        topic = _TOPIC_OF[type(event)]
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        started = time.thread_time_ns()
        out += chain.process(event, Position(topic, 0, offset), state, _NOW)
        spent += time.thread_time_ns() - started
    return spent, own, out, state


def measure(events: int = 40_000, seed: int = 11) -> EnvelopeCost:
    """Both chains over the first ``events`` records of a seeded workload (module docstring)."""
    with gc_policy.held():
        return _measure(events, seed)


def _measure(events: int, seed: int) -> EnvelopeCost:
    workload = Workload(seed, tenants=8, sessions_per_tenant=6, max_events=events)
    records = [e for e in workload.events() if type(e) in _TOPIC_OF]
    manifests = workload.manifests()
    _run(default_chain(BudgetProcessor(TokenCounter())), records[:2_000], manifests)  # imports and caches
    budget = BudgetProcessor(TokenCounter())
    without, _, _, _ = _run(ProcessorChain(budget, [EvictionPlanner(budget)]), records, manifests)
    chain = default_chain(BudgetProcessor(TokenCounter()))
    envelopes = chain.processors[-1]
    assert isinstance(envelopes, EnvelopeProcessor)
    spent, own, out, state = _run(chain, records, manifests, envelopes)
    published = [o for o in out if isinstance(o, RunEnvelope | CostLine)]
    codec = Codec()
    started = time.thread_time_ns()
    for record in published:
        codec.encode(record)
    encode = time.thread_time_ns() - started
    held = state.tables.get(TABLE, {})
    n = len(records)
    return EnvelopeCost(
        n, without / n / 1e3, spent / n / 1e3, own / n / 1e3, encode / n / 1e3,
        sum(isinstance(o, RunEnvelope) for o in published), sum(isinstance(o, CostLine) for o in published),
        sum(len(v.to_bytes()) for v in held.values()) / max(len(held), 1),
    )


if __name__ == "__main__":
    result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 40_000)
    print(result)
