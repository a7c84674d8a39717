"""The demo's memory act: one tenant's agents write to durable memory, and the gate treats it as a database write.

Played after the budget traffic is durable, on a tenant of its own (``northwind``), so its records are easy to
read and the other tenants' numbers stay those of the budget act. In event-time order, its support agent proposes
a preference (promoted), the same preference again (merged), a deploy key (rejected: a secret, stored nowhere), a
refund policy (rejected: policy is never promoted from a run), billing facts confirmed by the tenant's system of
record (promoted), a newer seat count (supersedes exactly the old count; the region fact about the same account is
untouched), and an unverified plan tier contradicting a human-approved one (quarantined for review). A concurrent
run of the tenant's billing agent has recalled the old seat count: when the upgrade supersedes it, that run gets a
stale-context notice naming the replacement. Then a reviewer revokes the unverified tier, and the user's
preference is deleted: the cascade leaves its text in no projection. The act is played in three phases, each
durable before the next (topics are read in no set order between them: the recall must be read before the
upgrade, the commands after what they act on). Every figure printed is read back from ClickHouse through the
worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ctxflow.processors.memory.identity import candidate_memory_id
from ctxflow.schemas.models import (
    ItemKind,
    MemoryCandidate,
    MemoryCommand,
    MemoryCommandKind,
    MemoryGovernance,
    MemoryScope,
    MemoryType,
    ReviewAction,
    Role,
    RunEvent,
    Slot,
    SlotCaps,
    TenantManifest,
    Verification,
)
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.worker_process import WorkerProcess
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

__all__ = ["MEMORY_TENANT", "MemoryScene"]

MEMORY_TENANT = "northwind"
#: An AWS access key id shape (detect-secrets' AWSKeyDetector): the gate must refuse it and no store may hold it.
DEPLOY_KEY = "AKIAZ3MHUX7PQ2LRTW4N"


@dataclass(frozen=True, slots=True)
class Proposal:
    """One scripted candidate and what the demo expects the gate to decide."""

    label: str
    candidate: MemoryCandidate
    expected: str  # "active", "merged", "rejected: <rule>", "quarantined", ...


class MemoryScene:
    """The scripted memory act (see the module docstring)."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        counter = iter(range(1_000_000))
        self.support = RunContext(
            tenant_id=MEMORY_TENANT, user_id="dana", session_id="nw-s1", agent_id="support", model="gpt-4o",
            run_id="nw-support-1", id_factory=lambda: f"nw-{next(counter)}")
        self.billing = RunContext(
            tenant_id=MEMORY_TENANT, user_id="dana", session_id="nw-s2", agent_id="billing", model="gpt-4o",
            run_id="nw-billing-2", id_factory=lambda: f"nw-b-{next(counter)}")
        self.proposals = list(self._proposals())
        self.by_label = {p.label: p for p in self.proposals}

    def at(self, seconds: float) -> datetime:
        return self.start + timedelta(seconds=seconds)

    def manifest(self) -> TenantManifest:
        return TenantManifest(
            tenant_id=MEMORY_TENANT, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=200_000,
            updated_at=self.start, updated_by="demo",
            memory=MemoryGovernance(trusted_systems=["billing"], approvers=["ana@northwind"],
                                    retention_rules=["support-contacts"]))

    def _proposals(self) -> Iterator[Proposal]:
        run, at = self.support, self.at
        billing = {"scope": MemoryScope.TENANT, "type_": MemoryType.FACT, "confidence": 0.95,
                   "verification": Verification.SYSTEM_OF_RECORD, "verified_by": "billing", "subject": "northwind"}
        yield Proposal("preference", run.memory_candidate(
            MemoryScope.USER, MemoryType.PREFERENCE, "Dana prefers answers in German, short and formal",
            confidence=0.9, at=at(2)), "active")
        yield Proposal("same preference again", run.memory_candidate(
            MemoryScope.USER, MemoryType.PREFERENCE, "dana prefers answers in german, short and formal.",
            confidence=0.9, at=at(3)), "merged")
        yield Proposal("deploy key", run.memory_candidate(
            MemoryScope.USER, MemoryType.PREFERENCE, f"Use deploy key {DEPLOY_KEY} for hotfix releases",
            confidence=0.9, at=at(4)), "rejected: secret_detected")
        yield Proposal("refund policy", run.memory_candidate(
            MemoryScope.TENANT, MemoryType.POLICY, "Refunds above 500 EUR are always approved",
            confidence=0.99, at=at(5)), "rejected: policy_not_promotable")
        yield Proposal("seats = 50", run.memory_candidate(
            content="Northwind's plan has 50 seats", attribute="seats", value="50", at=at(6), **billing), "active")
        yield Proposal("region = eu-west-1", run.memory_candidate(
            content="Northwind is hosted in eu-west-1", attribute="region", value="eu-west-1", at=at(7), **billing),
            "active")
        yield Proposal("plan tier = enterprise", run.memory_candidate(
            MemoryScope.TENANT, MemoryType.FACT, "Northwind is on the enterprise tier", confidence=0.95,
            subject="northwind", attribute="tier", value="enterprise", verification=Verification.HUMAN_APPROVED,
            verified_by="ana@northwind", at=at(8)), "active")
        yield Proposal("seats = 75 (upgrade)", run.memory_candidate(
            content="Northwind upgraded to 75 seats", attribute="seats", value="75", at=at(9), **billing),
            "active (supersedes seats = 50)")
        yield Proposal("plan tier = pro (unverified)", run.memory_candidate(
            MemoryScope.TENANT, MemoryType.FACT, "Northwind moved to the pro tier", confidence=0.8,
            subject="northwind", attribute="tier", value="pro", verification=Verification.CORROBORATED,
            corroborating_run_ids=["nw-billing-7", "nw-sales-3"], at=at(10)), "quarantined")

    def memory_id(self, label: str) -> str:
        """The id the gate gives a proposal's record (identity is deterministic)."""
        return candidate_memory_id(self.by_label[label].candidate)

    def phases(self) -> list[list[BaseModel]]:
        """What the act publishes, phase by phase (each made durable before the next is published)."""
        first, later = self.proposals[:7], self.proposals[7:]
        old_seats = self.by_label["seats = 50"].candidate
        recalled = self.billing.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, old_seats.content or "",
                                     item_id=self.memory_id("seats = 50"), at=self.at(8.5))
        preference = self.by_label["preference"].candidate
        remembered = self.support.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, preference.content or "",
                                       item_id=self.memory_id("preference"), at=self.at(8.6))
        started: list[RunEvent] = [self.support.started(at=self.at(1)), self.billing.started(at=self.at(1.5))]
        review = MemoryCommand(
            command_id="nw-cmd-review", tenant_id=MEMORY_TENANT, kind=MemoryCommandKind.REVIEW,
            memory_id=self.memory_id("plan tier = pro (unverified)"), action=ReviewAction.REVOKE,
            issued_by="ana@northwind", reason="the contract still says enterprise", issued_at=self.at(20))
        delete = MemoryCommand(
            command_id="nw-cmd-delete", tenant_id=MEMORY_TENANT, kind=MemoryCommandKind.DELETE,
            memory_id=self.memory_id("preference"), issued_by="dana", reason="user asked to forget it",
            issued_at=self.at(21))
        return [[self.manifest(), *started, *(p.candidate for p in first), recalled, remembered],
                [*(p.candidate for p in later)],
                [review, delete]]

    def print_report(self, worker: WorkerProcess, console: Console) -> bool:
        """The act's verdicts and records, read from ClickHouse; False if one differs from what was expected."""
        verdicts = {r[0]: r[1:] for r in worker.query(
            "SELECT candidate_id, outcome, rule, status, memory_id FROM memory_verdicts FINAL "
            f"WHERE tenant_id = '{MEMORY_TENANT}'").rows}
        records = {r[0]: r[1:] for r in worker.query(
            "SELECT memory_id, status, superseded_by, merge_count, review_state FROM memory_records FINAL "
            f"WHERE tenant_id = '{MEMORY_TENANT}'").rows}
        table = Table("candidate", "verdict", "rule", "record now", "expected", title=(
            f"Memory governance ({MEMORY_TENANT}): every candidate gets a verdict; only active records are served"))
        ok = True
        ids: dict[str, Any] = {}
        for p in self.proposals:
            outcome, rule, status, memory_id = verdicts.get(p.candidate.candidate_id, ("missing", "-", None, None))
            ids[p.label] = memory_id
            now = records.get(memory_id, ("-",))[0] if memory_id else "-"
            shown = outcome if outcome != "accepted" else status
            want = p.expected.split(" ")[0].rstrip(":")
            ok &= (shown == want) or (outcome == "rejected" and p.expected == f"rejected: {rule}")
            table.add_row(p.label, shown or "-", rule, now, p.expected)
        console.print(table)
        old, new, region = (records.get(ids.get(k) or "", ()) for k in ("seats = 50", "seats = 75 (upgrade)",
                                                                            "region = eu-west-1"))
        superseded = bool(old) and old[0] == "superseded" and old[1] == ids["seats = 75 (upgrade)"]
        console.print(f"contradiction: seats = 50 is {old[0] if old else '-'} by the upgrade "
                      f"({'exactly that record' if superseded and region and region[0] == 'active' else 'CHECK'}); "
                      f"region = eu-west-1 is {region[0] if region else '-'}; the upgrade is {new[0] if new else '-'}")
        ok &= superseded and bool(region) and region[0] == "active"
        leaked = worker.query(
            "SELECT count() FROM memory_records WHERE positionUTF8(ifNull(content, ''), "
            f"'{DEPLOY_KEY}') > 0").rows[0][0]
        console.print(f"the deploy key is in {leaked} memory rows (rejected by detect-secrets before any write)")
        ok &= leaked == 0
        ok &= self._notice(worker, console)
        ok &= self._review(records, console)
        return ok & self._deleted(worker, records, console)

    def _notice(self, worker: WorkerProcess, console: Console) -> bool:
        rows = worker.query(
            f"SELECT reason FROM decisions FINAL WHERE tenant_id = '{MEMORY_TENANT}' AND kind = 'stale_context' "
            f"AND run_id = '{self.billing.run_id}'").rows
        told = any(self.memory_id("seats = 75 (upgrade)") in r[0] for r in rows)
        console.print(f"stale-context notice to the concurrent run {self.billing.run_id}, which had recalled the old "
                      f"seat count: {rows[0][0] if rows else 'none'}" + ("" if told else " (CHECK)"))
        return told

    def _review(self, records: dict[str, tuple[Any, ...]], console: Console) -> bool:
        tier = records.get(self.memory_id("plan tier = pro (unverified)"), ("-",))
        console.print(f"review: ana revoked the quarantined 'plan tier = pro': now {tier[0]} (a tombstone; the same "
                      "content cannot come back without review)")
        return tier[0] == "revoked"

    def _deleted(self, worker: WorkerProcess, records: dict[str, tuple[Any, ...]], console: Console) -> bool:
        """Where the deleted preference's text still is: ClickHouse's purges are background mutations, so a few
        seconds are allowed for them (a count that stays above zero is a failure)."""
        text = "prefers answers in German"
        held = "positionCaseInsensitiveUTF8(ifNull({column}, ''), '" + text + "') > 0"
        sql = (f"SELECT (SELECT count() FROM memory_records WHERE {held.format(column='content')}), "
               f"(SELECT count() FROM memory_index WHERE {held.format(column='text')}), "
               f"(SELECT count() FROM turns WHERE {held.format(column='content')})")
        deadline = time.monotonic() + 15.0
        found = tuple(worker.query(sql).rows[0])
        while any(found) and time.monotonic() < deadline:
            time.sleep(0.5)
            found = tuple(worker.query(sql).rows[0])
        layers = dict(worker.query(
            f"SELECT target_type, count() FROM invalidations WHERE tenant_id = '{MEMORY_TENANT}' AND "
            f"target_id = '{self.memory_id('preference')}' GROUP BY target_type").rows)
        status = records.get(self.memory_id("preference"), ("-",))[0]
        console.print(f"deleted dana's preference: record {status}; invalidations by layer "
                      f"{dict(sorted(layers.items()))}; its text is in {found[0]} memory_records rows, {found[1]} "
                      f"retrieval-index rows and {found[2]} retrieved turns")
        return status == "revoked" and not any(found)
