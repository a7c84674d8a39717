"""What the benchmark feeds the worker: encoded records, built before any clock starts.

Three corpora:

- :class:`TurnCorpus`: TurnEvents from the realistic :class:`~streams.demo.workload.Workload` (many tenants on
  every tier, sessions with sub-agents, tool output, retrievals, a runaway tenant), as the SDK sends them
  (redacted for ``no_retention`` runs, with their content features), encoded once. Later slices continue the
  same traffic, so the latency phase sends new events (not replays, which the worker would skip as duplicates).
- :func:`held_runs`: ``runs`` runs of three turns each plus a usage report for every other run, the state
  shape of the sessions-memory measurement (many active runs, few events each).
- :func:`core_traffic`: the same shape as models, for the in-process budget-core measurements.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    AdmissionRequest,
    ItemKind,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
    TurnEvent,
    UsageReport,
    content_digest,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sdk import TOPIC_OF, CtxflowClient, outgoing, record_key
from pydantic import BaseModel

#: Simulated time of the synthetic corpora.
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SYSTEM_PROMPT = "You are a careful assistant. Follow the tenant policy. " * 30
_SLOTS = (Slot.HISTORY, Slot.TOOLS, Slot.RETRIEVED, Slot.HISTORY, Slot.SCRATCHPAD)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One record ready to send: logical topic name, key and Avro bytes."""

    topic: str
    key: bytes
    value: bytes


def encode(codec: Codec, record: BaseModel) -> Encoded:
    """``record`` keyed and encoded as the SDK would publish it."""
    spec = TOPIC_OF[type(record)]
    return Encoded(spec.name, record_key(spec, record), codec.encode(outgoing(record)))


class TurnCorpus:
    """Consecutive slices of one realistic workload's TurnEvents, encoded."""

    def __init__(self, seed: int = 7, tenants: int = 40, sessions_per_tenant: int = 25) -> None:
        self.workload = Workload(seed, tenants=tenants, sessions_per_tenant=sessions_per_tenant)
        self.codec = Codec()
        self._turns: Iterator[BaseModel] = (e for e in self.workload.events() if isinstance(e, TurnEvent))
        self.last: list[TurnEvent] = []

    def manifests(self) -> list[Encoded]:
        """Every tenant's manifest: send these before the turns."""
        return [encode(self.codec, m) for m in self.workload.manifests()]

    def take(self, n: int, progress: Callable[[int], None] | None = None) -> list[Encoded]:
        """The next ``n`` turns, encoded; remembers the models of the last slice in :attr:`last`."""
        out: list[Encoded] = []
        self.last = []
        for turn in itertools.islice(self._turns, n):
            assert isinstance(turn, TurnEvent)
            self.last.append(turn)
            out.append(encode(self.codec, turn))
            if progress is not None and len(out) % 20_000 == 0:
                progress(len(out))
        return out


def admission_for(turn: TurnEvent, request_id: str, at: datetime) -> AdmissionRequest:
    """An admission request for ``turn``'s run: a modest planned context, stamped ``at``."""
    return AdmissionRequest(
        request_id=request_id, tenant_id=turn.tenant_id, user_id=turn.user_id, session_id=turn.session_id,
        run_id=turn.run_id, agent_id=turn.agent_id, model=turn.model,
        planned={Slot.HISTORY: 500, Slot.OUTPUT: 300}, requested_at=at,
    )


def core_traffic(runs: int, per_run: int, tenants: int = 50, first: int = 0) -> list[TurnEvent]:
    """Turns for runs ``first .. first + runs - 1``: seq 0 a static system prompt counted from content, the
    rest with supplied counts.

    Items repeat across runs (same digests), so the token counter's digest cache stays small and the memory
    measured is the runs' own. Copies of validated templates (``model_copy`` skips validation), so building
    a few hundred thousand events stays cheap.
    """
    base = {"user_id": "u1", "session_id": "s1", "agent_id": "planner", "model": "gpt-4o", "occurred_at": NOW,
            "role": Role.USER, "kind": ItemKind.MESSAGE, "item_id": "i0", "event_id": "e0", "tenant_id": "t",
            "run_id": "r", "seq": 0}
    system = TurnEvent(**base, slot=Slot.SYSTEM, content=SYSTEM_PROMPT, content_digest=content_digest(SYSTEM_PROMPT))
    other = TurnEvent(**base, slot=Slot.HISTORY, content_digest="0" * 64, token_count=40)
    events = []
    for seq in range(per_run):
        for r in range(first, first + runs):
            ids = {"tenant_id": f"tenant-{r % tenants}", "run_id": f"run-{r:07d}", "user_id": f"user-{r % 997}",
                   "event_id": f"run-{r:07d}-{seq}", "item_id": f"run-{r:07d}-i{seq}", "seq": seq}
            if seq == 0:
                events.append(system.model_copy(update=ids))
            else:
                ids |= {"slot": _SLOTS[seq % len(_SLOTS)], "token_count": 40 + seq, "content_digest": f"{seq:064x}"}
                events.append(other.model_copy(update=ids))
    return events


def core_usage(runs: int, tenants: int = 50, first: int = 0) -> list[UsageReport]:
    """A usage report for every other run of :func:`core_traffic`."""
    template = UsageReport(event_id="u", tenant_id="t", user_id="u1", session_id="s1", run_id="r",
                           agent_id="planner", call_id="c1", provider="openai", model="gpt-4o", input_tokens=900,
                           output_tokens=100, latency_ms=100, occurred_at=NOW)
    return [template.model_copy(update={"event_id": f"run-{r:07d}-u", "tenant_id": f"tenant-{r % tenants}",
                                        "run_id": f"run-{r:07d}"}) for r in range(first, first + runs, 2)]


def core_manifests(tenants: int = 50) -> list[TenantManifest]:
    """Manifests with caps low enough that many runs cross their watermarks (decisions in the path)."""
    caps = SlotCaps(history=150, tools=120)
    return [TenantManifest(tenant_id=f"tenant-{i}", version=1, tier="free", slot_caps=caps, total_cap=10_000,
                           hard_limit="reject", updated_at=NOW) for i in range(tenants)]


def held_runs(runs: int, first: int = 0) -> list[Encoded]:
    """Encoded :func:`core_traffic` (3 turns per run) and :func:`core_usage` for runs ``first..first+runs``."""
    codec = Codec()
    return [encode(codec, e) for e in (*core_traffic(runs, 3, first=first), *core_usage(runs, first=first))]


async def publish(settings: Settings, records: Sequence[Encoded], progress: Callable[[int], None] | None = None
                  ) -> None:
    """Send ``records`` in order through the SDK producer and wait for every acknowledgement."""
    async with CtxflowClient.from_settings(settings, linger_ms=5, max_in_flight=50_000) as client:
        topics = {name: settings.topic(name) for name in {r.topic for r in records}}
        for index, record in enumerate(records, 1):
            await client.send_raw(topics[record.topic], record.key, record.value)
            if progress is not None and index % 50_000 == 0:
                progress(index)
        await client.flush()


def publish_blocking(settings: Settings, records: Sequence[Encoded], progress: Callable[[int], None] | None = None
                     ) -> None:
    """:func:`publish` from synchronous code."""
    asyncio.run(publish(settings, records, progress))
