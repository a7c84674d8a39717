"""Cost of the budget core: bytes held per active run, and TurnEvents per second through ``process()``.

Both numbers are printed (``pytest -s``) and guarded by floors well below what was measured, so a real
regression fails while a busy machine does not.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

from processors.budget import BudgetProcessor
from processors.tokens import TokenCounter
from processors.types import DictBudgetState, Position
from schemas.models import Slot, SlotCaps, TurnEvent, content_digest
from tests.unit.test_budget_factories import NOW, manifest, turn, usage

SYSTEM_PROMPT = "You are a careful assistant. Follow the tenant policy. " * 30
SLOTS = (Slot.HISTORY, Slot.TOOLS, Slot.RETRIEVED, Slot.HISTORY, Slot.SCRATCHPAD)


def traffic(runs: int, per_run: int, tenants: int = 50) -> list[TurnEvent]:
    """Realistic turns: a static system prompt counted from content, the rest with SDK-supplied counts.

    Items repeat across runs (same digests), so the token counter's digest cache (bounded, 65,536 entries)
    stays small and the memory measured is the runs' own.

    Copies of validated templates (``model_copy`` skips validation), so building 300k events stays cheap.
    """
    system = turn(
        0, 0, slot=Slot.SYSTEM, content=SYSTEM_PROMPT, content_digest=content_digest(SYSTEM_PROMPT), token_count=None
    )
    other = turn(1, 40)
    events = []
    for seq in range(per_run):
        for r in range(runs):
            ids = {
                "tenant_id": f"tenant-{r % tenants}",
                "run_id": f"run-{r:07d}",
                "user_id": f"user-{r % 997}",
                "event_id": f"run-{r:07d}-{seq}",
                "seq": seq,
            }
            if seq == 0:
                events.append(system.model_copy(update=ids))
            else:
                ids |= {
                    "slot": SLOTS[seq % len(SLOTS)],
                    "token_count": 40 + seq,
                    "content_digest": f"{seq:064x}",
                }
                events.append(other.model_copy(update=ids))
    return events


def test_bytes_held_per_active_run() -> None:
    runs = 100_000
    events = traffic(runs, 3)
    reports = [usage("c1", 900, 100, tenant=f"tenant-{r % 50}", run=f"run-{r:07d}") for r in range(0, runs, 2)]
    processor, state = BudgetProcessor(TokenCounter()), DictBudgetState()
    processor.process(events[0], Position("turns", 0, 0), state, NOW)  # load the encoding outside the count
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for offset, ev in enumerate(events):
        processor.process(ev, Position("turns", 0, offset), state, NOW)
    for offset, ev in enumerate(reports):
        processor.process(ev, Position("usage", 0, offset), state, NOW)
    del events, reports, ev
    state.dirty.clear()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_run = held / runs
    print(f"\n{runs} active runs (half with usage): {per_run:.0f} bytes/run, {held / 1e6:.1f} MB")
    assert len(state.runs) == runs
    assert per_run < 1200


def test_turn_events_per_second_through_process() -> None:
    events = traffic(20_000, 10)
    processor = BudgetProcessor(TokenCounter())
    caps = SlotCaps(history=150, tools=120)  # low enough that many runs cross their watermarks
    state = DictBudgetState(manifests={f"tenant-{i}": manifest(f"tenant-{i}", slot_caps=caps) for i in range(50)})
    processor.process(events[0], Position("turns", 0, 0), state, NOW)
    started = time.process_time()
    decisions = sum(len(processor.process(ev, Position("turns", 0, o), state, NOW)) for o, ev in enumerate(events))
    rate = len(events) / (time.process_time() - started)
    print(f"\n{len(events)} TurnEvents, {decisions} decisions: {rate:,.0f} events/s (CPU time, one core)")
    assert decisions > 0
    assert rate > 40_000
