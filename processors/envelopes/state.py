"""One run's envelope state (key ``tenant:run``, the envelope processor's table), packed for O(1) updates.

Counters are one ``array('q')`` indexed by the constants below; the three stream chains of the integrity hash
are 32 bytes each; ids are interned strings (shared by every run of an agent, model or workflow).
What grows with a run is only what must: 8 bytes per usage call and per memory candidate (their dedup digests,
as in the run ledger), the ids of memories that entered the context (at most :data:`MAX_MEMORY_IDS`), the
canonical forms of turns that arrived ahead of a gap in their seqs (until it closes), and cost lines waiting for the
run's lineage (until its run event or its closure). ``ctxflow bench`` style measurement is in docs/envelopes.md.

Dedup follows the run ledger's rules (:mod:`processors.ledger`): a record at an offset the state already holds
(per stream) is skipped, and a turn seq, call id, run phase or candidate id accepted before is not applied again.
"""

from __future__ import annotations

import json
import sys
from array import array
from dataclasses import dataclass, field

from ctxflow.processors.envelopes.integrity import EMPTY, step
from ctxflow.processors.ledger import accept_seq, call_digest
from ctxflow.schemas.models import EnvelopeStatus

# Counter indexes.
LAYER_TOKENS = 0  # five: global, tenant, user, retrieved, session
STATIC_TOKENS = 5
USAGE_TOKENS = 6  # five: input, output, cached read, cache write, reasoning
REPORTS = 11
RETRIEVALS = 12
TOOL_CALLS = 13
TOOL_RESULTS = 14
EVICTIONS = 15
COMPRESSIONS = 16
FREED = 17
INFERENCE_MICROS = 18  # usage reports' lines
RETRIEVAL_MICROS = 19
TOOLING_MICROS = 20
RETAINED_BYTES = 21  # UTF-8 bytes of content the projections keep
EVENTS = 22
CHANGES = 23  # records that changed the envelope: what its version counts
STARTED_MS = 24
FINALIZED_MS = 25  # the agent's finalization
FIRST_MS = 26
LAST_MS = 27
OFFSETS = 28  # five: turns, usage, runs, memory candidates, summaries
SEQ_UPTO = 33
FLAGS = 34
STATUS = 35  # index in STATUSES
PROMOTIONS = 36  # four: global, tenant, user, session scope
_COUNTERS = 40

# Streams (OFFSETS + stream).
TURNS, USAGE, RUNS, CANDIDATES, SUMMARIES = range(5)

# Flags.
STARTED, FINALIZED, ABANDONED, INCOMPLETE, LINEAGE, RUN_MODEL, PRIVATE, GUESSED = (1 << i for i in range(8))
CLOSED = FINALIZED | ABANDONED

STATUSES: tuple[EnvelopeStatus, ...] = tuple(EnvelopeStatus)
STATUS_INDEX = {status: i for i, status in enumerate(STATUSES)}
#: Memory ids kept per run (the count of retrievals is exact beyond it).
MAX_MEMORY_IDS = 256

_DIGEST = 8
_DUMP = json.JSONEncoder(separators=(",", ":")).encode


def _fresh_counters() -> array:
    n = array("q", bytes(8 * _COUNTERS))
    for i in (STARTED_MS, FINALIZED_MS, FIRST_MS, LAST_MS, SEQ_UPTO, *range(OFFSETS, OFFSETS + 5)):
        n[i] = -1
    return n


def intern_id(value: str | None) -> str | None:
    """An id shared by every run that holds it (ids of agents, models, workflows repeat across runs)."""
    return sys.intern(value) if value else value


@dataclass(slots=True)
class RunState:
    """A run's envelope state. Guarantees: :meth:`to_bytes` round-trips exactly; each ``accept_*`` returns True
    once per seq, call id, phase or candidate id (within the run ledger's reorder window for seqs)."""

    user_id: str
    session_id: str
    agent_id: str
    n: array = field(default_factory=_fresh_counters)
    turns_chain: bytes = EMPTY
    usage_chain: bytes = EMPTY
    runs_chain: bytes = EMPTY
    parent_run_id: str | None = None
    workflow_id: str | None = None
    model: str | None = None
    policy_version: str | None = None
    prefix_hash: str | None = None
    seq_above: int = 0
    calls: bytes = b""
    candidates: bytes = b""
    #: Turns accepted ahead of a gap in their seqs: seq -> canonical form, chained once the gap closes.
    early: dict[int, bytes] | None = None
    memory_ids: list[str] | None = None
    #: Cost lines waiting for the run's lineage (:class:`processors.envelopes.costs.PendingLine` as lists).
    waiting: list[list] | None = None

    @property
    def flags(self) -> int:
        return self.n[FLAGS]

    def flag(self, bits: int) -> None:
        self.n[FLAGS] |= bits

    @property
    def closed(self) -> bool:
        return bool(self.n[FLAGS] & CLOSED)

    def accept_seq(self, seq: int) -> bool:
        """Record turn ``seq``; False when it was accepted before (or is behind the reorder window)."""
        new, self.n[SEQ_UPTO], self.seq_above = accept_seq(self.n[SEQ_UPTO], self.seq_above, seq)
        return new

    def chain_turn(self, seq: int, form: bytes) -> None:
        """Chain accepted turn ``seq`` (its canonical form): now, or once the seqs before it arrived."""
        upto = self.n[SEQ_UPTO]
        if seq == upto and not self.early:  # in order: the common case
            self.turns_chain = step(self.turns_chain, form)
            return
        early = self.early if self.early is not None else {}
        early[seq] = form
        chain = self.turns_chain
        for s in sorted(s for s in early if s <= upto):  # the gap closed, or the window declared it lost
            chain = step(chain, early.pop(s))
        self.turns_chain = chain
        self.early = early or None

    def accept_call(self, call_id: str) -> bool:
        """Remember usage ``call_id``; False when it was accepted before."""
        self.calls, new = _remember(self.calls, call_digest(call_id))
        return new

    def accept_candidate(self, candidate_id: str) -> bool:
        """Remember memory candidate ``candidate_id``; False when it was accepted before."""
        self.candidates, new = _remember(self.candidates, call_digest(candidate_id))
        return new

    def turn_chain(self) -> bytes:
        """The turns chain with the early turns folded in, in seq order (what the run holds now)."""
        chain = self.turns_chain
        for seq in sorted(self.early or ()):
            chain = step(chain, self.early[seq])  # type: ignore[index]
        return chain

    def touch(self, ms: int) -> bool:
        """Note an event stamped ``ms``; True when it is the run's latest."""
        n = self.n
        if n[FIRST_MS] < 0 or ms < n[FIRST_MS]:
            n[FIRST_MS] = ms
        if ms > n[LAST_MS]:
            n[LAST_MS] = ms
            return True
        return False

    def note_memory(self, item_id: str) -> None:
        """Keep the id of a memory that entered the context (the first :data:`MAX_MEMORY_IDS` distinct ones)."""
        ids = self.memory_ids if self.memory_ids is not None else []
        if len(ids) < MAX_MEMORY_IDS and item_id not in ids:
            ids.append(item_id)
        self.memory_ids = ids

    def to_bytes(self) -> bytes:
        """The changelog form: one JSON array."""
        early = [[s, d.hex()] for s, d in sorted(self.early.items())] if self.early else 0
        return _DUMP([
            self.n.tolist(), (self.turns_chain + self.usage_chain + self.runs_chain).hex(), self.user_id,
            self.session_id, self.agent_id, self.parent_run_id,
            self.workflow_id, self.model, self.policy_version, self.prefix_hash, self.seq_above, self.calls.hex(),
            self.candidates.hex(), early, self.memory_ids or 0, self.waiting or 0,
        ]).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RunState:
        """Inverse of :meth:`to_bytes`."""
        v = json.loads(data)
        chains = bytes.fromhex(v[1])
        return cls(
            intern_id(v[2]), intern_id(v[3]), intern_id(v[4]), array("q", v[0]),  # type: ignore[arg-type]
            chains[:32], chains[32:64], chains[64:],
            intern_id(v[5]), intern_id(v[6]), intern_id(v[7]), intern_id(v[8]), v[9], v[10], bytes.fromhex(v[11]),
            bytes.fromhex(v[12]), {s: bytes.fromhex(d) for s, d in v[13]} if v[13] else None, v[14] or None,
            v[15] or None,
        )


def new_state(user_id: str, session_id: str, agent_id: str) -> RunState:
    """An empty run state for a run first seen with these ids."""
    return RunState(sys.intern(user_id), sys.intern(session_id), sys.intern(agent_id))


def _remember(held: bytes, digest: bytes) -> tuple[bytes, bool]:
    at = held.find(digest)
    while at != -1:
        if at % _DIGEST == 0:
            return held, False
        at = held.find(digest, at + 1)
    return held + digest, True
