"""Token tables as values: the run ledger (the authority) and the workflow ledger.

Exactly-once effect on at-least-once delivery, without transactions
-------------------------------------------------------------------
Inputs are three streams (``turns``, ``usage``, ``runs``). All of a tenant's records in one stream lie in one
partition and are processed in offset order; the interleaving *across* streams is arbitrary and may differ
when records are replayed. Two kinds of repeats reach the processor:

(a) duplicates at a new offset (producer retries, SDK resends): same ``(run_id, seq)``, ``call_id`` or run
    phase again;
(b) replays at the same offset after a crash, when some values already hold the record's effect.

The worker persists each batch in this order: decisions, then aggregates (spend and workflow ledgers, static
item counts) and projections, then run ledgers, then the consumer offsets. So after a crash an aggregate may
be *ahead* of a run ledger but never behind it. Three rules follow.

1. *Run ledger first.* A record of stream ``s`` at offset ``o`` is skipped when ``run.offsets[s] >= o``: the
   run ledger holds it, so by the write order every aggregate does too. Otherwise its verdict (new or
   duplicate) is computed from the dedup state inside the run ledger: contiguous seqs plus a bitmap of
   out-of-order seqs above them, 8-byte digests of accepted call ids, phase bits. The verdict depends only on
   which records with the same key came earlier *in the same stream*, so a replay reaches the verdict the live
   run reached, and a duplicate at a new offset is a duplicate both times. Only a new record goes further.
2. *Linear aggregates use offsets.* A usage record adds its own tokens and cost at its own event time to the
   tenant and user spend windows, whatever else happened. An aggregate applies it iff
   ``aggregate.offsets[s] < o`` and then records ``o``: within a partition, "offset at most the applied one"
   means "already applied". Spend windows are order independent (``processors.windows``), so a replay that
   interleaves the streams differently ends with the same windows.
3. *Derived contributions are assigned, not added.* A run's share of its workflow (membership arrives with a
   RunEvent, possibly after the usage) and the estimated top-up of a finalized run (working set versus the
   usage reported so far) depend on several records of the run: a delta computed on replay, in another
   interleaving, can differ from the one originally applied, and no offset says what the aggregate holds.
   So the aggregate stores per run the run's contribution and ``applied`` (how many records the run ledger
   had accepted). After every accepted record the processor compares the run's current contribution with
   the stored one (absent = zero) and, when they differ, assigns it if its ``applied`` is larger than the
   stored count. The run's last accepted record sees the run's final contribution and the largest count, so
   the aggregate ends with exactly that in every interleaving. Transient values during a replay may differ
   (a decision may flap and carry a new id); totals never do. A finalization also advances the spend windows
   to its event time as a linear effect (rule 2), so the windows' retention does not depend on the order in
   which estimates came and went.

The per-tenant count table of static items (``BudgetStore.get_count``) is written with the aggregates, so
after a crash it may hold a count that only a *later* turn established: a replayed digest-only turn that
found nothing the first time would now find it. Each count therefore remembers the ``turns`` offset that
first counted it, and a turn uses only counts from earlier offsets: it sees exactly what it saw the first
time (the count is a pure function of the content, so an earlier content turn always recomputes the same).

Decisions carry ids derived from their source record, so decisions re-emitted by a replay overwrite
themselves downstream. Offsets are compared per stream, not per partition: a tenant keeps its partition as
long as a topic's partition count does not change (changing it needs a state reset, as in any keyed stream
processor). Run ledgers must outlive redelivery: deleting one forgets its dedup state. So a run retires only
in event time, a retention window (``CTXFLOW_RUN_RETENTION_S``, a day by default) after its last event, and a
record that comes later than that window behind its stream is dead-lettered instead of counted: the dedup
guarantee is exact within the window, and a late duplicate after it is refused, never counted twice
(:mod:`processors.retention` has the rule and the argument; ``last_ms`` is what it reads).

Memory: a run ledger is a slots dataclass with two small ``array('q')`` (slot tokens, stream offsets), plain
ints and no per-item collections; ``ctxflow bench`` measures the bytes held per run.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from hashlib import blake2b

from ctxflow.processors.manifest import SLOTS

TURNS, USAGE, RUNS = 0, 1, 2
STREAMS: tuple[str, ...] = ("turns", "usage", "runs")
#: The run ledger also remembers the last ``summaries`` and ``invalidations`` records whose relief it took (not
#: budget streams: the eviction planner applies them, :meth:`processors.budget.BudgetProcessor.relieve`).
SUMMARIES, INVALIDATIONS = 3, 4
#: Streams whose offsets a run ledger keeps (``RunLedger.offsets``).
_OFFSETS = 5

STARTED, FINALIZED, INCOMPLETE, ROOT, CHILD, RUN_MODEL = 1, 2, 4, 8, 16, 32
#: Level bits (2 per gauge) in ``RunLedger.levels``: slots 0..5, then these.
TOTAL_GAUGE, RUN_CAP_GAUGE, SHARE_GAUGE = len(SLOTS), len(SLOTS) + 1, len(SLOTS) + 2
#: Out-of-order window: a seq this far above the contiguous prefix declares the older gaps lost.
MAX_SEQ_GAP = 4096
_DIGEST = 8


def call_digest(call_id: str) -> bytes:
    """The 8-byte digest under which a usage call id is remembered."""
    return blake2b(call_id.encode("utf-8"), digest_size=_DIGEST).digest()


def accept_seq(upto: int, above: int, seq: int) -> tuple[bool, int, int]:
    """The reorder window of a run's seqs: ``upto`` is the end of the contiguous prefix accepted, ``above`` a
    bitmap of accepted seqs after it. Returns whether ``seq`` is new, and the window after it. A seq more than
    :data:`MAX_SEQ_GAP` ahead moves the window on, declaring the seqs it leaves behind lost."""
    d = seq - upto - 1
    if d < 0 or (above >> d) & 1:
        return False, upto, above
    if d >= MAX_SEQ_GAP:
        shift = d - MAX_SEQ_GAP + 1
        above >>= shift
        upto += shift
        d -= shift
    above |= 1 << d
    if above & 1:
        ones = (above ^ (above + 1)).bit_length() - 1
        above >>= ones
        upto += ones
    return True, upto, above


@dataclass(slots=True)
class RunLedger:
    """One run's working set, usage and dedup state (key ``tenant:run``).

    Guarantees: :meth:`accept_seq` and :meth:`accept_call` return True once per seq / call id (within the
    out-of-order window); every count is a non-negative integer; :meth:`to_list` round-trips exactly.
    """

    tokens: array = field(default_factory=lambda: array("q", bytes(8 * len(SLOTS))))
    offsets: array = field(default_factory=lambda: array("q", (-1,) * _OFFSETS))
    levels: int = 0
    seq_upto: int = -1
    seq_above: int = 0
    calls: bytes = b""
    flags: int = 0
    applied: int = 0
    estimated_tokens: int = 0
    reported_tokens: int = 0
    reported_cost: int = 0
    reports: int = 0
    finalized_ms: int = 0
    model: str | None = None
    workflow_id: str | None = None
    #: Event time (epoch ms) of the latest record applied; -1 in a ledger written before retention existed.
    last_ms: int = -1
    #: Tokens per slot that ctxflow's own eviction decisions took out of the working set. Assigned whole from
    #: the eviction planner's ledger (rule 3: a replay in any order ends with the planner's value), never added.
    freed: array = field(default_factory=lambda: array("q", bytes(8 * len(SLOTS))))
    #: Seqs the reorder window declared lost, ``gap_from..gap_to`` (-1, -1: none).
    gap_from: int = -1
    gap_to: int = -1

    def accept_seq(self, seq: int) -> bool:
        """Record turn ``seq``; False when it was already accepted (or is older than the reorder window)."""
        accepted, upto, self.seq_above = accept_seq(self.seq_upto, self.seq_above, seq)
        if accepted and seq - self.seq_upto - 1 >= MAX_SEQ_GAP:
            # The seqs shifted out unaccepted are declared lost: remember the range, so a late one is refused
            # (it cannot be told from a duplicate there) instead of being taken for a duplicate and dropped.
            if self.gap_to < 0:
                self.gap_from = self.seq_upto + 1
            self.gap_to = seq - MAX_SEQ_GAP
        self.seq_upto = upto
        return accepted

    def behind_window(self, seq: int) -> bool:
        """Whether ``seq`` lies in a range the reorder window declared lost (see :meth:`accept_seq`)."""
        return self.gap_from <= seq <= self.gap_to

    def accept_call(self, call_id: str) -> bool:
        """Record usage ``call_id``; False when it was already accepted."""
        digest = call_digest(call_id)
        at = self.calls.find(digest)
        while at != -1:
            if at % _DIGEST == 0:
                return False
            at = self.calls.find(digest, at + 1)
        self.calls += digest
        return True

    def level(self, gauge: int) -> int:
        """The stored level (0 ok, 1 soft, 2 hard) of ``gauge``."""
        return (self.levels >> (2 * gauge)) & 3

    def set_level(self, gauge: int, level: int) -> None:
        """Store the level of ``gauge``."""
        self.levels = (self.levels & ~(3 << (2 * gauge))) | (level << (2 * gauge))

    def set_model(self, model: str | None, from_run_event: bool = False) -> None:
        """Remember the model that prices the run's estimates (interned: shared by all runs of a model).

        A RunEvent's model wins over the turns' model, so the final choice does not depend on how the
        ``runs`` and ``turns`` streams interleave.
        """
        if not model or (self.flags & RUN_MODEL and not from_run_event):
            return
        if from_run_event:
            self.flags |= RUN_MODEL
        if model != self.model:
            self.model = sys.intern(model)

    def place(self, parent_run_id: str | None, workflow_id: str | None) -> None:
        """Remember the run's place in its workflow tree: a root (no parent) or a child of ``workflow_id``."""
        if parent_run_id is None:
            self.flags |= ROOT
        else:
            self.flags |= CHILD
            if workflow_id is not None:
                self.workflow_id = workflow_id

    def workflow(self, run_id: str) -> str | None:
        """The workflow this run belongs to, or None while unknown (a child before its RunEvent)."""
        if self.flags & CHILD:
            return self.workflow_id
        return run_id if self.flags & ROOT else None

    def live(self, slot: int) -> int:
        """Tokens of ``slot`` in the run's context now: counted in, minus what eviction decisions took out."""
        return self.tokens[slot] - self.freed[slot]

    def working_set(self) -> int:
        """Tokens currently in the run's context, all slots."""
        return sum(self.tokens) - sum(self.freed)

    def topup(self) -> int:
        """Estimated tokens beyond reported usage: for a finalized run without complete usage only.

        From every token counted in, not the live working set: an item that eviction later took out was still
        sent to the model at least once, so consumption is at least what entered the context.
        """
        if not self.flags & FINALIZED or (self.reports and not self.flags & INCOMPLETE):
            return 0
        return max(sum(self.tokens) - self.reported_tokens, 0)

    def to_list(self) -> list:
        """A compact JSON-able snapshot for the changelog."""
        return [
            self.tokens.tolist(),
            self.offsets.tolist(),
            self.levels,
            self.seq_upto,
            self.seq_above,
            self.calls.hex(),
            self.flags,
            self.applied,
            self.estimated_tokens,
            self.reported_tokens,
            self.reported_cost,
            self.reports,
            self.finalized_ms,
            self.model,
            self.workflow_id,
            self.last_ms,
            *([self.freed.tolist()] if any(self.freed) or self.gap_to >= 0 else []),
            *([self.gap_from, self.gap_to] if self.gap_to >= 0 else []),
        ]

    @classmethod
    def from_list(cls, v: list) -> RunLedger:
        """Inverse of :meth:`to_list`."""
        return cls(
            array("q", v[0]),
            array("q", v[1] + [-1] * (_OFFSETS - len(v[1]))),  # written before a stream was added: not seen
            v[2],
            v[3],
            v[4],
            bytes.fromhex(v[5]),
            *v[6:13],
            sys.intern(v[13]) if v[13] else None,
            v[14],
            v[15] if len(v) > 15 else -1,
            array("q", v[16]) if len(v) > 16 else array("q", bytes(8 * len(SLOTS))),
            *(v[17:19] if len(v) > 18 else (-1, -1)),
        )


@dataclass(slots=True)
class WorkflowLedger:
    """Consumption of one workflow tree (key ``tenant:workflow``), per run and per agent.

    Guarantees: ``tokens``/``cost`` equal the sum of the per-run entries; an entry only moves to a larger
    ``applied`` count (rule 3 of the module docstring).
    """

    runs: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)
    tokens: int = 0
    cost: int = 0
    level: int = 0

    def assign(self, run_id: str, applied: int, tokens: int, cost: int, agent_id: str) -> bool:
        """Set a run's contribution if ``applied`` is newer than what is stored; True when it changed."""
        entry = self.runs.get(run_id)
        if entry is not None and entry[0] >= applied:
            return False
        old_tokens, old_cost = (entry[1], entry[2]) if entry is not None else (0, 0)
        self.runs[run_id] = (applied, tokens, cost, sys.intern(agent_id))
        self.tokens += tokens - old_tokens
        self.cost += cost - old_cost
        return True

    def by_agent(self) -> dict[str, int]:
        """Tokens consumed per agent id within the workflow."""
        out: dict[str, int] = {}
        for _, tokens, _, agent in self.runs.values():
            out[agent] = out.get(agent, 0) + tokens
        return out

    def to_dict(self) -> dict:
        """A JSON-able snapshot for the changelog."""
        runs = {k: list(v) for k, v in self.runs.items()}
        return {"runs": runs, "tokens": self.tokens, "cost": self.cost, "level": self.level}

    @classmethod
    def from_dict(cls, d: dict) -> WorkflowLedger:
        """Inverse of :meth:`to_dict`."""
        runs = {k: (v[0], v[1], v[2], sys.intern(v[3])) for k, v in d["runs"].items()}
        return cls(runs, d["tokens"], d["cost"], d["level"])
