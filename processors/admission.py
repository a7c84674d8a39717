"""The fast admission check: do planned slot sizes fit a run's projected budget state?

The worker projects, per run, the tokens held per slot and the hard limit of each slot and of the total into
Redis (:mod:`sinks.redis`). An agent reads that one value and calls :func:`check_admission` before assembling a
context. The answer is advisory and can lag the stream by one batch; the authoritative answer is the
``admission`` decision the worker publishes for an ``AdmissionRequest``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.models import Slot

TOTAL = "total"


@dataclass(frozen=True, slots=True)
class RunHeadroom:
    """What the projection knows of a run: tokens used and hard limits per slot and in total."""

    used: Mapping[str, int]
    hard_limits: Mapping[str, int]
    manifest_version: int | None = None

    def to_json(self) -> str:
        """The projection's value: ``{"used": {slot: n}, "hard": {slot: n}, "manifest_version": v}``."""
        return json.dumps({"used": self.used, "hard": self.hard_limits, "manifest_version": self.manifest_version},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunHeadroom:
        """Inverse of :meth:`to_json`."""
        value = json.loads(text)
        return cls(value["used"], value["hard"], value.get("manifest_version"))


@dataclass(frozen=True, slots=True)
class AdmissionAnswer:
    """Whether a plan fits, and the reason an agent can show when it does not."""

    admitted: bool
    reason: str
    known_run: bool


def check_admission(headroom: RunHeadroom | None, planned: Mapping[Slot | str, int]) -> AdmissionAnswer:
    """Admit ``planned`` (slot -> tokens) iff every slot and the total stay below their hard limits.

    A run the projection does not know yet is admitted (it has used nothing); its limits are then unknown
    here and the authoritative decision on the decisions topic applies the tenant's manifest.
    """
    if any(tokens < 0 for tokens in planned.values()):
        raise ValueError("planned token counts must be non-negative")
    if headroom is None:
        return AdmissionAnswer(True, "admitted: run has no usage yet", known_run=False)
    total_planned = 0
    for slot, tokens in planned.items():
        name = Slot(slot).value
        total_planned += tokens
        used = headroom.used.get(name, 0) + tokens
        limit = headroom.hard_limits.get(name)
        if limit is not None and used >= limit:
            return AdmissionAnswer(
                False, f"not admitted: slot {name} would reach {used} tokens, hard limit {limit}", known_run=True
            )
    used_total = headroom.used.get(TOTAL, 0) + total_planned
    limit_total = headroom.hard_limits.get(TOTAL)
    if limit_total is not None and used_total >= limit_total:
        return AdmissionAnswer(
            False, f"not admitted: total context would reach {used_total} tokens, hard limit {limit_total}",
            known_run=True,
        )
    return AdmissionAnswer(True, f"admitted: total context would be {used_total} tokens", known_run=True)
