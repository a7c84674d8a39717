"""The eviction demo's runs: text an agent needs again, sessions that outgrow their caps, and a runaway loop.

:class:`StoryScript` is a :class:`~streams.demo.run_script.RunScript` whose text carries what a real agent would
need again (order, customer and invoice ids, file paths, amounts, dates, error codes) from its session's
:class:`CaseFile`, so the eviction planner has identifiers to offload and recall by, and the summarizer has facts
whose survival (a summary's fidelity) it can measure. It plays three kinds of session:

* *ordinary*: the classic shape (a few steps, every slot under 0.6 of its cap) with realistic text;
* *long* (``long=True``): runs of many tool steps, each adding :data:`LONG_FILL` times its history cap, so only the
  planner's relief keeps them within their caps. The demo gives one to each tenant whose strategy needs pressure to
  show (observation masking: large file and log reads; summarization: a long support conversation); their later
  turns name identifiers from earlier in the run;
* the *runaway* loop (``play(runaway=True)``): an order-reconciliation agent that never finishes. Each step it
  looks up the next order or two (one tool call issuing one or two ``tool_call_ids``, then a result per id), piles
  up retrievals of the same policy, notes what it found, and every few steps its user asks about an order from long
  before: what ctxflow offloaded comes back (recall).

Agents apply ctxflow's decisions (the SDK's ``ContextWindow``), so a provider call is billed on the context the agent
still holds. The workload is precomputed and cannot see the planner's choices, so it approximates them by the tier's
relief: a slot past its soft watermark drops to the tier's eviction target (``evict_to``) in what is billed. What a
run *adds* (its turns' token counts, the ground truth) is never approximated: counts are exact ``cl100k`` counts.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctxflow.processors.manifest import manifest_qos
from ctxflow.schemas.models import ItemKind, OverflowBehaviour, Role, Slot
from ctxflow.streams.demo.run_script import _FILL, _WORDS, RunScript, SessionClock, _lexicon
from ctxflow.streams.sdk import RunContext
from pydantic import BaseModel

if TYPE_CHECKING:
    from ctxflow.streams.demo.workload import TenantProfile

__all__ = ["LONG_FILL", "CaseFile", "Order", "StoryScript", "say"]

#: A long run adds this many times its history cap to the history slot before it answers.
LONG_FILL = 2.0
#: Every this many steps the runaway's user asks about an order from at least :data:`_RECALL_BACK` orders before.
_ASK_EVERY = 6
_RECALL_BACK = 12
_CODE_FILES = ("src/billing/ledger.py", "src/billing/refunds.py", "src/orders/sync.py", "src/orders/models.py",
               "src/payments/gateway.py", "src/payments/retry.py", "src/reports/export.py",
               "tests/billing/test_ledger.py", "config/settings.yaml", "migrations/0042_ledger_totals.sql")
_CARRIERS = ("DHL", "UPS", "FedEx", "GLS")


#: Filler without the words that make a text state a constraint or a goal (``must``): what the planner reads as
#: intent should be what the story says, not an accident of random words.
_FILLER = tuple(w for w in _WORDS if w not in ("must", "goal"))


@functools.cache
def _spaced(part: str) -> int:
    return len(_lexicon()[0].encode(" " + part))


def say(rng: random.Random, head: str, facts: Sequence[str] = (), filler: int = 0) -> tuple[str, int]:
    """``head``, then ``facts`` (sentences carrying identifiers and numbers), then ``filler`` random words, with the
    text's exact token count. Parts are joined by single spaces and start with a non-space character, so no
    pre-token spans two parts and the count is the sum of each part's."""
    enc, _, spaced = _lexicon()
    words = rng.choices(_FILLER, k=filler) if filler > 0 else []
    tokens = len(enc.encode(head)) + sum(_spaced(f) for f in facts) + sum(spaced[w] for w in words)
    return " ".join((head, *facts, *words)), tokens


@dataclass(frozen=True, slots=True)
class Order:
    """One order an agent works on; each field is a term the planner and the summarizer see."""

    order_id: str
    customer: str
    total: str
    ledger: str
    paid: str  # a timestamp: a date alone would be shared by many orders, and name none of them in particular
    items: int
    invoice: str


class CaseFile:
    """One session's orders, files and error codes: what its runs look up, and name again later."""

    def __init__(self, rng: random.Random, tenant_id: str) -> None:
        self.rng, self.tenant_id = rng, tenant_id
        self.orders: list[Order] = []
        self._taken: set[str] = set()

    def _unique(self, make: str, low: int, high: int) -> str:
        while (value := make.format(self.rng.randint(low, high))) in self._taken:
            pass
        self._taken.add(value)
        return value

    def _amount(self) -> str:
        return f"${self.rng.randint(12, 4_999):,}.{self.rng.randint(0, 99):02d}"

    def date(self) -> str:
        """A date in the weeks around the workload's start."""
        return f"2025-01-{self.rng.randint(2, 28):02d}" if self.rng.random() < 0.7 else (
            f"2024-12-{self.rng.randint(1, 31):02d}")

    def order(self) -> Order:
        """A new order (remembered for later questions)."""
        rng = self.rng
        order = Order(
            order_id=self._unique("ORD-{}", 10_000, 99_999), customer=self._unique("CUST-{}", 1_000, 9_999),
            total=self._amount(), ledger=self._amount(), items=rng.randint(1, 9),
            paid=f"{self.date()}T{rng.randint(7, 22):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            invoice=f"/srv/{self.tenant_id}/invoices/{self._unique('INV-{}', 10_000, 99_999)}.pdf",
        )
        self.orders.append(order)
        return order

    def earlier(self, back: int) -> Order | None:
        """An order at least ``back`` orders old, or None when there is none yet."""
        if len(self.orders) <= back:
            return None
        return self.orders[self.rng.randrange(len(self.orders) - back)]

    def error(self) -> str:
        return f"E{self.rng.randint(1_000, 1_999)}"

    def path(self) -> str:
        return self.rng.choice(_CODE_FILES)


class StoryScript(RunScript):
    """A run whose turns carry identifiers (see the module docstring); ``long`` makes it outgrow its caps."""

    def __init__(self, rng: random.Random, tenant: TenantProfile, ctx: RunContext, clock: SessionClock,
                 warm: set[str], case: CaseFile, *, code: bool = False, long: bool = False) -> None:
        super().__init__(rng, tenant, ctx, clock, warm)
        self.case, self.code, self.long = case, code, long
        self.window: Counter[Slot] = Counter()  # what the agent still holds (billing), see the module docstring
        manifest = tenant.manifest
        self._relieved = manifest.overflow is OverflowBehaviour.EVICT_AND_COMPRESS
        self._evict_to = manifest_qos(manifest).evict_to
        self._focus: Order | None = None

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def _turn(self, role: Role, kind: ItemKind, slot: Slot, text: tuple[str, int], **kw: object
              ) -> tuple[int, BaseModel]:
        self.window[slot] += text[1]
        cap = getattr(self.t.manifest.slot_caps, slot.value)
        if self._relieved and cap is not None and self.window[slot] >= self.t.manifest.soft_watermark * cap:
            self.window[slot] = int(self._evict_to * cap)
        return super()._turn(role, kind, slot, text, **kw)

    def _prompt_tokens(self) -> int:
        return self.window.total()

    def _fits(self, slot: Slot, tokens: int) -> bool:
        if not self.long:
            return super()._fits(slot, tokens)
        cap = getattr(self.t.manifest.slot_caps, slot.value)
        if slot is Slot.HISTORY:
            return self.used[slot] + tokens <= LONG_FILL * (cap or self.t.manifest.total_cap)
        return (self.window.total() + tokens <= _FILL * self.t.manifest.total_cap
                and (cap is None or self.window[slot] + tokens <= _FILL * cap))

    def _order(self) -> Order:
        """The order this step works on: usually a new one, sometimes the one in focus again."""
        if self._focus is None or self.rng.random() < 0.7:
            self._focus = self.case.order()
        return self._focus

    # ---- what the run says ------------------------------------------------------------------------------------
    def _question(self, depth: int) -> tuple[str, int]:
        rng, o = self.rng, self._order()
        head = "Task:" if depth else "User:"
        if self.code:
            err, path = self.case.error(), self.case.path()
            return say(rng, head, [f"the nightly reconcile job fails with {err} in {path} for {o.order_id};",
                                   "find the cause and fix it without touching the refunds."], rng.randint(5, 40))
        return say(rng, head, [f"please reconcile {o.order_id} for {o.customer}; the invoice says {o.total}",
                               f"but the customer paid on {o.paid}. Never refund twice."], rng.randint(5, 60))

    def _steps(self, depth: int) -> int:
        return 10_000 if self.long and depth == 0 else self.rng.randint(1, 7)

    def _step_weights(self, depth: int) -> tuple[int, int, int]:
        return (10, 1, 0) if self.long and depth == 0 else super()._step_weights(depth)

    def _answer(self) -> tuple[str, int]:
        o = self._order()
        return say(self.rng, "Answer:", [f"{o.order_id} is settled at {o.total}; the ledger entry of {o.ledger}",
                                         f"from {o.paid} is corrected and {o.invoice} reissued."],
                   self.rng.randint(20, 200))

    def _tool_texts(self) -> tuple[tuple[str, int], tuple[str, int], tuple[str, int], bool]:
        rng, o = self.rng, self._order()
        note = say(rng, "Plan:", [], rng.randint(8, 40))
        if self.code:
            tool = rng.choice(("read_file", "read_file", "search_logs", "run_tests"))
            path, err = self.case.path(), self.case.error()
            if tool == "read_file":
                call = say(rng, f'read_file(path="{path}")')
                result = say(rng, f"{path}:", [f"def reconcile(order_id, amount): raises {err} when the ledger",
                                               f"total differs from {o.total} by more than $0.01 (see {o.order_id})."],
                             rng.randint(500, 2_000) if self.long else rng.randint(60, 300))
            elif tool == "search_logs":
                call = say(rng, f'search_logs(query="{err}")')
                lines = [f"[{o.paid[:11]}09:{rng.randint(10, 59)}:{rng.randint(10, 59)}Z] ERROR {err} "
                         f"order={o.order_id} retry {rng.randint(1, 5)}/5 after {rng.randint(50, 900)} ms."
                         for _ in range(rng.randint(2, 5))]
                result = say(rng, "logs:", lines, rng.randint(300, 1_200) if self.long else rng.randint(40, 200))
            else:
                call = say(rng, 'run_tests(path="tests/billing")')
                result = say(rng, "pytest:", [f"{rng.randint(200, 900)} passed, {rng.randint(1, 4)} failed:",
                                              f"test_totals at tests/billing/test_ledger.py:{rng.randint(20, 400)}",
                                              f"expected {o.total} got {o.ledger}."],
                             rng.randint(100, 600) if self.long else rng.randint(30, 150))
            return call, result, note, False
        tool = rng.choice(("lookup_order", "lookup_order", "issue_refund", "schedule_delivery", "export_ledger"))
        if tool == "lookup_order":
            call, result = say(rng, f'lookup_order(order_id="{o.order_id}")'), self._order_result(o)
        elif tool == "issue_refund":
            call = say(rng, f'issue_refund(order_id="{o.order_id}", amount="{o.total}")')
            result = say(rng, "refund:", [f"RF-{rng.randint(10_000, 99_999)} of {o.total} for {o.order_id} queued;",
                                          f"it settles on {self.case.date()}."], rng.randint(20, 120))
        elif tool == "schedule_delivery":
            call = say(rng, f'schedule_delivery(order_id="{o.order_id}")')
            result = say(rng, "delivery:", [f"{o.order_id} booked for {self.case.date()} 14:00-16:00 with",
                                            f"{rng.choice(_CARRIERS)}, {o.items} parcels."], rng.randint(20, 120))
        else:
            call = say(rng, 'export_ledger(month="2025-01")')
            result = say(rng, "export:", [f"{rng.randint(200, 9_000):,} rows written to",
                                          f"/srv/{self.t.tenant_id}/exports/ledger-2025-01.csv."], rng.randint(20, 150))
        return call, result, note, False

    def _order_result(self, o: Order) -> tuple[str, int]:
        rng = self.rng
        return say(rng, f"{o.order_id}:", [f"customer {o.customer}, {o.items} items, total {o.total}, paid at",
                                           f"{o.paid}; the ledger shows {o.ledger}; invoice {o.invoice}."],
                   rng.randint(300, 900) if self.long else rng.randint(30, 250))

    def _chunks(self) -> list[tuple[str, int]]:
        rng = self.rng
        return [say(rng, "policy:", [f"section {rng.randint(1, 12)}.{rng.randint(1, 9)}: refunds over "
                                     f"${rng.randint(1, 20) * 100:,} need a second approval."], rng.randint(50, 200))
                for _ in range(rng.randint(2, 5))]

    def _report(self) -> tuple[str, int]:
        o = self._order()
        return say(self.rng, "Sub-agent summary:", [f"{o.order_id} checked: {o.total} matches {o.invoice}."],
                   self.rng.randint(30, 100))

    def _child(self, ctx: RunContext) -> RunScript:
        return StoryScript(self.rng, self.t, ctx, self.clock, self.warm, self.case, code=self.code)

    # ---- long runs: the agent reports as it goes and its user comes back to earlier findings ----------------------
    def _tool_step(self, depth: int) -> Iterator[tuple[int, BaseModel]]:
        played = yield from super()._tool_step(depth)
        if not (played and self.long and depth == 0):
            return played
        rng, o = self.rng, self._order()
        note = self._finding(o)
        if self._fits(Slot.HISTORY, note[1]):  # said with the next tool call: billed with it
            yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY, note)
        old = self.case.earlier(_RECALL_BACK) if rng.random() < 1 / _ASK_EVERY else None
        if old is not None and self._fits(Slot.HISTORY, 60):
            self.clock.advance(rng, 2_000, 20_000)
            yield self._turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, self._follow_up(old))
        return True

    def _finding(self, o: Order) -> tuple[str, int]:
        rng = self.rng
        return say(rng, f"Step {len(self.case.orders)}:", [f"{o.order_id} totals {o.total} but the ledger shows",
                                                            f"{o.ledger}; we decided to flag it for review."],
                   rng.randint(5, 30))

    def _follow_up(self, old: Order) -> tuple[str, int]:
        return say(self.rng, "User:", [f"what did you find for {old.order_id}? {old.customer} says they paid",
                                       f"{old.total} and were charged {old.ledger}."])

    # ---- the runaway ----------------------------------------------------------------------------------------------
    def _loop_forever(self) -> Iterator[tuple[int, BaseModel]]:
        """See the module docstring: lookups, retrievals, findings, questions about old orders; never an answer."""
        rng, case = self.rng, self.case
        step = 0
        while True:
            step += 1
            self._think()
            note = say(rng, "Plan:", [], rng.randint(8, 16))
            yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.SCRATCHPAD, note, tier_hint=1)
            orders = [case.order() for _ in range(2 if rng.random() < 0.3 else 1)]
            ids = [self.ctx.id_factory() for _ in orders]
            call = say(rng, "; ".join(f'lookup_order(order_id="{o.order_id}")' for o in orders))
            ms, issued = self._turn(Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, call, tool_call_ids=ids)
            yield ms, issued
            yield self._usage(note[1] + call[1])
            self.clock.advance(rng, 100, 1_500)
            for order, call_id in zip(orders, ids, strict=True):
                yield self._turn(Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, self._order_result(order),
                                 tool_call_id=call_id)
            for chunk in self._chunks()[:2]:
                yield self._turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, chunk, tier_hint=3,
                                 relevance=0.5)
            finding = self._finding(orders[-1])
            yield self._turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY, finding)
            yield self._usage(finding[1])
            old = case.earlier(_RECALL_BACK) if step % _ASK_EVERY == 0 else None
            if old is not None:
                self.clock.advance(rng, 1_000, 10_000)
                yield self._turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, self._follow_up(old))
