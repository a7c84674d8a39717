"""Long-horizon agent sessions for the quality bench, with the ground truth kept apart from them.

:func:`generate_sessions` returns ``(sessions, truth)``. A session is what ``ctxflow simulate`` reads:
``{"session_id", "messages"}`` in OpenAI chat format, a system prompt first, 60-200 messages. Shapes rotate
``coding, support, research, audit``; each is tool-heavy (parallel calls, verbose JSON, logs, tables, search
results) and some delegate to a sub-agent (tool ``run_subagent``) whose result is a long report.

Fact-bearing items are the goal (index 1, labelled constraints), every tool result and sub-agent report
(2-8 keyed records each: order ids, file paths, ticket ids, amounts, dates, config values), user follow-ups
and assistant decision notes that state a new record. About a quarter of them are referenced later: a user
turn names a record's key (or a goal constraint's label) and asks for a field, or the assistant looks the key
up again with a tool whose short result defers to the earlier output. The step that needs the item is the
first assistant message after that referencing turn, and that message answers with the value. Which items
are referenced is drawn at random, so nothing in an item tells a strategy it will matter.

Tool-call ids are reused in about half the sessions (``call_0`` per message, or a counter that wraps): a
result pairs with the nearest earlier assistant message that issued its id. Every identifier a session
generates is unique within it, so a key named later points at exactly one item.

Guarantees: the same ``(count, seed)`` gives identical output; every truth reference has
``item < referencing turn < step``, its ``step`` is an assistant message, and its ``facts`` occur verbatim
in the item's content.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

SHAPES = ("coding", "support", "research", "audit")
MIN_GAP = 12  # messages between an item and the turn that references it
REFERENCE_P = 0.25  # chance a fact-bearing item (other than the goal) is referenced later

_NAMES = ("ana", "bo", "chen", "dana", "eli", "farah", "gus", "hana", "ivan", "jo", "kofi", "lena", "mika",
          "nour", "omar", "pia", "quinn", "rafa", "sana", "tomas")
_WORDS = ("retry", "ledger", "payment", "cache", "session", "invoice", "router", "tenant", "queue", "shard",
          "export", "billing", "policy", "audit", "search", "token", "window", "report", "batch", "schema")
_VERBS = ("compute", "load", "apply", "flush", "resolve", "merge", "parse", "validate", "render", "emit")


@dataclass(frozen=True, slots=True)
class Record:
    """A fact: ``key`` names it (``None`` for a goal constraint, named by its one field's label)."""

    kind: str
    key: str | None
    fields: tuple[tuple[str, str], ...]


class _Ids:
    """Identifiers unique within one session, so a later turn naming one points at a single item."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def new(self, make: Callable[[random.Random], str]) -> str:
        while (value := make(self.rng)) in self.used:
            pass
        self.used.add(value)
        return value


def _n(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _date(rng: random.Random) -> str:
    return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _amount(rng: random.Random) -> str:
    return f"${rng.randint(12, 48_000):,}.{rng.randint(0, 99):02d}"


def _hex(rng: random.Random, k: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(k))


def _who(rng: random.Random) -> str:
    return f"@{rng.choice(_NAMES)}"


# kind -> (label, key maker, ((field, label, value maker), ...)); every value is verbatim text.
_KINDS: dict[str, tuple[str, Callable, tuple]] = {
    "file": ("file", lambda r: f"src/{r.choice(_WORDS)}/{r.choice(_WORDS)}_{r.choice(_VERBS)}.py", (
        ("line", "line number", lambda r: str(r.randint(100, 2400))),
        ("symbol", "function", lambda r: f"{r.choice(_VERBS)}_{r.choice(_WORDS)}_{_n(r, 2)}"))),
    "config": ("config key", lambda r: f"{r.choice(_WORDS)}.{r.choice(_WORDS)}.{r.choice(('max_attempts', 'timeout_ms', 'pool_size', 'ttl_s', 'batch_max'))}", (  # noqa: E501
        ("value", "value", lambda r: str(r.randint(11, 9_999))),
        ("owner", "owner", _who))),
    "commit": ("commit", lambda r: _hex(r, 10), (("author", "author", _who), ("date", "date", _date))),
    "test": ("test", lambda r: f"tests/test_{r.choice(_WORDS)}.py::test_{r.choice(_VERBS)}_{r.choice(_WORDS)}_{_n(r, 2)}", (  # noqa: E501
        ("duration", "duration", lambda r: f"{r.randint(1, 99)}.{_n(r, 2)}s"),
        ("error", "error code", lambda r: f"E{_n(r, 4)}"))),
    "order": ("order", lambda r: f"ORD-{_n(r, 6)}", (("amount", "amount", _amount), ("placed", "order date", _date))),
    "shipment": ("shipment", lambda r: "1Z" + "".join(r.choice(string.ascii_uppercase + string.digits) for _ in range(14)), (  # noqa: E501
        ("eta", "delivery date", _date), ("weight", "weight", lambda r: f"{r.randint(1, 40)}.{_n(r, 2)} kg"))),
    "customer": ("customer", lambda r: f"CUST-{_n(r, 6)}", (
        ("email", "email", lambda r: f"{r.choice(_NAMES)}.{r.choice(_WORDS)}{_n(r, 3)}@example.com"),
        ("credit", "store credit", _amount))),
    "ticket": ("ticket", lambda r: f"SUP-{_n(r, 5)}", (("opened", "opening date", _date), ("assignee", "assignee", _who))),  # noqa: E501
    "paper": ("paper", lambda r: f"arXiv:{r.randint(18, 24)}{r.randint(1, 12):02d}.{_n(r, 5)}", (
        ("effect", "effect size", lambda r: f"{r.randint(1, 89)}.{r.randint(0, 9)}%"),
        ("sample", "sample size", lambda r: f"n={r.randint(120, 98_000):,}"))),
    "source": ("source", lambda r: f"https://{r.choice(_WORDS)}-{r.choice(('stats', 'review', 'data'))}.org/{r.choice(_WORDS)}-{_n(r, 4)}", (  # noqa: E501
        ("published", "publication date", _date),
        ("figure", "headline figure", lambda r: f"{r.randint(1, 950)}.{r.randint(0, 9)} million"))),
    "dataset": ("dataset", lambda r: f"{r.choice(_WORDS)}-{r.choice(_WORDS)}-v{r.randint(2, 19)}", (
        ("rows", "row count", lambda r: f"{r.randint(10_000, 9_000_000):,}"),
        ("size", "size", lambda r: f"{r.randint(1, 900)}.{r.randint(0, 9)} GB"))),
    "experiment": ("run", lambda r: f"run-{_n(r, 5)}", (
        ("accuracy", "accuracy", lambda r: f"{r.randint(50, 99)}.{_n(r, 2)}%"), ("seed", "seed", lambda r: _n(r, 5)))),
    "txn": ("transaction", lambda r: f"TXN-{_n(r, 8)}", (
        ("amount", "amount", _amount), ("account", "account", lambda r: f"ACCT-{_n(r, 6)}"))),
    "access": ("user", lambda r: f"u-{_n(r, 5)}", (
        ("ip", "source IP", lambda r: f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"),
        ("at", "login time", lambda r: f"{_date(r)}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"))),  # noqa: E501
    "policy": ("policy", lambda r: f"POL-{_n(r, 4)}", (("threshold", "threshold", _amount), ("effective", "effective date", _date))),  # noqa: E501
    "finding": ("finding", lambda r: f"AUD-{_n(r, 5)}", (("owner", "owner", _who), ("due", "due date", _date))),
}
_FIELD_LABELS = {f: lbl for _, _, fields in _KINDS.values() for f, lbl, _ in fields}

# shape -> tools (name, record kind, output format), goal constraints (label, value maker), sub-agent role
_SHAPES: dict[str, dict] = {
    "coding": {
        "task": "Fix the flaky retry behaviour in the payments service and get CI green",
        "tools": (("grep", "file", "search"), ("run_tests", "test", "log"), ("git_log", "commit", "table"),
                  ("read_config", "config", "json")),
        "goal": (("deadline", _date), ("ticket", lambda r: f"ENG-{_n(r, 4)}"),
                 ("coverage floor", lambda r: f"{r.randint(70, 95)}.{r.randint(0, 9)}%"),
                 ("max line length", lambda r: str(r.choice((88, 100, 110, 120)))),
                 ("release branch", lambda r: f"release/2024.{r.randint(1, 12)}.{r.randint(10, 99)}")),
        "subagent": ("code-reviewer", 0.08),
    },
    "support": {
        "task": "Resolve the customer's complaint about a late, partly refunded delivery",
        "tools": (("lookup_order", "order", "json"), ("track_shipment", "shipment", "json"),
                  ("get_customer", "customer", "json"), ("search_tickets", "ticket", "table"),
                  ("read_logs", "order", "log")),
        "goal": (("refund cap", _amount), ("case number", lambda r: f"CASE-{_n(r, 7)}"),
                 ("callback date", _date), ("SLA", lambda r: f"{r.randint(2, 72)} hours"),
                 ("goodwill credit limit", _amount)),
        "subagent": ("billing-specialist", 0.05),
    },
    "research": {
        "task": "Write a sourced brief on the measured effect of context compression on agent accuracy",
        "tools": (("web_search", "source", "search"), ("search_papers", "paper", "search"),
                  ("list_datasets", "dataset", "table"), ("query_results", "experiment", "json")),
        "goal": (("report due", _date), ("word limit", lambda r: f"{r.randint(1, 6)},{r.choice((0, 5))}00 words"),
                 ("cutoff year", lambda r: str(r.randint(2015, 2021))), ("project code", lambda r: f"RSX-{_n(r, 4)}"),
                 ("minimum sources", lambda r: str(r.randint(8, 30)))),
        "subagent": ("literature-researcher", 0.25),
    },
    "audit": {
        "task": "Audit Q3 payouts for unauthorised transfers and policy breaches",
        "tools": (("query_ledger", "txn", "json"), ("read_access_log", "access", "log"),
                  ("list_policies", "policy", "table"), ("list_findings", "finding", "json")),
        "goal": (("materiality threshold", _amount), ("engagement id", lambda r: f"ENG-AUD-{_n(r, 4)}"),
                 ("report due", _date), ("sample size", lambda r: f"n={r.randint(20, 200)}"),
                 ("reviewer", _who)),
        "subagent": ("forensics-agent", 0.2),
    },
}

_QUESTIONS = (
    "Quick check: what was the {f} for {key}? I need the exact value.",
    "Going back to {key} from earlier: remind me of its {f}.",
    "Before we move on, confirm the {f} of {key} as we saw it.",
    "For the write-up I need the {f} we found for {key}.",
    "{key}: which {f} did the earlier output show?",
)
_GOAL_QUESTIONS = ("What was the {f} I gave you at the start?", "Remind me of the {f} from my first message.",
                   "Double-check against my original request: what {f} did I set?")
_CHATTER = ("Continue.", "Ok, keep going.", "Thanks. Next step?", "Looks right, carry on.", "Go ahead.",
            "Fine. What else do you need to check?", "Please continue with the next check.")
_FILLER = (
    "The {w} path was checked against {n} recent entries and nothing unusual showed up.",
    "Latency of the {w} stage stayed within {n} ms across the sampled window.",
    "A secondary {w} index was rebuilt {n} times during the period; the counts agree.",
    "No schema drift was found in the {w} payloads; {n} fields matched the contract.",
    "The {w} backlog drained after {n} seconds once the consumer restarted.",
    "Cross-checking {w} against the upstream export gave {n} matching rows.",
)


def _record(kind: str, ids: _Ids) -> Record:
    _, key, fields = _KINDS[kind]
    return Record(kind, ids.new(key), tuple((f, make(ids.rng)) for f, _, make in fields))


def _filler(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(_FILLER).format(w=rng.choice(_WORDS), n=rng.randint(2, 900)) for _ in range(k))


def _prose(rec: Record) -> str:
    label = _KINDS[rec.kind][0]
    (f1, v1), (f2, v2) = rec.fields
    return f"For {label} {rec.key} the {_FIELD_LABELS[f1]} is {v1} and the {_FIELD_LABELS[f2]} is {v2}."


def _render(fmt: str, tool: str, query: str, recs: list[Record], rng: random.Random) -> str:
    """A verbose tool output holding ``recs`` among noise of the same look."""
    stamp = lambda: f"{_date(rng)}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"  # noqa: E731
    if fmt == "json":
        rows = [{"id": r.key, **dict(r.fields), "region": rng.choice(("eu-west-1", "us-east-2", "ap-south-1")),
                 "updated": stamp(), "etag": _hex(rng, 16), "tags": rng.sample(_WORDS, 3),
                 "version": rng.randint(1, 40)} for r in recs]
        return json.dumps({"tool": tool, "query": query, "count": len(rows), "results": rows,
                           "next_page": _hex(rng, 24), "took_ms": rng.randint(3, 900)}, indent=2)
    if fmt == "log":
        lines = [f"{stamp()} DEBUG {rng.choice(_WORDS)}-svc heartbeat ok latency_ms={rng.randint(1, 400)} "
                 f"queue_depth={rng.randint(0, 90)} gc_pause_ms={rng.randint(0, 40)}"
                 for _ in range(rng.randint(10, 30))]
        for r in recs:
            kv = " ".join(f"{f}={v}" for f, v in r.fields)
            lines.insert(rng.randint(0, len(lines)), f"{stamp()} {rng.choice(('INFO', 'WARN', 'ERROR'))} "
                         f"{rng.choice(_WORDS)}-svc {r.kind}={r.key} {kv} trace={_hex(rng, 12)}")
        return f"$ {tool} --query {query!r} --tail 200\n" + "\n".join(lines)
    if fmt == "table":
        head = ["id", *(f for f, _ in recs[0].fields), "status", "updated"]
        rows = [[r.key, *(v for _, v in r.fields), rng.choice(("open", "closed", "pending", "active")), stamp()]
                for r in recs]
        body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
        return (f"{tool}: {len(rows)} rows for {query!r}\n| " + " | ".join(head) + " |\n|"
                + "---|" * len(head) + "\n" + body + "\n" + _filler(rng, 2))
    hits = [f"{i}. {r.key}\n   {_prose(r)} {_filler(rng, 2)}" for i, r in enumerate(recs, 1)]
    return f"{tool} results for {query!r} ({len(recs)} of {rng.randint(40, 4000)}):\n\n" + "\n\n".join(hits)


@dataclass
class _Builder:
    """One session under construction: messages, call ids, fact items and pending references."""

    sid: str
    shape: str
    rng: random.Random
    target: int
    msgs: list[dict] = field(default_factory=list)
    fact_items: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    refs: list[dict] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self.ids = _Ids(self.rng)
        self.spec = _SHAPES[self.shape]
        self.id_style = self.rng.choice(("fresh", "fresh", "per_message", "wrapping"))

    def add(self, role: str, content: str | None, **extra) -> int:
        self.msgs.append({"role": role, "content": content, **extra})
        return len(self.msgs) - 1

    def call_id(self, k: int) -> str:
        self.calls += 1
        if self.id_style == "per_message":
            return f"call_{k}"
        if self.id_style == "wrapping":
            return f"call_{self.calls % 5}"
        alphabet = string.ascii_letters + string.digits
        return "call_" + self.ids.new(lambda r: "".join(r.choice(alphabet) for _ in range(24)))

    def tool_round(self, calls: list[tuple[str, dict, str]], text: str | None = None) -> list[int]:
        """One assistant message issuing ``calls`` (name, arguments, result) and their results; result indices."""
        ids = [self.call_id(k) for k in range(len(calls))]
        self.add("assistant", text, tool_calls=[
            {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a, _) in zip(ids, calls, strict=True)])
        order = list(range(len(calls)))
        if self.rng.random() < 0.3:
            self.rng.shuffle(order)
        return [self.add("tool", calls[k][2], tool_call_id=ids[k]) for k in order]

    def fact_item(self, index: int, kind: str, recs: list[Record], p: float = REFERENCE_P) -> None:
        self.fact_items.append({"item": index, "kind": kind})
        latest = self.target - 3
        if self.rng.random() < p and index + MIN_GAP <= latest:
            rec = self.rng.choice(recs)
            fields = self.rng.sample(rec.fields, 2 if self.rng.random() < 0.25 and rec.key else 1)
            self.pending.append({"item": index, "item_kind": kind, "record": rec, "fields": fields,
                                 "at": self.rng.randint(index + MIN_GAP, latest)})

    def work_episode(self) -> None:
        rng, spec = self.rng, self.spec
        for _ in range(rng.randint(1, 4)):
            role, p_sub = spec["subagent"]
            if rng.random() < p_sub:
                recs = [_record(rng.choice(spec["tools"])[1], self.ids) for _ in range(rng.randint(3, 6))]
                paras = [f"## Findings\n{_filler(rng, 4)}"] + [f"{_prose(r)} {_filler(rng, 3)}" for r in recs]
                paras.append(f"## Caveats\n{_filler(rng, 5)}")
                report = f"# Report from sub-agent {role}\n\n" + "\n\n".join(paras)
                task = f"Investigate the open questions for: {spec['task'].lower()}. Report identifiers verbatim."
                (j,) = self.tool_round([("run_subagent", {"agent": role, "task": task}, report)],
                                       f"Delegating this part to {role}.")
                self.fact_item(j, "subagent_report", recs)
                continue
            picks = [rng.choice(spec["tools"]) for _ in range(rng.choices((1, 2, 3), (6, 3, 1))[0])]
            batches = []
            for name, kind, fmt in picks:
                recs = [_record(kind, self.ids) for _ in range(rng.randint(2, 8))]
                query = f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}"
                batches.append(((name, {"query": query, "limit": rng.choice((20, 50, 100))},
                                 _render(fmt, name, query, recs, rng)), kind, recs))
            text = rng.choice((None, None, "Let me check that.", "Pulling the next batch of data."))
            results = self.tool_round([b[0] for b in batches], text)
            by_id = {m["tool_call_id"]: k for k, m in zip(results, (self.msgs[r] for r in results), strict=True)}
            for (call, _, recs), tc in zip(batches, self.msgs[results[0] - 1]["tool_calls"], strict=True):
                self.fact_item(by_id[tc["id"]], f"tool_result:{call[0]}", recs)
        if rng.random() < 0.2:
            rec = _record(rng.choice(spec["tools"])[1], self.ids)
            self.fact_item(self.add("assistant", f"Noting a decision for later. {_prose(rec)} {_filler(rng, 1)}"),
                           "assistant_note", [rec])
        else:
            self.add("assistant", f"Checked. {_filler(rng, rng.randint(1, 3))}")

    def user_turn(self) -> None:
        if self.rng.random() < 0.2:
            rec = _record(self.rng.choice(self.spec["tools"])[1], self.ids)
            self.fact_item(self.add("user", f"One more detail to keep in mind: {_prose(rec)}"),
                           "user_followup", [rec])
        else:
            self.add("user", self.rng.choice(_CHATTER))

    def reference(self, ref: dict) -> None:
        rec: Record = ref["record"]
        fields = ref["fields"]
        f = " and ".join(_FIELD_LABELS.get(name, name) for name, _ in fields)
        values = [v for _, v in fields]
        answer = "; ".join(f"{_FIELD_LABELS.get(n, n)} {v}" for n, v in fields)
        if rec.key is None:
            turn = self.add("user", self.rng.choice(_GOAL_QUESTIONS).format(f=f))
            facts, via = values, "user"
        elif self.rng.random() < 0.7:
            turn = self.add("user", self.rng.choice(_QUESTIONS).format(f=f, key=rec.key))
            facts, via = [rec.key, *values], "user"
        else:
            self.add("user", self.rng.choice(_CHATTER))
            note = f"No newer entry for {rec.key}; the earlier output is the latest."
            self.tool_round([(self.rng.choice(self.spec["tools"])[0], {"query": rec.key}, note)],
                            f"Re-checking {rec.key} before using it.")
            turn = len(self.msgs) - 2
            facts, via = [rec.key, *values], "assistant_tool_call"
        step = self.add("assistant", f"{rec.key or 'From your first message'}: {answer}.")
        self.refs.append({"item": ref["item"], "step": step, "facts": facts, "item_kind": ref["item_kind"],
                          "fact_kind": rec.kind, "via": via, "turn": turn})

    def build(self) -> tuple[dict, dict]:
        rng, spec = self.rng, self.spec
        self.add("system", f"You are a {self.shape} agent for tenant t-{_n(rng, 4)}. Use tools; never invent "
                           f"identifiers; quote numbers exactly. Tools: "
                           + ", ".join(sorted({t[0] for t in spec["tools"]} | {"run_subagent"})) + ".")
        goal = [(label, make(rng)) for label, make in rng.sample(spec["goal"], 4)]
        text = f"{spec['task']}.\nConstraints:\n" + "\n".join(f"- {label}: {value}" for label, value in goal)
        self.fact_items.append({"item": self.add("user", text), "kind": "user_goal"})
        for label, value in rng.sample(goal, rng.choices((0, 1, 2), (3, 5, 2))[0]):
            rec = Record("constraint", None, ((label, value),))
            self.pending.append({"item": 1, "item_kind": "user_goal", "record": rec, "fields": [(label, value)],
                                 "at": rng.randint(MIN_GAP, self.target - 3)})
        self.work_episode()
        while len(self.msgs) < self.target or self.pending:
            due = [p for p in self.pending if p["at"] <= len(self.msgs)]
            if due:
                self.pending.remove(due[0])
                self.reference(due[0])
            else:
                self.user_turn()
                self.work_episode()
        truth = {"session_id": self.sid, "shape": self.shape, "fact_items": self.fact_items,
                 "references": sorted(self.refs, key=lambda r: (r["step"], r["item"]))}
        return {"session_id": self.sid, "messages": self.msgs}, truth


def generate_sessions(count: int, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """``count`` sessions (shapes in rotation) and, aligned with them, each session's ground truth.

    Truth: ``{"session_id", "shape", "fact_items": [{"item", "kind"}], "references": [{"item", "step",
    "facts", "item_kind", "fact_kind", "via", "turn"}]}``. Deterministic in ``(count, seed)``; session ``i``
    depends only on ``(seed, i)``, so a smaller run is a prefix of a larger one.
    """
    sessions, truth = [], []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        rng = random.Random(f"ctxflow-quality:{seed}:{i}")
        session, facts = _Builder(f"{shape}-{seed}-{i:04d}", shape, rng, rng.randint(60, 176)).build()
        sessions.append(session)
        truth.append(facts)
    return sessions, truth


def corpus_stats(sessions: list[dict], truth: list[dict]) -> dict:
    """Counts per shape: sessions, messages, tool results, fact-bearing items, references, distractor share."""
    out: dict[str, dict] = {}
    for session, t in zip(sessions, truth, strict=True):
        s = out.setdefault(t["shape"], {"sessions": 0, "messages": 0, "tool_results": 0, "fact_items": 0,
                                        "referenced_items": 0, "references": 0})
        s["sessions"] += 1
        s["messages"] += len(session["messages"])
        s["tool_results"] += sum(m["role"] == "tool" for m in session["messages"])
        s["fact_items"] += len(t["fact_items"])
        s["referenced_items"] += len({r["item"] for r in t["references"]})
        s["references"] += len(t["references"])
    for s in out.values():
        s["distractor_share"] = round(1 - s["referenced_items"] / max(1, s["fact_items"]), 3)
    return out
