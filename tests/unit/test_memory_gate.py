"""The promotion gate's rules, through the real detectors: what gets into durable memory and why not."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ctxflow.processors.memory.gate import Rule
from ctxflow.processors.memory.identity import candidate_memory_id, normalise_content
from ctxflow.processors.memory.policy import MemoryPolicy, RunFacts
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryScope, MemoryType, PrivacyMode, Sensitivity, Verification
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

POLICY = MemoryPolicy(retention_rules=frozenset({"pii-30d"}), trusted_systems=frozenset({"crm"}))
RUN = RunFacts()


def judge(c, policy=POLICY, run=RUN, now=NOW, revoked=False):
    return shared_gate().judge(c, policy, run, now, revoked=revoked)


@pytest.mark.parametrize("type_", [MemoryType.PREFERENCE, MemoryType.EPISODE])
def test_user_preferences_and_episodes_are_promoted_to_user_scope(type_: MemoryType) -> None:
    d = judge(candidate("Drafts emails in a formal tone, bullet points first", type=type_))
    assert (d.accepted, d.rule) == (True, Rule.USER_MEMORY)


@pytest.mark.parametrize("type_", [MemoryType.FACT, MemoryType.TRACE])
def test_user_scope_refuses_facts_and_traces(type_: MemoryType) -> None:
    d = judge(candidate("The build takes 4 minutes", type=type_))
    assert (d.accepted, d.rule) == (False, Rule.TYPE_NOT_PROMOTABLE_TO_SCOPE)


def test_session_scope_takes_any_type_but_policy() -> None:
    for type_ in (MemoryType.PREFERENCE, MemoryType.FACT, MemoryType.EPISODE, MemoryType.TRACE):
        assert judge(candidate("Tool call 3 returned 12 rows", scope=MemoryScope.SESSION, type=type_)).accepted


def test_global_scope_is_write_locked_even_during_bootstrap() -> None:
    bootstrap = MemoryPolicy(bootstrap_until=NOW + timedelta(days=30))
    d = judge(candidate("Always answer in English", scope=MemoryScope.GLOBAL, type=MemoryType.FACT), bootstrap)
    assert (d.accepted, d.rule) == (False, Rule.GLOBAL_WRITE_LOCKED)


@pytest.mark.parametrize("scope", [MemoryScope.SESSION, MemoryScope.USER, MemoryScope.TENANT])
def test_policy_is_never_promotable(scope: MemoryScope) -> None:
    c = candidate("Refunds above $500 need no approval", scope=scope, type=MemoryType.POLICY,
                  verification=Verification.HUMAN_APPROVED, verified_by="admin")
    d = judge(c, MemoryPolicy(bootstrap_until=NOW + timedelta(days=1)))
    assert (d.accepted, d.rule) == (False, Rule.POLICY_NOT_PROMOTABLE)


def test_no_retention_candidates_and_runs_never_promote() -> None:
    assert judge(candidate(privacy=PrivacyMode.NO_RETENTION)).rule is Rule.NO_RETENTION_RUN
    # The run is no-retention even though the candidate claims otherwise: delegation cannot downgrade it.
    d = judge(candidate(), run=RunFacts(privacy=PrivacyMode.NO_RETENTION))
    assert (d.accepted, d.rule) == (False, Rule.NO_RETENTION_RUN)


def test_a_candidate_naming_another_user_than_its_run_holds_never_promotes() -> None:
    d = judge(candidate(user_id="u-2"), run=RunFacts(user_id="u-1"))
    assert (d.accepted, d.rule) == (False, Rule.NOT_THE_RUNS_USER)
    assert judge(candidate(user_id="u-1"), run=RunFacts(user_id="u-1")).accepted
    assert judge(candidate(user_id="u-2")).accepted  # a run the worker has not seen start: its own claim stands


def test_a_childs_session_memory_never_lands_in_its_parents_session() -> None:
    child = RunFacts(parent_run_id="r-root", parent_session_id="s-1")
    note = candidate("Tool call 3 returned 12 rows", scope=MemoryScope.SESSION, type=MemoryType.FACT,
                     run_id="r-kid", session_id="s-1")
    d = judge(note, run=child)
    assert (d.accepted, d.rule) == (False, Rule.DELEGATION_SHARED_SESSION)
    assert "r-kid" in d.reason and "Tool call" not in d.reason
    # Never loosened, and checked before anything that would say more about the content.
    loose = MemoryPolicy(bootstrap_until=NOW + timedelta(days=30), min_confidence=0.0)
    assert judge(note.model_copy(update={"content": "key AKIAZ3MSJV4WWNKWW5FG"}), loose, child).rule \
        is Rule.DELEGATION_SHARED_SESSION
    # Its own session, another scope, or a root run in that session: the rule has nothing to say.
    assert judge(note.model_copy(update={"session_id": "s-1/r-kid"}), run=child).rule is Rule.SESSION_MEMORY
    assert judge(candidate(session_id="s-1"), run=child).rule is Rule.USER_MEMORY
    assert judge(note, run=RunFacts()).rule is Rule.SESSION_MEMORY


def test_a_secret_is_rejected_and_the_reason_does_not_quote_it() -> None:
    key = "AKIAZ3MSJV4WWNKWW5FG"
    d = judge(candidate(f"Deploys use access key {key}"))
    assert (d.accepted, d.rule) == (False, Rule.SECRET_DETECTED)
    assert key not in d.reason and "AWS Access Key" in d.reason


@pytest.mark.parametrize("field", ["value", "subject", "attribute"])
def test_a_secret_or_pii_stated_beside_the_content_is_caught_like_one_in_it(field: str) -> None:
    stated = {"subject": "deploys", "attribute": "key", "value": "v1"}
    secret = candidate("The deploy key for releases", **(stated | {field: "AKIAZ3MSJV4WWNKWW5FG"}))
    assert judge(secret).rule == Rule.SECRET_DETECTED
    email = candidate("Where build failures go", **(stated | {field: "alice@example.com"}))
    assert judge(email).rule == Rule.PII_WITHOUT_RETENTION_RULE
    assert judge(candidate("Where build failures go", **stated)).accepted


def test_a_secret_is_rejected_whatever_the_verification_or_bootstrap() -> None:
    c = candidate("db password = 'Tr0ub4dor&3-horse'", scope=MemoryScope.TENANT, type=MemoryType.FACT,
                  verification=Verification.HUMAN_APPROVED, verified_by="admin")
    d = judge(c, MemoryPolicy(bootstrap_until=NOW + timedelta(days=1)))
    assert (d.accepted, d.rule) == (False, Rule.SECRET_DETECTED)


def test_unverified_tenant_facts_are_refused() -> None:
    d = judge(candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT))
    assert (d.accepted, d.rule) == (False, Rule.TENANT_REQUIRES_VERIFICATION)


@pytest.mark.parametrize(
    ("evidence", "by", "runs"),
    [
        (Verification.HUMAN_APPROVED, "ops-lead", []),
        (Verification.SYSTEM_OF_RECORD, "crm", []),
        (Verification.CORROBORATED, None, ["r-7", "r-8"]),
    ],
)
def test_verified_tenant_facts_are_promoted(evidence: Verification, by: str | None, runs: list[str]) -> None:
    c = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT,
                  verification=evidence, verified_by=by, corroborating_run_ids=runs)
    d = judge(c)
    assert (d.accepted, d.rule) == (True, Rule.TENANT_VERIFIED_FACT)


@pytest.mark.parametrize(
    ("evidence", "by", "runs"),
    [
        (Verification.HUMAN_APPROVED, None, []),  # approval without an approver
        (Verification.SYSTEM_OF_RECORD, "spreadsheet", []),  # not a trusted system
        (Verification.CORROBORATED, None, ["r-7"]),  # one run is not enough
        (Verification.CORROBORATED, None, ["r-1", "r-0", "r-7"]),  # its own run and parent do not count
    ],
)
def test_claimed_evidence_that_does_not_hold_up_is_refused(
    evidence: Verification, by: str | None, runs: list[str]
) -> None:
    c = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT,
                  verification=evidence, verified_by=by, corroborating_run_ids=runs, parent_run_id="r-0")
    assert judge(c).rule is Rule.TENANT_REQUIRES_VERIFICATION


def test_sub_agent_output_passes_the_same_gate_with_its_provenance() -> None:
    common = {"scope": MemoryScope.TENANT, "type": MemoryType.FACT, "run_id": "r-child", "parent_run_id": "r-root",
              "produced_by_agent": "researcher", "verification": Verification.CORROBORATED}
    # Corroborated only by its parent and itself: refused like any other unverified fact.
    weak = candidate("Invoices are due in 30 days", corroborating_run_ids=["r-root", "r-child"], **common)
    assert judge(weak).rule is Rule.TENANT_REQUIRES_VERIFICATION
    strong = candidate("Invoices are due in 30 days", corroborating_run_ids=["r-a", "r-b"], **common)
    assert judge(strong).rule is Rule.TENANT_VERIFIED_FACT


def test_tenant_episodes_need_human_approval() -> None:
    episode = "Migration of the billing DB went fine after a rollback"
    plain = candidate(episode, scope=MemoryScope.TENANT, type=MemoryType.EPISODE)
    assert judge(plain).rule is Rule.TENANT_REQUIRES_VERIFICATION
    approved = candidate(episode, scope=MemoryScope.TENANT, type=MemoryType.EPISODE,
                         verification=Verification.HUMAN_APPROVED, verified_by="sre-lead")
    assert judge(approved).rule is Rule.TENANT_APPROVED_EPISODE


def test_bootstrap_loosens_tenant_verification_and_the_verdict_says_so() -> None:
    bootstrap = MemoryPolicy(bootstrap_until=NOW + timedelta(days=14))
    c = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT)
    d = judge(c, bootstrap)
    assert (d.accepted, d.rule, d.bootstrap_loosened) == (True, Rule.BOOTSTRAP_LOOSENED, True)
    after = judge(c, bootstrap, now=NOW + timedelta(days=15))
    assert (after.accepted, after.rule) == (False, Rule.TENANT_REQUIRES_VERIFICATION)


def test_pii_is_kept_only_under_a_retention_rule_the_tenant_defines() -> None:
    text = "Prefers to be contacted at jane.doe@example.com"
    refused = judge(candidate(text))
    assert (refused.accepted, refused.rule, refused.pii_kinds) == (False, Rule.PII_WITHOUT_RETENTION_RULE,
                                                                   ("EMAIL_ADDRESS",))
    assert judge(candidate(text, retention_rule="forever")).rule is Rule.PII_WITHOUT_RETENTION_RULE
    kept = judge(candidate(text, retention_rule="pii-30d"))
    assert (kept.accepted, kept.sensitivity, kept.pii_kinds, kept.retention_policy) == (
        True, Sensitivity.PII, ("EMAIL_ADDRESS",), "pii-30d")


def test_revoked_content_needs_review_to_come_back() -> None:
    c = candidate("Prefers dark mode")
    assert judge(c, revoked=True).rule is Rule.REVOKED_DIGEST
    reviewed = candidate("Prefers dark mode", verification=Verification.HUMAN_APPROVED, verified_by="u-1")
    assert judge(reviewed, revoked=True).accepted


def test_low_confidence_candidates_are_refused() -> None:
    assert judge(candidate(confidence=0.2)).rule is Rule.LOW_CONFIDENCE


def test_identity_is_deterministic_and_ignores_case_spacing_and_final_punctuation() -> None:
    a = candidate("Prefers  dark mode.", candidate_id="c-a")
    b = candidate("prefers dark MODE", candidate_id="c-b")
    assert candidate_memory_id(a) == candidate_memory_id(b)
    assert candidate_memory_id(a) != candidate_memory_id(candidate("Prefers light mode"))
    # Tenant ids are case-sensitive, owners are part of the identity.
    assert candidate_memory_id(a) != candidate_memory_id(candidate("Prefers dark mode", tenant_id="ACME"))
    assert candidate_memory_id(a) != candidate_memory_id(candidate("Prefers dark mode", user_id="u-2"))
    assert candidate_memory_id(a) != candidate_memory_id(candidate("Prefers dark mode", type=MemoryType.EPISODE))


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_content_normalisation_is_idempotent(text: str) -> None:
    once = normalise_content(text)
    assert normalise_content(once) == once


def test_a_retained_candidate_without_content_is_refused() -> None:
    c = candidate("x").model_copy(update={"content": None, "content_digest": content_digest("x")})
    assert judge(c).rule is Rule.CONTENT_MISSING


SECRET_SHAPES = [
    "AKIAZ3MSJV4WWNKWW5FG",
    "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",
    "password = 'Tr0ub4dor&3-horse'",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
]
WORDS = ["deploy", "with", "the", "order", "12345", "user", "u-100", "on", "2026-01-05", "is", "ready", "run r-42"]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(WORDS), max_size=8),
    st.lists(st.sampled_from(WORDS), max_size=8),
    st.sampled_from(SECRET_SHAPES),
    st.sampled_from([MemoryScope.SESSION, MemoryScope.USER, MemoryScope.TENANT]),
    st.sampled_from(list(Verification)),
)
def test_a_secret_anywhere_in_the_text_is_never_accepted(
    before: list[str], after: list[str], secret: str, scope: MemoryScope, evidence: Verification
) -> None:
    text = " ".join([*before, secret, *after])
    c = candidate(text, scope=scope, type=MemoryType.EPISODE, verification=evidence, verified_by="ops")
    d = judge(c, MemoryPolicy(retention_rules=frozenset({"r"}), bootstrap_until=NOW + timedelta(days=1)))
    assert (d.accepted, d.rule) == (False, Rule.SECRET_DETECTED)


@settings(max_examples=200, deadline=None)
@given(
    scope=st.sampled_from(list(MemoryScope)),
    type_=st.sampled_from(list(MemoryType)),
    evidence=st.sampled_from(list(Verification)),
    privacy=st.sampled_from(list(PrivacyMode)),
    run_privacy=st.sampled_from(list(PrivacyMode)),
    bootstrap=st.booleans(),
    runs=st.lists(st.sampled_from(["r-1", "r-0", "r-7", "r-8"]), max_size=3),
)
def test_gate_invariants_hold_for_any_candidate(
    scope: MemoryScope, type_: MemoryType, evidence: Verification, privacy: PrivacyMode,
    run_privacy: PrivacyMode, bootstrap: bool, runs: list[str],
) -> None:
    c = candidate("Invoices are due in 30 days", scope=scope, type=type_, verification=evidence,
                  verified_by="crm", corroborating_run_ids=runs, privacy=privacy, parent_run_id="r-0")
    policy = MemoryPolicy(trusted_systems=frozenset({"crm"}),
                          bootstrap_until=NOW + timedelta(days=1) if bootstrap else None)
    d = judge(c, policy, RunFacts(privacy=run_privacy, parent_run_id="r-0"))
    if scope is MemoryScope.GLOBAL or type_ is MemoryType.POLICY or PrivacyMode.NO_RETENTION in (privacy, run_privacy):
        assert not d.accepted
    if d.accepted and scope is MemoryScope.TENANT:
        assert type_ in (MemoryType.FACT, MemoryType.EPISODE)
        assert d.bootstrap_loosened or evidence is not Verification.NONE
        assert d.bootstrap_loosened == (d.rule is Rule.BOOTSTRAP_LOOSENED)
    if d.accepted and scope is MemoryScope.USER:
        assert type_ in (MemoryType.PREFERENCE, MemoryType.EPISODE)


def test_a_tenant_that_lists_its_approvers_takes_no_one_elses_word_for_an_approval() -> None:
    listed = MemoryPolicy(approvers=frozenset({"ops-lead"}))
    fact = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT,
                     verification=Verification.HUMAN_APPROVED, verified_by="the-agent-itself")
    episode = fact.model_copy(update={"type": MemoryType.EPISODE})
    for claimed in (fact, episode):
        assert judge(claimed, listed).rule == Rule.TENANT_REQUIRES_VERIFICATION
        assert judge(claimed.model_copy(update={"verified_by": "ops-lead"}), listed).accepted
        assert judge(claimed).accepted  # a tenant listing nobody: any named approver, as before
    # Revoked content comes back only through an approval the tenant recognises.
    again = candidate("Prefers answers in French", verification=Verification.HUMAN_APPROVED, verified_by="anyone")
    assert judge(again, listed, revoked=True).rule == Rule.REVOKED_DIGEST
    assert judge(again.model_copy(update={"verified_by": "ops-lead"}), listed, revoked=True).accepted
