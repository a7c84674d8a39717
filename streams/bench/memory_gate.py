"""Candidates per CPU second through the memory gate with secret and PII detection on (issue 15, goal >= 2,000).

``python -m ctxflow.streams.bench.memory_gate [--candidates N]`` builds the gate once (as the worker does), then
times :meth:`MemoryGate.judge` over a seeded mix of candidates shaped like agent output: preferences and facts
with numbers, ids and dates; emails and phone numbers (PII); a few secrets; some multi-line episodes. CPU time
(``time.process_time``) of this process only, so other work on the machine does not count. It also reports the
whole processor (gate, identity, merge, hardening, state) on the same mix. ``ctxflow bench`` runs it as phase (e'').
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from ctxflow.processors.memory.gate import MemoryGate
from ctxflow.processors.memory.policy import MemoryPolicy, RunFacts
from ctxflow.processors.memory.processor import MemoryGateProcessor
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryCandidate, MemoryScope, MemoryType, Verification

START = datetime(2026, 3, 1, tzinfo=UTC)
GOAL_CANDIDATES_PER_CPU_S = 2_000

_TEMPLATES = [
    (MemoryScope.USER, MemoryType.PREFERENCE, "Prefers {lang} answers, {style} tone, dark mode in the editor"),
    (MemoryScope.USER, MemoryType.PREFERENCE, "Drafts release notes as bullet points; max {n} words per item"),
    (MemoryScope.USER, MemoryType.EPISODE, "Ran migration {n} on 2026-01-{d:02d}; rollback took {m} minutes"),
    (MemoryScope.TENANT, MemoryType.FACT, "Ticket OPS-{n} closed; invoice {m} is due in {d} days, total ${n},{m:03d}"),
    (MemoryScope.TENANT, MemoryType.FACT, "Order {n} shipped from warehouse {d} to run r-{m}; 98.{d}% on time"),
    (MemoryScope.USER, MemoryType.PREFERENCE, "Contact me at user{n}@example.com for build failures"),
    (MemoryScope.USER, MemoryType.PREFERENCE, "Call +1 212-555-{m:04d} if the deploy of service {n} fails"),
    (MemoryScope.SESSION, MemoryType.TRACE, "Tool search returned {n} rows\nfiltered to {m}\nkept {d} for the summary"),
    (MemoryScope.USER, MemoryType.PREFERENCE, "Use deploy key AKIAZ3MSJV4WWNKWW5FG for bucket {n}"),
    (MemoryScope.USER, MemoryType.PREFERENCE, "db password = 'Tr0ub4dor&3-{n}'"),
]
_WEIGHTS = [20, 12, 10, 12, 12, 8, 8, 10, 4, 4]


def workload(count: int, seed: int = 7) -> list[MemoryCandidate]:
    """``count`` candidates of the mix above, identical for a given seed."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        scope, type_, template = rng.choices(_TEMPLATES, _WEIGHTS)[0]
        text = template.format(
            lang=rng.choice(["French", "German", "English"]), style=rng.choice(["formal", "casual"]),
            n=rng.randrange(10_000), m=rng.randrange(1000), d=rng.randrange(1, 29),
        )
        out.append(
            MemoryCandidate(
                event_id=f"e-{i}", tenant_id=f"t{i % 50}", user_id=f"u-{i % 400}", session_id=f"s-{i % 900}",
                run_id=f"r-{i}", agent_id="assistant", candidate_id=f"c-{i}", scope=scope, type=type_,
                content=text, content_digest=content_digest(text), confidence=0.9, occurred_at=START,
                verification=Verification.CORROBORATED, corroborating_run_ids=["r-a", "r-b"],
                retention_rule="pii-30d",
            )
        )
    return out


def measure(count: int = 5000) -> dict[str, object]:
    """Gate and processor rates over ``count`` candidates, with the verdict mix (so a rate is never empty work)."""
    cands = workload(count)
    gate = MemoryGate()
    policy = MemoryPolicy(retention_rules=frozenset({"pii-30d"}))
    run = RunFacts()
    gate.judge(cands[0], policy, run, START)  # first call compiles presidio's and pint's lazy parts
    began = time.process_time()
    rules = Counter(gate.judge(c, policy, run, START).rule.value for c in cands)
    gate_cpu = time.process_time() - began
    processor = MemoryGateProcessor(gate, lambda _tenant: policy)
    state = DictBudgetState()
    began = time.process_time()
    for n, c in enumerate(cands):
        processor.process(c, Position("memory.candidates", 0, n), state, START + timedelta(milliseconds=n))
    processor_cpu = time.process_time() - began
    return {
        "candidates": count,
        "gate_candidates_per_cpu_second": round(count / gate_cpu),
        "processor_candidates_per_cpu_second": round(count / processor_cpu),
        "rules": dict(sorted(rules.items())),
    }


def main() -> None:
    """Print :func:`measure` as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5000)
    print(json.dumps(measure(parser.parse_args().candidates), indent=2))


if __name__ == "__main__":
    main()
