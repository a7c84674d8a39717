"""An effective budget as an operator reads it: the manifest's settings, every gauge's cap and thresholds and
where each cap comes from (built-in default, tenant, or a user override), spend windows and user overrides.

``ctxflow tenants set/get`` print it as tables, or as JSON with ``--json`` (same content).
"""

from __future__ import annotations

from typing import Any

from ctxflow.processors.manifest import DEFAULT_TIER, SLOTS, TIER_QOS, EffectiveBudget, Limit, effective_budget
from ctxflow.schemas.models import SpendWindow, TenantManifest
from rich.table import Table

#: How a user's budget is resolved, shown with every effective budget.
PRECEDENCE = "user override field (when set) > tenant manifest field > built-in default"


def _cap(limit: Limit | None) -> tuple[str, str, str]:
    return ("no cap", "", "") if limit is None else (f"{limit.cap:,}", f"{limit.soft_at:,}", f"{limit.hard_at:,}")


def _gauges(b: EffectiveBudget, m: TenantManifest | None, user: str | None) -> list[tuple[str, Limit | None, str]]:
    """``(gauge, limit, where its cap comes from)`` for every context and consumption gauge of ``b``."""
    override = m.user_overrides.get(user) if m is not None and user is not None else None
    if m is None:
        source = {"total": "built-in default", "run": "built-in default", "tenant": "built-in default"}
    else:
        source = {"total": "tenant", "run": "tenant", "tenant": "tenant"}
        if override is not None and override.total_cap is not None:
            source["total"] = f"user override ({user})"
        if override is not None and override.run_cap_tokens is not None:
            source["run"] = f"user override ({user})"
    slots = [(f"slot {slot.value}", limit, source["tenant"]) for slot, limit in zip(SLOTS, b.slot_limits, strict=True)]
    return [*slots, ("total context", b.total, source["total"]), ("run cap", b.run_cap, source["run"]),
            ("workflow cap", b.workflow_cap, source["tenant"]), ("sub-agent share", b.subagent_cap, source["tenant"])]


def _window_rows(scope: str, windows: tuple[SpendWindow, ...]) -> list[tuple[str, ...]]:
    return [(scope, w.window.value, "-" if w.max_tokens is None else f"{w.max_tokens:,}",
             "-" if w.max_cost_micros is None else f"{w.max_cost_micros:,}") for w in windows]


def qos_source(m: TenantManifest | None) -> str:
    """Where a tier's QoS comes from, in words: the manifest, the tier's built-in row, or standard's row."""
    if m is not None and m.qos is not None:
        return "the manifest's qos"
    tier = m.tier if m is not None else DEFAULT_TIER
    if tier.lower() in TIER_QOS:
        return f"built-in row of {tier.lower()}"
    return f"{tier!r} is not a built-in tier ({', '.join(TIER_QOS)}): standard's row; set qos to choose"


def budget_tables(tenant: str, m: TenantManifest | None, user: str | None) -> list[Table]:
    """The manifest and the effective budget of ``user`` (or of the tenant) as readable tables."""
    b = effective_budget(tenant, m, user)
    override = m.user_overrides.get(user) if m is not None and user is not None else None
    who = f"user {user}" if user else "every user without an override"
    head = Table("setting", "value", title=f"tenant {tenant} version {b.manifest_version or '- (none)'}: "
                 f"effective budget for {who}", title_justify="left")
    mark = f" (user override; tenant {b.tenant_watermark})" if b.watermark != b.tenant_watermark else ""
    rows = [("tier", f"{b.tier}: QoS hard limit at cap x {b.qos.grace:.2f}, eviction down to "
                     f"{b.qos.evict_to:.0%} of cap ({qos_source(m)})"),
            ("soft watermark", f"{b.watermark}{mark}"), ("overflow", b.overflow.value),
            ("hard limit", b.hard_limit.value),
            ("tokenizers", ", ".join(f"{k}={v}" for k, v in b.tokenizers) or "by model name"),
            ("precedence", PRECEDENCE)]
    if user is not None and override is None:
        rows.append(("user overrides", f"{user} has none: the tenant's values apply"))
    if m is not None:
        rows.append(("updated", f"{m.updated_at.isoformat()} by {m.updated_by or '-'}"))
    for row in rows:
        head.add_row(*row)
    gauges = Table("gauge", "cap", "soft from", "hard from", "cap from", title="context and consumption caps "
                   "(tokens; context gauges per run)", title_justify="left")
    for name, limit, source in _gauges(b, m, user):
        gauges.add_row(name, *_cap(limit), source if limit is not None else "")
    tables = [head, gauges]
    windows = _window_rows("tenant", b.tenant_windows) + _window_rows(f"user {user}", b.user_windows)
    if windows:
        spend = Table("scope", "window", "max tokens", "max cost (micro-USD)", title="spend windows",
                      title_justify="left")
        for row in windows:
            spend.add_row(*row)
        tables.append(spend)
    if m is not None and m.user_overrides:
        users = Table("user", "total_cap", "soft_watermark", "run_cap_tokens", "spend_windows",
                      title=f"user overrides ({PRECEDENCE})", title_justify="left")
        for uid, o in sorted(m.user_overrides.items()):
            users.add_row(uid, *("-" if v is None else str(v) for v in (o.total_cap, o.soft_watermark,
                                                                        o.run_cap_tokens)),
                          "-" if o.spend_windows is None else ", ".join(_window_text(w) for w in o.spend_windows))
        tables.append(users)
    return tables


def _window_text(w: SpendWindow) -> str:
    limits = [f"{w.max_tokens:,} tokens" if w.max_tokens is not None else "",
              f"{w.max_cost_micros:,} micro-USD" if w.max_cost_micros is not None else ""]
    return f"{w.window.value}: {' / '.join(x for x in limits if x)}"


def budget_json(tenant: str, m: TenantManifest | None, user: str | None) -> dict[str, Any]:
    """The effective budget as JSON-ready data (same content as :func:`budget_tables`)."""
    b = effective_budget(tenant, m, user)
    return {
        "tenant_id": tenant, "user_id": user, "manifest_version": b.manifest_version, "tier": b.tier,
        "qos": {"grace": b.qos.grace, "evict_to": b.qos.evict_to, "source": qos_source(m)},
        "soft_watermark": b.watermark,
        "overflow": b.overflow.value, "hard_limit": b.hard_limit.value, "precedence": PRECEDENCE,
        "gauges": {name: None if lim is None else {"cap": lim.cap, "soft_at": lim.soft_at, "hard_at": lim.hard_at,
                                                   "source": source} for name, lim, source in _gauges(b, m, user)},
        "spend_windows": {"tenant": [w.model_dump(mode="json") for w in b.tenant_windows],
                          "user": [w.model_dump(mode="json") for w in b.user_windows]},
        "tokenizers": dict(b.tokenizers),
    }
