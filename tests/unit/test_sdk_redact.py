"""The SDK's privacy step: a no-retention turn loses its content but keeps its tokens, counted before it goes."""

from __future__ import annotations

from datetime import UTC, datetime

from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.models import ItemKind, MemoryScope, MemoryType, PrivacyMode, Role, Slot, content_digest
from ctxflow.streams.sdk import RunContext, redact

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TEXT = "Card ending 4242 was declined twice; the customer asked us not to retry before Friday."


def _ctx(model: str, privacy: PrivacyMode = PrivacyMode.NO_RETENTION) -> RunContext:
    return RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a1", model=model, privacy=privacy,
                      clock=lambda: NOW)


def test_a_no_retention_turn_leaves_with_the_tokens_of_its_model_and_without_content() -> None:
    for model in ("gpt-4o", "gpt-4", "claude-sonnet-4", "acme-llm-7b"):
        turn = redact(_ctx(model).turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, TEXT))
        assert turn.content is None and turn.content_digest == content_digest(TEXT)
        assert turn.token_count == TokenCounter().count(TEXT, model).tokens > 0, model


def test_a_given_count_and_other_records_are_left_alone() -> None:
    given = redact(_ctx("gpt-4o").turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, TEXT, token_count=7))
    assert (given.content, given.token_count) == (None, 7)
    retained = _ctx("gpt-4o", PrivacyMode.RETAINED).turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, TEXT)
    assert redact(retained) is retained and retained.token_count is None
    digest_only = _ctx("gpt-4o").turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, content_digest=content_digest(TEXT))
    assert redact(digest_only) is digest_only  # nothing to count: the worker resolves it from the tenant's table
    candidate = redact(_ctx("gpt-4o").memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, TEXT, confidence=0.9))
    assert candidate.content is None and candidate.content_digest == content_digest(TEXT)


def test_a_no_retention_candidate_leaves_without_anything_it_states() -> None:
    stated = _ctx("gpt-4o").memory_candidate(MemoryScope.USER, MemoryType.FACT, TEXT, confidence=0.9,
                                             subject="card-4242", attribute="status", value="declined twice")
    stated = stated.model_copy(update={"embedding": [0.1, 0.2]})
    gone = redact(stated)
    assert (gone.content, gone.subject, gone.attribute, gone.value, gone.embedding) == (None, None, None, None, None)
    assert gone.content_digest == content_digest(TEXT)
