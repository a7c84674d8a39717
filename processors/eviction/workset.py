"""The working-set ledger: every live context item of one run, packed, with what the planner needs to choose.

One :class:`WorkingSet` per run (key ``tenant:run``, the eviction planner's table). Items are fixed-size records
in one ``bytearray`` read through a numpy structured view (:data:`ITEM`), so a run of 40 items costs a few
kilobytes and choosing among them is vectorised; item ids live in one length-prefixed blob, read only when a
decision names them. ``ctxflow bench`` measures the bytes held per live item (goal: at most 160).

What an item records is what an agent knows when it writes it (:mod:`processors.eviction.policy` derives tier
and importance from it): slot, tier, importance, role and kind, the arrival number of the turn that last named
it (recency and LRU count arrivals, not clock time), reference count, flags (pinned, summary, masked, offloaded,
recalled, goal, constraint, in a compression job), summary depth, tool pairing (a tool result names the uid of
the call it answers), four 32-bit hashes of its longest identifiers and numbers (a later turn naming one
references it), up to 40 24-bit hashes of all of them (naming one recalls the item once offloaded), a 64-bit
sign sketch of its embedding when its turn carried one (cosine relevance without the vector; kept beside the
records, as most items carry none), and where its content is on the log (digest and offset in the run's
partition: what a compression job hands the summarizer).

Dedup follows the run ledger's rules (:mod:`processors.ledger`): the ledger skips a record at an offset it
already holds (per stream: turns, summaries, invalidations) and a turn whose seq it accepted, with the same
reorder window.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ctxflow.processors.ledger import accept_seq
from ctxflow.processors.manifest import SLOTS

#: Input streams the ledger keeps an applied offset for.
TURNS, SUMMARIES, INVALIDATIONS = 0, 1, 2
_STREAMS = 3

# Item flags.
PINNED, SUMMARY, MASKED, OFFLOADED, RECALLED, GOAL, CONSTRAINT, IN_JOB = (1 << i for i in range(8))
TERMS = 4
#: Every identifier and number of an item is also kept as a 24-bit hash (up to this many), so that a later turn
#: naming any of them recalls the item once offloaded; 3 bytes each, variable per item. 24 bits, not 16: a run
#: may hold hundreds of offloaded items, and with 16-bit hashes a term would match a stranger's ~0.1% of the time
#: per item, recalling the wrong things.
MAX_SHORT_TERMS = 40
TERM_BYTES = 3
TERM_MASK = (1 << 8 * TERM_BYTES) - 1
#: Summaries of summaries stop here.
MAX_DEPTH = 2

#: An item's ``order`` is its seq shifted by this much, leaving room after the current tail for recalled items
#: (each takes the next order after the tail) before the next turn's.
ORDER_SHIFT = 16

ITEM = np.dtype(
    [
        ("order", "<i8"),  # context position: seq << ORDER_SHIFT for an item; a recalled item goes to the tail
        ("uid", "<u4"),  # stable within the run: what pairs and jobs point at
        ("tokens", "<i4"),  # live tokens (a masked item: its placeholder's)
        ("ref", "<u4"),  # arrival number (uid) of the turn that last named it, or its own when none did
        ("refs", "<u2"),
        ("tier", "u1"),
        ("slot", "u1"),
        ("kind", "u1"),  # ItemKind index | Role index << 4
        ("flags", "u1"),
        ("depth", "u1"),
        ("importance", "u1"),  # 0..255
        ("pair", "<i4"),  # a tool result: uid of its call; -1 otherwise
        ("terms", "<u4", (TERMS,)),
        ("digest", "S32"),
        ("offset", "<i8"),  # in the run's partition of turns (or summaries, for a summary)
    ],
    align=False,
)
_EMPTY = np.zeros(0, dtype=ITEM)
#: :data:`ITEM` as a struct, to pack a new item in one call (numpy's per-field assignment costs ~1 us a field).
ITEM_STRUCT = struct.Struct("<qIiIHBBBBBBi4I32sq")
assert ITEM_STRUCT.size == ITEM.itemsize


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(blob: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = blob[at]
        at += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, at


def _entries(blob: bytes) -> list[tuple[int, int, int, int]]:
    """Per item of ``blob``: (entry start, id end, terms end = entry end) and the id's start, as
    ``(start, id_start, id_end, end)``; the terms are the bytes after the count varint up to ``end``."""
    spans, at = [], 0
    while at < len(blob):
        start = at
        n, at = _read_varint(blob, at)
        id_start, id_end = at, at + n
        count, at = _read_varint(blob, id_end)
        at += TERM_BYTES * count
        spans.append((start, id_start, id_end, at))
    return spans


def _entry(item_id: str, terms: bytes) -> bytes:
    encoded = item_id.encode("utf-8")
    return _varint(len(encoded)) + encoded + _varint(len(terms) // TERM_BYTES) + terms


def short_terms(hashes: Iterable[int], limit: int = MAX_SHORT_TERMS) -> bytes:
    """The 24-bit forms of up to ``limit`` term hashes (distinct, in the given order), as an item's recall set."""
    kept = list(dict.fromkeys(h & TERM_MASK for h in hashes))[:limit]
    return np.asarray(kept, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :TERM_BYTES].tobytes()


def recall_set(terms: bytes) -> set[int]:
    """The term hashes of :func:`short_terms`' bytes."""
    raw = np.frombuffer(terms, dtype=np.uint8).reshape(-1, TERM_BYTES).astype(np.uint32)
    return set((raw[:, 0] | raw[:, 1] << 8 | raw[:, 2] << 16).tolist())


@dataclass(slots=True)
class PreparedSummary:
    """A summary the summarizer prepared for a job, waiting to be swapped in (text kept until then)."""

    summary_id: str
    job_id: str
    slot: int
    text: str
    tokens: int
    source_uids: list[int]
    source_ids: list[str]
    source_digests: list[str]
    summarizer: str
    version: str
    depth: int
    fidelity: float
    partition: int
    offset: int

    def to_list(self) -> list:
        return [self.summary_id, self.job_id, self.slot, self.text, self.tokens, self.source_uids, self.source_ids,
                self.source_digests, self.summarizer, self.version, self.depth, self.fidelity, self.partition,
                self.offset]

    @classmethod
    def from_list(cls, v: list) -> PreparedSummary:
        return cls(*v)


@dataclass(slots=True)
class WorkingSet:
    """One run's live context items and the planner's state about them (see the module docstring).

    Guarantees: items are in context order (``order`` ascending); ``freed[s]`` is the sum of tokens ctxflow's
    decisions took out of slot ``s`` (a recall gives some back), so the budget's live tokens equal the ledger's
    item tokens; :meth:`to_bytes` round-trips exactly.
    """

    items: bytearray = field(default_factory=bytearray)
    #: Per item, in order: varint length and id, then a varint count and that many 24-bit term hashes (3 bytes each).
    ids: bytes = b""
    #: ``(call uid, hash of an issued tool-call id)`` pairs, 8 bytes each: what a later result pairs with.
    calls: bytes = b""
    #: ``(uid, sign sketch)`` of the items whose turn carried an embedding, 12 bytes each (most carry none).
    sketches: bytes = b""
    #: The run's partition (a tenant's records of every input topic share its partition number).
    partition: int = 0
    seq_upto: int = -1
    seq_above: int = 0
    offsets: list[int] = field(default_factory=lambda: [-1] * _STREAMS)
    next_uid: int = 0
    freed: array = field(default_factory=lambda: array("q", bytes(8 * len(SLOTS))))
    #: Tokens per slot of every turn filed (live = added - freed).
    added: array = field(default_factory=lambda: array("q", bytes(8 * len(SLOTS))))
    #: The pending compression job (id), its slot, and the uids it covers.
    job_id: str | None = None
    #: Event time (epoch ms) the pending job was asked for (it is given up after a while unanswered).
    job_ms: int = 0
    job_slot: int = -1
    #: Per slot, the live tokens below which a compression is not worth requesting again (backoff); None until a
    #: compression first backs off (most runs never compress).
    backoff: list[int] | None = None
    prepared: PreparedSummary | None = None
    #: The current query: hashes of what the latest user turn mentions, and its embedding sketch.
    query_terms: bytes = b""  # packed little-endian u4 (ints in a list would cost ~40 bytes each)
    query_sketch: int = 0
    compressions: int = 0
    private: bool = False  # a no_retention run: its content never goes to a summarizer
    #: The run's user and session, as its summaries name them (None until its first summary): what the decisions
    #: and relief of an invalidation name, whose own user is the deleted memory's, not the run's.
    who: tuple[str, str] | None = None

    # ---- items -----------------------------------------------------------------------------------------------
    def view(self) -> np.ndarray:
        """The items as a writable structured array over the ledger's bytes (drop it before resizing)."""
        return np.frombuffer(self.items, dtype=ITEM) if self.items else _EMPTY

    def __len__(self) -> int:
        return len(self.items) // ITEM.itemsize

    def item_ids(self) -> list[str]:
        """Every item's id, in context order."""
        blob = self.ids
        return [blob[a:b].decode("utf-8") for _, a, b, _ in _entries(blob)]

    def _term_bytes(self, index: Sequence[int]) -> list[tuple[int, int]]:
        """Where in :attr:`ids` the recall terms of each item at ``index`` lie: ``(start, end)``."""
        blob, spans, out = self.ids, _entries(self.ids), []
        for i in index:
            _, _, id_end, end = spans[i]
            out.append((_read_varint(blob, id_end)[1], end))
        return out

    def recall_terms(self, index: Sequence[int]) -> list[set[int]]:
        """The 24-bit term hashes of the items at ``index`` (:func:`short_terms`)."""
        return [recall_set(self.ids[at:end]) for at, end in self._term_bytes(index)]

    def terms_held(self, index: Sequence[int], wanted: set[int]) -> list[set[int]]:
        """For each item at ``index``, which of the 24-bit hashes ``wanted`` it holds: ``wanted & recall_terms``,
        without decoding every item's hashes. A hash whose three bytes occur nowhere in the ledger's entries is
        held by no item, so a turn naming nothing offloaded costs one substring search per hash."""
        blob = self.ids
        keys = {k: h for h in wanted if (k := h.to_bytes(TERM_BYTES, "little")) in blob}
        if not keys:
            return [set() for _ in index]
        return [{keys[t] for j in range(at, end, TERM_BYTES) if (t := blob[j:j + TERM_BYTES]) in keys}
                for at, end in self._term_bytes(index)]

    def insert(self, record: np.ndarray | bytes, item_id: str, terms: bytes = b"") -> int:
        """Insert one item record (a 1-element :data:`ITEM` array, or its bytes) at its place by ``order``, with
        its id and recall terms (:func:`short_terms`); returns its index."""
        raw = record if isinstance(record, bytes) else record.tobytes()
        n, size = len(self), ITEM.itemsize
        (order,) = struct.unpack_from("<q", raw)
        last = struct.unpack_from("<q", self.items, (n - 1) * size)[0] if n else 0
        if n == 0 or order >= last:
            at = n
        else:
            view = self.view()
            at = int(np.searchsorted(view["order"], order, side="right"))
            del view
        self.items[at * size:at * size] = raw
        entry = _entry(item_id, terms)
        if at == n:
            self.ids += entry
        else:
            head = _entries(self.ids)[at][0]
            self.ids = self.ids[:head] + entry + self.ids[head:]
        return at

    def entry_of(self, index: int) -> bytes:
        """The raw id-and-terms entry of one item (to move it without decoding)."""
        start, _, _, end = _entries(self.ids)[index]
        return self.ids[start:end]

    def insert_entry(self, record: np.ndarray, entry: bytes) -> None:
        """Insert a record with a raw entry from :meth:`entry_of`."""
        _, id_start, id_end, _ = _entries(entry)[0]
        _, at = _read_varint(entry, id_end)
        self.insert(record, entry[id_start:id_end].decode("utf-8"), entry[at:])

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the items where ``mask`` is true (the others leave the ledger)."""
        if bool(mask.all()):
            return
        blob = self.ids
        self.ids = b"".join(
            blob[start:end] for (start, _, _, end), kept in zip(_entries(blob), mask.tolist(), strict=True) if kept
        )
        self.items = bytearray(self.view()[mask].tobytes())

    def add_call_ids(self, uid: int, hashes: list[int]) -> None:
        """Remember the tool-call ids an item issued (hashed), for pairing later results."""
        self.calls += b"".join(struct.pack("<II", uid, h) for h in hashes)

    def call_of(self, call_hash: int) -> int:
        """The uid of the latest item that issued a tool-call id with this hash, or -1 (ids repeat in real logs:
        a result answers the nearest earlier call that issued its id)."""
        calls = self.calls
        for at in range(len(calls) - 8, -1, -8):
            uid, h = struct.unpack_from("<II", calls, at)
            if h == call_hash:
                return uid
        return -1

    def forget_calls(self, uids: set[int]) -> None:
        """Drop the issued ids and sketches of items that left."""
        if uids and self.calls:
            pairs = [self.calls[at:at + 8] for at in range(0, len(self.calls), 8)]
            self.calls = b"".join(p for p in pairs if struct.unpack_from("<I", p)[0] not in uids)
        if uids and self.sketches:
            kept = [self.sketches[at:at + 12] for at in range(0, len(self.sketches), 12)]
            self.sketches = b"".join(k for k in kept if struct.unpack_from("<I", k)[0] not in uids)

    def sketch_of(self) -> dict[int, int]:
        """Each item's embedding sketch by uid (items without an embedding have none)."""
        return {uid: sk for uid, sk in struct.iter_unpack("<IQ", self.sketches)}

    def context(self) -> list[tuple[str, int, int, int]]:
        """The run's context as the model reads it: ``(item id, flags, slot, tokens)`` of each live item, in order
        (offloaded items are not in it; masked ones are, as their placeholder)."""
        view = self.view()
        flags, slots, tokens = view["flags"].tolist(), view["slot"].tolist(), view["tokens"].tolist()
        return [
            (item_id, f, s, t)
            for item_id, f, s, t in zip(self.item_ids(), flags, slots, tokens, strict=True)
            if not f & OFFLOADED
        ]

    def backoff_of(self, slot: int) -> int:
        """The live tokens of ``slot`` below which no compression is requested again."""
        return self.backoff[slot] if self.backoff is not None else 0

    def back_off(self, slot: int, until: int) -> None:
        """Request no compression of ``slot`` again before it holds ``until`` live tokens."""
        if self.backoff is None:
            self.backoff = [0] * len(SLOTS)
        self.backoff[slot] = until

    @property
    def offloaded(self) -> bool:
        """Whether any item is offloaded (something a later turn could recall)."""
        return bool(self.items) and bool((self.view()["flags"] & OFFLOADED).any())

    def live_tokens(self, slot: int | None = None) -> int:
        """Live tokens of one slot, or of all slots (offloaded items hold none): what turns added minus what
        decisions freed, kept as two counters rather than summed over the items on every call."""
        if slot is None:
            return sum(self.added) - sum(self.freed)
        return self.added[slot] - self.freed[slot]

    # ---- dedup -----------------------------------------------------------------------------------------------
    def accept_seq(self, seq: int) -> bool:
        """Record turn ``seq``; False when it was already accepted (the run ledger's window, same verdicts)."""
        accepted, self.seq_upto, self.seq_above = accept_seq(self.seq_upto, self.seq_above, seq)
        return accepted

    # ---- changelog -------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The changelog form: a JSON header, then the item records, ids and calls."""
        head = json.dumps(
            [self.seq_upto, self.seq_above, self.offsets, self.next_uid, self.freed.tolist(), self.added.tolist(),
             [self.job_id, self.job_ms], self.job_slot, self.backoff,
             self.prepared.to_list() if self.prepared else None,
             self.query_terms.hex(), self.query_sketch, self.compressions, self.private, self.partition,
             len(self.items), len(self.ids), len(self.calls), *([list(self.who)] if self.who else [])],
            separators=(",", ":"),
        ).encode()
        return struct.pack("<I", len(head)) + head + bytes(self.items) + self.ids + self.calls + self.sketches

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkingSet:
        """Inverse of :meth:`to_bytes`."""
        (n,) = struct.unpack_from("<I", data)
        v = json.loads(data[4:4 + n])
        at = 4 + n
        n_items, n_ids, n_calls = v[15], v[16], v[17]
        items, at = bytearray(data[at:at + n_items]), at + n_items
        ids, at = data[at:at + n_ids], at + n_ids
        calls, sketches = data[at:at + n_calls], data[at + n_calls:]
        # Offsets of streams added since the value was written: none applied.
        offsets = v[2] + [-1] * (_STREAMS - len(v[2]))
        return cls(
            items, ids, calls, sketches, v[14], v[0], v[1], offsets, v[3], array("q", v[4]), array("q", v[5]),
            v[6][0], v[6][1], v[7], v[8], PreparedSummary.from_list(v[9]) if v[9] else None, bytes.fromhex(v[10]),
            v[11], v[12], v[13], (sys.intern(v[18][0]), v[18][1]) if len(v) > 18 else None,
        )
