"""Budget-core phase, in process and without Kafka: bytes held per active run, and TurnEvents per CPU second.

These were timed unit tests; speed and memory are benchmark figures, so they live here. Both feed
:class:`~processors.budget.BudgetProcessor` directly with :class:`~processors.types.DictBudgetState`, so they
isolate the core from decoding, Faust and the sinks that the end-to-end phases include.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import dataclass

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.streams.bench.corpus import NOW, core_manifests, core_traffic, core_usage


@dataclass(frozen=True, slots=True)
class CoreResult:
    """The budget core's own figures."""

    processor_eps: float
    processor_events: int
    processor_decisions: int
    bytes_per_run: float
    runs: int


def processor_rate(runs: int, per_run: int = 10) -> tuple[float, int, int]:
    """TurnEvents per CPU second through ``process()`` with decisions in the path; (rate, events, decisions)."""
    events = core_traffic(runs, per_run)
    processor = BudgetProcessor(TokenCounter())
    state = DictBudgetState(manifests={m.tenant_id: m for m in core_manifests()})
    processor.process(events[0], Position("turns", 0, 0), state, NOW)  # load the encoding outside the clock
    started = time.process_time()
    decisions = sum(len(processor.process(ev, Position("turns", 0, o), state, NOW)) for o, ev in enumerate(events))
    return len(events) / (time.process_time() - started), len(events), decisions


def bytes_per_run(runs: int) -> float:
    """Python heap bytes (tracemalloc) the core holds per active run: 3 turns each, usage for half."""
    events = core_traffic(runs, 3)
    reports = core_usage(runs)
    processor, state = BudgetProcessor(TokenCounter()), DictBudgetState()
    processor.process(events[0], Position("turns", 0, 0), state, NOW)  # load the encoding outside the count
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, event in enumerate(events):
            processor.process(event, Position("turns", 0, offset), state, NOW)
        for offset, report in enumerate(reports):
            processor.process(report, Position("usage", 0, offset), state, NOW)
        del events, reports
        state.dirty.clear()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    if len(state.runs) != runs:
        raise AssertionError(f"expected {runs} runs in the state, found {len(state.runs)}")
    return held / runs


def measure_core(rate_runs: int, memory_runs: int) -> CoreResult:
    """Both core figures: ``rate_runs`` runs of 10 turns for the rate, ``memory_runs`` runs for memory."""
    rate, events, decisions = processor_rate(rate_runs)
    return CoreResult(rate, events, decisions, bytes_per_run(memory_runs), memory_runs)
