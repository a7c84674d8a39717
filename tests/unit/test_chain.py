"""The processor chain's shared rules: a later processor's failure leaves the budget's effects standing."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain, TableSpec
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import BudgetStore, DictBudgetState, Position, run_key
from ctxflow.schemas.models import DecisionKind

from tests.unit.test_budget_factories import NOW, manifest, turn


class Broken:
    name = "broken"
    tables: tuple[TableSpec, ...] = ()

    def process(self, event: Any, pos: Position, state: BudgetStore, now: datetime, earlier: Any) -> list[Any]:
        raise RuntimeError("a bug")

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        pass

    def forget_index(self) -> None:
        pass


def test_a_failing_processor_skips_the_record_and_the_budget_still_counts_it() -> None:
    state = DictBudgetState(manifests={"acme": manifest()})
    chain = ProcessorChain(BudgetProcessor(TokenCounter()), [Broken()])
    out = chain.process(turn(0, 900), Position("turns", 0, 0), state, NOW)
    assert [d.kind for d in out] == [DecisionKind.BUDGET_STATE, DecisionKind.EVICTION_REQUEST]
    assert state.get_run(run_key("acme", "r1")).live(3) == 900  # type: ignore[union-attr]
    ((name, position, error),) = chain.failures
    assert name == "broken" and position.offset == 0 and "a bug" in str(error)
