"""Eviction phase (e'), in process and without Kafka: the planner's table, its CPU per decision, the summarizer.

Every figure runs on agent-like traffic built here before any clock starts (seeded: two runs see the same
records): a system prompt, the user's goal with its constraints, then rounds of an assistant turn issuing one or
two tool calls (OpenAI-style ``call_`` ids in ``tool_call_ids``), their results (JSON rows or log lines holding
order, ticket and transaction ids, amounts, timestamps, etags) answering those ids, an assistant note naming
what it found, and now and then a user question naming an id seen earlier. Turns carry their content, its
digest and a ``token_count`` (as the SDK sends them), so the token counter is not in the path.

- :func:`table_bytes`: ``runs`` active runs of 40 live items in the worker's planner table. A few dozen runs
  go through :func:`~processors.chain.default_chain` with caps nothing reaches; their working sets are cloned
  through their changelog form (``from_bytes(to_bytes())``, what a worker holds after recovery) into a dict
  keyed ``tenant:run`` until ``runs``, in a fresh interpreter. Its RSS delta (``/proc/self/statm``, after a full
  collection and ``malloc_trim``) per item is the figure (goal: at most 160 bytes); the Python heap per item
  (tracemalloc, on a sample) cross-checks it.
- :func:`planner_cpu`: runs of 1,500-token history caps with turns of 50-300 tokens, tenants on every
  :class:`~schemas.models.EvictionStrategy`. Each ``chain.process`` call is timed in thread CPU time; the calls
  whose outputs hold an eviction decision give p50 and p99. Compression jobs are answered by the extractive
  summarizer outside the clock, and the summaries go back through the chain (timed: the worker applies them).
  The same records through :meth:`BudgetProcessor.process` alone give the budget-only rate beside the chain's.
- :func:`summarizer_rate`: jobs of 10 tool outputs of ~300 tokens each (gpt-4o's encoding), summarized to the
  planner's requested share; source items per process CPU second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import multiprocessing
import os
import random
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain, default_chain
from ctxflow.processors.eviction.planner import EXPECTED_RATIO, TABLE
from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem, SummaryRefused
from ctxflow.processors.eviction.workset import WorkingSet
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.models import (
    CompressionJob,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    ItemKind,
    Role,
    Slot,
    SlotCaps,
    Summary,
    TenantManifest,
    TurnEvent,
    content_digest,
)
from ctxflow.streams.bench.corpus import NOW
from ctxflow.streams.bench.latency import percentile
from ctxflow.streams.summarizer.jobs import summarize_job
from pydantic import BaseModel

MODEL = "gpt-4o"
ITEMS_PER_RUN = 40
GOAL_BYTES_PER_ITEM = 160
EVICTIONS = frozenset((DecisionKind.EVICT, DecisionKind.MASK, DecisionKind.OFFLOAD, DecisionKind.SWAP,
                       DecisionKind.RECALL, DecisionKind.COMPRESS))
_WORDS = ("retry", "ledger", "payment", "cache", "invoice", "router", "queue", "shard", "export", "billing")
_TOOLS = ("lookup_order", "search_logs", "query_ledger", "list_tickets", "read_file")
_FILLER = ("The {w} path looks consistent with the previous run.", "Nothing else changed in the {w} service.",
           "I will compare this with the {w} export next.", "The rest of the output is routine {w} traffic.")


@dataclass(frozen=True, slots=True)
class TableResult:
    """The planner table's memory: RSS and Python heap bytes per live item, changelog bytes per run."""

    runs: int
    items: int
    bytes_per_item: float
    heap_bytes_per_item: float
    changelog_bytes_per_run: float
    breakdown: dict[str, float]


@dataclass(frozen=True, slots=True)
class PlannerResult:
    """Thread CPU per eviction decision (us), and records per CPU second through the chain and the budget alone."""

    records: int
    decisions: int
    by_kind: dict[str, int]
    p50_us: float
    p99_us: float
    #: The same for the records without one (filing the item, noting its references): the planner's floor.
    quiet_p50_us: float
    chain_eps: float
    budget_only_eps: float


@dataclass(frozen=True, slots=True)
class SummarizerResult:
    """The extractive summarizer's source items per process CPU second."""

    jobs: int
    items: int
    tokens_per_item: float
    items_per_cpu_s: float
    fidelity: float


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """The whole phase."""

    table: TableResult
    planner: PlannerResult
    summarizer: SummarizerResult
    seconds: float


# ---- traffic ----------------------------------------------------------------------------------------------------
def _key(rng: random.Random) -> str:
    return rng.choice((f"ORD-{rng.randint(100_000, 999_999)}", f"TXN-{rng.randint(10**7, 10**8 - 1)}",
                       f"SUP-{rng.randint(10_000, 99_999)}", f"CUST-{rng.randint(100_000, 999_999)}",
                       f"src/{rng.choice(_WORDS)}/{rng.choice(_WORDS)}_sync.py"))


def _stamp(rng: random.Random) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}Z"


def _amount(rng: random.Random) -> str:
    return f"${rng.randint(12, 48_000):,}.{rng.randint(0, 99):02d}"


def tool_output(rng: random.Random, tool: str, query: str, chars: int, keys: list[str] | None = None) -> str:
    """Verbose tool output of about ``chars`` characters: JSON rows or log lines with ids, numbers and dates (the
    ids it holds are appended to ``keys``)."""
    found = [query]
    if rng.random() < 0.5:
        rows: list[dict[str, object]] = []
        while sum(len(json.dumps(r)) for r in rows) < chars - 60:
            rows.append({"id": found[-1], "amount": _amount(rng), "updated": _stamp(rng), "status": rng.choice(
                ("open", "settled", "pending")), "region": rng.choice(("eu-west-1", "us-east-2")),
                "etag": f"{rng.getrandbits(64):016x}", "version": rng.randint(1, 40)})
            found.append(_key(rng))
        text = json.dumps({"tool": tool, "count": len(rows), "results": rows, "took_ms": rng.randint(3, 900)})
    else:
        lines = [f"$ {tool} --query {query!r}"]
        while sum(len(x) + 1 for x in lines) < chars:
            lines.append(f"{_stamp(rng)} {rng.choice(('INFO', 'WARN', 'ERROR'))} {rng.choice(_WORDS)}-svc "
                         f"ref={found[-1]} latency_ms={rng.randint(1, 900)} amount={_amount(rng)} "
                         f"trace={rng.getrandbits(48):012x}")
            found.append(_key(rng))
        text = "\n".join(lines)
    if keys is not None:
        keys += found[:-1]
    return text


class AgentRun:
    """One run's turns as an agent sends them (see the module docstring), each of ``sizes`` tokens."""

    def __init__(self, seed: str, tenant: str, run: str, sizes: tuple[int, int]) -> None:
        self.rng, self.tenant, self.run, self.sizes = random.Random(seed), tenant, run, sizes
        self.keys: list[str] = [_key(self.rng)]

    def _pad(self, text: str, chars: int) -> str:
        while len(text) < chars:
            text += " " + self.rng.choice(_FILLER).format(w=self.rng.choice(_WORDS))
        return text

    def _script(self) -> Iterator[tuple[Role, ItemKind, Slot, Callable[[int], str], str | None, list[str]]]:
        rng, keys = self.rng, self.keys
        yield Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, lambda c: self._pad(
            f"You are an operations agent for tenant {self.tenant}. Use tools; quote ids and amounts exactly.", c
        ), None, []
        yield Role.USER, ItemKind.MESSAGE, Slot.HISTORY, lambda c: self._pad(
            f"My goal is to reconcile the March invoices of {keys[0]} before 2025-03-14. You must not refund more "
            f"than {_amount(rng)} in total.", c), None, []
        while True:
            calls = [(rng.choice(_TOOLS), rng.choice(keys), "call_" + f"{rng.getrandbits(96):024x}")
                     for _ in range(rng.choice((1, 1, 2)))]
            text = "\n".join(f'{tool}({{"query": "{key}", "limit": {rng.choice((20, 50))}}})' for tool, key, _ in calls)
            yield Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, lambda c, t=text: self._pad(
                f"Checking the records next.\n{t}", c), calls[0][2], [c for _, _, c in calls]
            for tool, key, call in calls:
                yield Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, (
                    lambda c, tool=tool, key=key: tool_output(rng, tool, key, c, keys)), call, []
            yield Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY, lambda c: self._pad(
                f"{keys[-1]} shows {_amount(rng)} as of {_stamp(rng)}; {keys[-2]} is still open.", c), None, []
            if rng.random() < 0.4:
                yield Role.USER, ItemKind.MESSAGE, Slot.HISTORY, lambda c: self._pad(
                    f"What was the amount on {rng.choice(keys)} again?", c), None, []

    def turns(self, n: int, start_s: float = 0.0) -> list[TurnEvent]:
        """The run's first ``n`` turns."""
        out = []
        for seq, (role, kind, slot, make, answered, issued) in zip(range(n), self._script(), strict=False):
            tokens = self.rng.randint(*self.sizes)
            content = make(tokens * 4)
            out.append(TurnEvent(
                event_id=f"{self.run}-e{seq}", tenant_id=self.tenant, user_id="u-1", session_id=self.run,
                run_id=self.run, agent_id="operator", seq=seq, role=role, kind=kind, slot=slot, item_id=f"i-{seq}",
                content=content, content_digest=content_digest(content), token_count=tokens, model=MODEL,
                occurred_at=NOW + timedelta(seconds=start_s + seq), tool_call_id=answered, tool_call_ids=issued,
            ))
        return out


def _manifest(tenant: str, history: int, strategy: EvictionStrategy) -> TenantManifest:
    return TenantManifest(tenant_id=tenant, version=1, tier="standard", slot_caps=SlotCaps(history=history),
                          total_cap=max(100_000, 2 * history), updated_at=NOW,
                          eviction=EvictionPolicy(strategy=strategy))


def _interleaved(runs: list[list[TurnEvent]]) -> list[TurnEvent]:
    """Every run's turns as a worker reads them: the runs advance together, a turn of each in turn."""
    return [run[seq] for seq in range(max(map(len, runs))) for run in runs if seq < len(run)]


# ---- (1) bytes per live item --------------------------------------------------------------------------------------
def _rss() -> int:
    """This process's RSS after a full collection and glibc handing its free pages back (``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _breakdown(table: dict[str, WorkingSet], key: str) -> dict[str, float]:
    """Where one run's bytes go, per item: fixed records, id-and-terms blob, calls, the other objects (the
    dataclass, its lists, array and large ints), and its key and dict slot."""
    ws = table[key]
    parts = {"records": sys.getsizeof(ws.items), "ids_and_terms": sys.getsizeof(ws.ids),
             "calls": sys.getsizeof(ws.calls) + sys.getsizeof(ws.sketches)}
    objects: list[object] = [ws, ws.offsets, ws.freed, ws.added, ws.query_terms]
    objects += [ws.backoff] if ws.backoff else []
    objects += [x for x in (*ws.offsets, *(ws.backoff or ()), ws.seq_above) if not -5 <= x <= 256]
    parts["objects"] = sum(map(sys.getsizeof, objects))
    parts["key_and_slot"] = sys.getsizeof(key) + sys.getsizeof(table) / len(table)
    return {k: round(v / len(ws), 1) for k, v in parts.items()}


def build_runs(count: int, tenants: int = 8, seed: int = 7) -> list[WorkingSet]:
    """``count`` runs of :data:`ITEMS_PER_RUN` live items each, through the worker's chain (nothing evicted)."""
    manifests = {f"tenant-{i}": _manifest(f"tenant-{i}", 10_000_000, EvictionStrategy.HYBRID) for i in range(tenants)}
    state = DictBudgetState(manifests=manifests)
    chain = default_chain(BudgetProcessor(TokenCounter()))
    runs = [AgentRun(f"table:{seed}:{r}", f"tenant-{r % tenants}", f"run-{r}", (50, 300)).turns(ITEMS_PER_RUN)
            for r in range(count)]
    for offset, turn in enumerate(_interleaved(runs)):
        chain.process(turn, Position("turns", 0, offset), state, NOW)
    sets = [state.get_state(TABLE, run_key(f"tenant-{r % tenants}", f"run-{r}")) for r in range(count)]
    if any(len(ws) != ITEMS_PER_RUN or len(ws.context()) != ITEMS_PER_RUN for ws in sets):
        raise AssertionError(f"every built run should hold {ITEMS_PER_RUN} live items")
    return sets


def _table(blobs: list[bytes], runs: int, tenants: int) -> dict[str, WorkingSet]:
    return {run_key(f"tenant-{i % tenants}", f"run-{i}"): WorkingSet.from_bytes(blobs[i % len(blobs)])
            for i in range(runs)}


def _held_rss(blobs: list[bytes], runs: int, tenants: int) -> int:
    """RSS growth while ``runs`` clones of ``blobs`` fill the table (run in a fresh interpreter)."""
    before = _rss()
    table = _table(blobs, runs, tenants)
    held = _rss() - before
    del table
    return held


def table_bytes(runs: int, built: int = 48, tenants: int = 50) -> TableResult:
    """RSS bytes per live item with ``runs`` runs of 40 items in a dict keyed ``tenant:run`` (module docstring).

    The RSS is read in a fresh interpreter holding only the table: this process reuses the memory its earlier
    work freed (pages already resident), which hid 8% of the table's growth at 10,000 runs.
    """
    blobs = [ws.to_bytes() for ws in build_runs(built)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        held = child.submit(_held_rss, blobs, runs, tenants).result()
    sample = min(runs, 2_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        probe = _table(blobs, sample, tenants)
        heap = (tracemalloc.get_traced_memory()[0] - before) / (sample * ITEMS_PER_RUN)
    finally:
        tracemalloc.stop()
    return TableResult(runs, runs * ITEMS_PER_RUN, held / (runs * ITEMS_PER_RUN), heap,
                       sum(map(len, blobs)) / built, _breakdown(probe, run_key("tenant-0", "run-0")))


# ---- (2) planner CPU per eviction decision ----------------------------------------------------------------------
@dataclass
class _Replay:
    """The chain's records in order, with the texts a summarizer needs."""

    records: list[tuple[BaseModel, Position]] = field(default_factory=list)
    texts: dict[tuple[str, str], str] = field(default_factory=dict)
    summaries: int = 0


def _answer(job: CompressionJob, replay: _Replay, count: Callable[[str], int]) -> Summary | None:
    """The summarizer worker's answer to ``job`` (its sources' texts as the log holds them)."""
    key = run_key(job.tenant_id, job.run_id)
    sources = [SourceItem(s.item_id, replay.texts[key, s.item_id], s.depth, label=s.label or "") for s in job.sources]
    try:
        summary = summarize_job(job, sources, ExtractiveSummarizer(), count, NOW)
    except SummaryRefused:
        return None
    replay.texts[key, summary.summary_id] = summary.text
    return summary


def planner_cpu(runs: int, turns: int = 60, tenants_per_strategy: int = 2, history: int = 1_500) -> PlannerResult:
    """Per-call thread CPU of the chain on runs past their watermarks, every strategy (module docstring)."""
    strategies = list(EvictionStrategy)
    tenants = [f"tenant-{s.value}-{i}" for s in strategies for i in range(tenants_per_strategy)]
    manifests = {t: _manifest(t, history, strategies[i // tenants_per_strategy]) for i, t in enumerate(tenants)}
    events = _interleaved([AgentRun(f"planner:{r}", tenants[r % len(tenants)], f"run-{r}", (50, 300)).turns(turns, r)
                           for r in range(runs)])
    counter = TokenCounter()
    count = lambda text: counter.count(text, MODEL).tokens  # noqa: E731
    _warm(manifests, tenants_per_strategy)
    state, chain = DictBudgetState(manifests=dict(manifests)), default_chain(BudgetProcessor(counter))
    replay = _Replay()
    decided: list[int] = []
    quiet: list[int] = []
    kinds: Counter[str] = Counter()
    chain_ns = 0
    for offset, turn in enumerate(events):
        replay.texts[run_key(turn.tenant_id, turn.run_id), turn.item_id] = turn.content or ""
        pending: list[tuple[BaseModel, Position]] = [(turn, Position("turns", 0, offset))]
        while pending:
            record, pos = pending.pop()
            replay.records.append((record, pos))
            started = time.thread_time_ns()
            out = chain.process(record, pos, state, NOW)
            spent = time.thread_time_ns() - started
            chain_ns += spent
            evictions = [d.kind.value for d in out if isinstance(d, Decision) and d.kind in EVICTIONS]
            if evictions:
                decided.append(spent)
                kinds.update(evictions)
            else:
                quiet.append(spent)
            for job in (o for o in out if isinstance(o, CompressionJob)):
                summary = _answer(job, replay, count)
                if summary is not None:
                    pending.append((summary, Position("summaries", 0, replay.summaries)))
                    replay.summaries += 1
    budget, alone = BudgetProcessor(TokenCounter()), DictBudgetState(manifests=dict(manifests))
    budget_ns = 0
    for record, pos in replay.records:
        started = time.thread_time_ns()
        budget.process(record, pos, alone, NOW)  # type: ignore[arg-type]
        budget_ns += time.thread_time_ns() - started
    decided.sort()
    quiet.sort()
    n = len(replay.records)
    return PlannerResult(n, len(decided), dict(sorted(kinds.items())), percentile(decided, 50) / 1e3,
                         percentile(decided, 99) / 1e3, percentile(quiet, 50) / 1e3, n / (chain_ns / 1e9),
                         n / (budget_ns / 1e9))


def _warm(manifests: dict[str, TenantManifest], per_strategy: int) -> None:
    """A short run of one tenant per strategy through a throwaway chain: imports, compiled patterns and caches
    load outside the clock."""
    state = DictBudgetState(manifests=dict(manifests))
    chain: ProcessorChain = default_chain(BudgetProcessor(TokenCounter()))
    warm = [AgentRun(f"warm:{t}", t, "warm", (50, 300)).turns(30) for t in list(manifests)[::per_strategy]]
    for offset, turn in enumerate(_interleaved(warm)):
        chain.process(turn, Position("turns", 0, offset), state, NOW)


# ---- (3) summarizer items per CPU second ------------------------------------------------------------------------
def summarizer_rate(jobs: int, per_job: int = 10, tokens: int = 300, seed: int = 7) -> SummarizerResult:
    """Source items per process CPU second through :class:`ExtractiveSummarizer` (module docstring)."""
    rng, sizing = random.Random(f"summarizer:{seed}"), TokenCounter()
    size = lambda text: sizing.count(text, MODEL).tokens  # noqa: E731
    probes = [tool_output(rng, rng.choice(_TOOLS), _key(rng), 1_200) for _ in range(20)]
    # An output ends past its length by half a row on average (~80 characters).
    chars = round(tokens * sum(map(len, probes)) / sum(map(size, probes))) - 80
    work = []
    for _ in range(jobs + 1):
        sources = [SourceItem(f"i-{k}", tool_output(rng, tool, _key(rng), chars), role="tool", label=tool)
                   for k, tool in enumerate(rng.choice(_TOOLS) for _ in range(per_job))]
        work.append((sources, max(int(sum(size(s.text) for s in sources) * EXPECTED_RATIO), 16)))
    held = sum(size(s.text) for sources, _ in work[1:] for s in sources)
    counter, summarizer = TokenCounter(), ExtractiveSummarizer()
    count = lambda text: counter.count(text, MODEL).tokens  # noqa: E731
    summarizer.summarize(*work[0], count)  # the encoding and patterns load outside the clock
    started = time.process_time()
    fidelity = sum(summarizer.summarize(sources, budget, count).fidelity for sources, budget in work[1:])
    cpu = time.process_time() - started
    items = jobs * per_job
    return SummarizerResult(jobs, items, held / items, items / cpu, fidelity / jobs)


def measure_eviction(table_runs: int, planner_runs: int, summarizer_jobs: int,
                     say: Callable[[str], None]) -> EvictionResult:
    """All three figures, with a progress line each."""
    began = time.perf_counter()
    table = table_bytes(table_runs)
    say(f"  planner table: {table.bytes_per_item:,.1f} RSS bytes per live item (goal <= {GOAL_BYTES_PER_ITEM}; "
        f"{table.heap_bytes_per_item:,.1f} Python heap) with {table.runs:,} runs of {ITEMS_PER_RUN}; changelog "
        f"{table.changelog_bytes_per_run:,.0f} bytes per run")
    planner = planner_cpu(planner_runs)
    say(f"  planner: p50 {planner.p50_us:,.0f} us, p99 {planner.p99_us:,.0f} us of CPU per record with an eviction "
        f"decision ({planner.decisions:,} of {planner.records:,} records; p50 {planner.quiet_p50_us:,.0f} us for the "
        f"others); chain {planner.chain_eps:,.0f} vs budget alone "
        f"{planner.budget_only_eps:,.0f} records per CPU second")
    summarizer = summarizer_rate(summarizer_jobs)
    say(f"  summarizer: {summarizer.items_per_cpu_s:,.0f} items per CPU second ({summarizer.jobs} jobs of "
        f"{summarizer.items // summarizer.jobs} items of ~{summarizer.tokens_per_item:.0f} tokens)")
    return EvictionResult(table, planner, summarizer, time.perf_counter() - began)
