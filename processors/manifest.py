"""Manifest resolution: the effective budget of one user, tier QoS, thresholds and validation.

Precedence, field by field: a user override field (when non-null) > the tenant manifest field > the built-in
default. The built-in default applies only to a tenant without a manifest (a null field in a tenant's
manifest means "no cap", as the contract says). The default budget is sized for a 128k-token model and only
*observes*: its hard-limit behaviour is ``flag``, so a tenant nobody configured is never rejected.

========  ==========================  ==========================
Default   value                       why
========  ==========================  ==========================
tier      ``standard``                middle QoS row
slots     system 8k, tools 8k,        a 128k window split by
          retrieved 32k, history 64k, typical agent usage
          scratchpad 16k, output 8k
total     128,000                     common context window
others    watermark 0.85, evict_and_compress, hard_limit flag, no spend windows, no run/workflow caps
========  ==========================  ==========================

Tier QoS (:data:`TIER_QOS`) makes context budgets softer for higher tiers in two ways. ``grace`` moves the
hard limit above the cap (hard at ``cap * grace``): an enterprise run may burst 15% over its slot cap before
it is rejected, a free run not at all. ``evict_to`` is the eviction target as a fraction of the cap: a free
tenant's eviction request asks to come down to 60% of the cap, an enterprise tenant's only to 80% (a gentler
curve: fewer items evicted per request). A manifest's ``qos`` sets both for a user-defined tier, or retunes a
built-in one; a tier that is not built in and has no ``qos`` gets the ``standard`` row. Spend budgets (money) and
run/workflow consumption caps get no grace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ctxflow.processors.encodings import has_offline_encoding
from ctxflow.schemas.models import (
    BudgetState,
    HardLimitBehaviour,
    OverflowBehaviour,
    Slot,
    SpendWindow,
    TenantManifest,
    TierQoS,
)

SLOTS: tuple[Slot, ...] = tuple(Slot)
SLOT_INDEX: dict[Slot, int] = {slot: i for i, slot in enumerate(SLOTS)}
#: Budget levels by rank (:meth:`Limit.rank`): ok, soft watermark, hard limit.
LEVELS = (BudgetState.OK, BudgetState.SOFT, BudgetState.HARD)


TIER_QOS: dict[str, TierQoS] = {
    "free": TierQoS(grace=1.00, evict_to=0.60),
    "standard": TierQoS(grace=1.05, evict_to=0.70),
    "enterprise": TierQoS(grace=1.15, evict_to=0.80),
}


def tier_qos(tier: str) -> TierQoS:
    """The built-in QoS row of ``tier`` (case-insensitive); other tiers get ``standard``'s."""
    return TIER_QOS.get(tier.lower(), TIER_QOS["standard"])


def manifest_qos(manifest: TenantManifest) -> TierQoS:
    """The QoS a manifest's budgets get: its own ``qos`` when it gives one, else its tier's built-in row."""
    return manifest.qos if manifest.qos is not None else tier_qos(manifest.tier)


def _ceil(value: float) -> int:
    # Guard against 1000 * 0.85 == 850.0000000000001 turning into 851.
    return math.ceil(round(value, 6))


@dataclass(frozen=True, slots=True)
class Limit:
    """Thresholds of one gauge: ``soft`` from ``soft_at`` tokens, ``hard`` from ``hard_at`` tokens."""

    cap: int
    soft_at: int
    hard_at: int

    @classmethod
    def of(cls, cap: int, watermark: float, grace: float = 1.0) -> Limit:
        """Thresholds for ``cap`` with a soft watermark and a hard-limit grace factor."""
        return cls(cap, _ceil(cap * watermark), _ceil(cap * grace))

    def level(self, used: int) -> BudgetState:
        """``ok`` below the watermark, ``soft`` from it, ``hard`` from the hard limit; empty is always ok."""
        return LEVELS[self.rank(used)]

    def rank(self, used: int) -> int:
        """:meth:`level` as 0 (ok), 1 (soft) or 2 (hard): the hot path compares ints, not enums."""
        if used <= 0 or used < self.soft_at:
            return 0
        return 2 if used >= self.hard_at else 1


@dataclass(frozen=True, slots=True)
class EffectiveBudget:
    """The budget that applies to one user of one tenant, with every precedence rule already applied."""

    tenant_id: str
    manifest_version: int | None
    tier: str
    qos: TierQoS
    watermark: float
    tenant_watermark: float
    slot_limits: tuple[Limit | None, ...]
    total: Limit
    overflow: OverflowBehaviour
    hard_limit: HardLimitBehaviour
    tenant_windows: tuple[SpendWindow, ...]
    user_windows: tuple[SpendWindow, ...]
    run_cap: Limit | None
    workflow_cap: Limit | None
    subagent_cap: Limit | None
    tokenizers: tuple[tuple[str, str], ...]

    def evict_target(self, limit: Limit) -> int:
        """Tokens a slot should be brought down to by an eviction (the tier's eviction curve)."""
        return int(limit.cap * self.qos.evict_to)


DEFAULT_SLOT_CAPS: dict[Slot, int] = {
    Slot.SYSTEM: 8_000,
    Slot.TOOLS: 8_000,
    Slot.RETRIEVED: 32_000,
    Slot.HISTORY: 64_000,
    Slot.SCRATCHPAD: 16_000,
    Slot.OUTPUT: 8_000,
}
DEFAULT_TOTAL_CAP = 128_000
DEFAULT_TIER = "standard"
DEFAULT_WATERMARK = 0.85


def effective_budget(tenant_id: str, manifest: TenantManifest | None, user_id: str | None) -> EffectiveBudget:
    """Resolve the budget for ``user_id`` of ``tenant_id`` (``manifest=None``: the built-in default)."""
    if manifest is None:
        qos = tier_qos(DEFAULT_TIER)
        return EffectiveBudget(
            tenant_id,
            None,
            DEFAULT_TIER,
            qos,
            DEFAULT_WATERMARK,
            DEFAULT_WATERMARK,
            tuple(Limit.of(DEFAULT_SLOT_CAPS[s], DEFAULT_WATERMARK, qos.grace) for s in SLOTS),
            Limit.of(DEFAULT_TOTAL_CAP, DEFAULT_WATERMARK, qos.grace),
            OverflowBehaviour.EVICT_AND_COMPRESS,
            HardLimitBehaviour.FLAG,
            (),
            (),
            None,
            None,
            None,
            (),
        )
    if manifest.tenant_id != tenant_id:
        raise ValueError(f"manifest of tenant {manifest.tenant_id!r} cannot govern tenant {tenant_id!r}")
    override = manifest.user_overrides.get(user_id) if user_id is not None else None
    qos = manifest_qos(manifest)
    watermark = manifest.soft_watermark
    total_cap = manifest.total_cap
    run_cap = manifest.run_cap_tokens
    user_windows: tuple[SpendWindow, ...] = ()
    if override is not None:
        watermark = override.soft_watermark if override.soft_watermark is not None else watermark
        total_cap = override.total_cap if override.total_cap is not None else total_cap
        run_cap = override.run_cap_tokens if override.run_cap_tokens is not None else run_cap
        user_windows = tuple(override.spend_windows or ())
    caps = manifest.slot_caps
    wf_cap = manifest.workflow_cap_tokens
    share = manifest.subagent_share
    return EffectiveBudget(
        tenant_id,
        manifest.version,
        manifest.tier,
        qos,
        watermark,
        manifest.soft_watermark,
        tuple(None if (c := getattr(caps, s.value)) is None else Limit.of(c, watermark, qos.grace) for s in SLOTS),
        Limit.of(total_cap, watermark, qos.grace),
        manifest.overflow,
        manifest.hard_limit,
        tuple(manifest.spend_windows),
        user_windows,
        None if run_cap is None else Limit.of(run_cap, watermark),
        # Workflow gauges are shared by every user of the workflow: the tenant's watermark applies.
        None if wf_cap is None else Limit.of(wf_cap, manifest.soft_watermark),
        None if wf_cap is None or share is None else Limit.of(math.floor(wf_cap * share), manifest.soft_watermark),
        tuple(sorted(manifest.tokenizers.items())),
    )


class ManifestError(ValueError):
    """A manifest that passed the schema but is inconsistent; ``problems`` lists each fix needed."""

    def __init__(self, tenant_id: str, problems: list[str]) -> None:
        super().__init__(f"manifest for tenant {tenant_id!r} is invalid: " + "; ".join(problems))
        self.problems = problems


def _window_problems(where: str, windows: list[SpendWindow]) -> list[str]:
    problems = []
    kinds = [w.window for w in windows]
    for kind in sorted({k for k in kinds if kinds.count(k) > 1}):
        problems.append(f"{where}: more than one {kind.value} window: keep one per window kind")
    for w in windows:
        if w.max_tokens is None and w.max_cost_micros is None:
            problems.append(f"{where}: the {w.window.value} window sets neither max_tokens nor max_cost_micros")
    return problems


def manifest_problems(manifest: TenantManifest) -> list[str]:
    """Everything wrong with ``manifest`` beyond what the schema checks (empty when it is valid).

    Checks: a positive total cap; no slot cap above the total cap; no soft watermark below the tier's
    eviction target; a workflow cap at least the run cap;
    ``subagent_share`` only with a workflow cap; one spend window per kind, each with a limit; tokenizer
    encodings that load offline; user overrides obeying the same rules.
    """
    problems: list[str] = []
    if manifest.total_cap <= 0:
        problems.append("total_cap must be positive")
    for slot in SLOTS:
        cap = getattr(manifest.slot_caps, slot.value)
        if cap is not None and cap > manifest.total_cap:
            problems.append(f"slot_caps.{slot.value} ({cap}) exceeds total_cap ({manifest.total_cap})")
    run_cap, wf_cap = manifest.run_cap_tokens, manifest.workflow_cap_tokens
    if run_cap is not None and wf_cap is not None and wf_cap < run_cap:
        problems.append(f"workflow_cap_tokens ({wf_cap}) is below run_cap_tokens ({run_cap})")
    if manifest.subagent_share is not None and wf_cap is None:
        problems.append("subagent_share needs workflow_cap_tokens (it is a fraction of the workflow cap)")
    evict_to = manifest_qos(manifest).evict_to
    watermarks = [("soft_watermark", manifest.soft_watermark)] + [
        (f"user_overrides[{user!r}].soft_watermark", o.soft_watermark)
        for user, o in sorted(manifest.user_overrides.items()) if o.soft_watermark is not None]
    for where, watermark in watermarks:
        if watermark < evict_to:
            problems.append(
                f"{where} ({watermark}) is below the tier's evict_to ({evict_to}): an eviction request at the "
                "watermark would ask to come down to more tokens than the context holds"
            )
    problems += _window_problems("spend_windows", manifest.spend_windows)
    for model, encoding in sorted(manifest.tokenizers.items()):
        if not has_offline_encoding(encoding):
            problems.append(f"tokenizers[{model!r}]: encoding {encoding!r} is not available offline")
    for user, override in sorted(manifest.user_overrides.items()):
        if override.total_cap is not None and override.total_cap <= 0:
            problems.append(f"user_overrides[{user!r}].total_cap must be positive")
        problems += _window_problems(f"user_overrides[{user!r}].spend_windows", override.spend_windows or [])
    return problems


def check_manifest(manifest: TenantManifest) -> TenantManifest:
    """Return ``manifest`` when valid; raise :class:`ManifestError` listing every problem otherwise."""
    problems = manifest_problems(manifest)
    if problems:
        raise ManifestError(manifest.tenant_id, problems)
    return manifest
