"""Content features: what an item names verbatim, what it asks for, and how a later turn is matched to it."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

import pytest
from ctxflow.processors.eviction.features import (
    FEATURES_VERSION,
    Features,
    content_features,
    distinctiveness,
    extract,
    mentions,
    ranked_terms,
    term_hash,
    term_hashes,
    turn_features,
    unpack_terms,
    with_features,
)
from ctxflow.schemas.models import MAX_CARRIED_TERMS, ItemKind, PrivacyMode, Role, Slot, TurnEvent
from ctxflow.streams.sdk import outgoing
from hypothesis import given, settings
from hypothesis import strategies as st

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize(
    ("text", "identifier"),
    [
        ("Open src/app/main.py and look.", "src/app/main.py"),
        ("Load ./x.yaml first", "./x.yaml"),
        ("copied to C:\\Users\\bob\\report.txt.", "C:\\Users\\bob\\report.txt"),
        ("see /etc/hosts", "/etc/hosts"),
        ("docs at https://example.com/a/b?q=1.", "https://example.com/a/b?q=1"),
        ("mail bob.smith@corp.io today", "bob.smith@corp.io"),
        ("row 123e4567-e89b-12d3-a456-426614174000 is gone", "123e4567-e89b-12d3-a456-426614174000"),
        ("reverted commit 3f2a9c1 yesterday", "3f2a9c1"),
        (f"sha256 {SHA} matched", SHA),
        ("Refund order ORD-10432 now", "ORD-10432"),
        ("tracked in JIRA-77.", "JIRA-77"),
        ("set max_retries to five", "max_retries"),
        ("the maxRetries field", "maxRetries"),
        ("raised ValueError again", "ValueError"),
        ("config.max_value was wrong", "config.max_value"),
        ("use np.float64 here", "np.float64"),
        ("call parse_config() twice", "parse_config()"),
        ("then load_all(path) fails", "load_all"),
        ("pylint says E1102 here", "E1102"),
        ("the server answered HTTP 404.", "HTTP 404"),
        ("upgrade to v1.2.3 now", "v1.2.3"),
        ("pin 2.31.0-rc.1 please", "2.31.0-rc.1"),
        ("deploy to us-east-1 tonight", "us-east-1"),
    ],
)
def test_identifiers_are_found_verbatim(text: str, identifier: str) -> None:
    assert identifier in extract(text).identifiers


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("the answer is 42.", "42"),
        ("pi is 3.14 or so", "3.14"),
        ("read 1,024 rows", "1,024"),
        ("delta of -7 today", "-7"),
        ("a 15% drop", "15%"),
        ("costs $19.99 each", "$19.99"),
        ("used 2.5GB of memory", "2.5GB"),
        ("p99 is 300ms now", "300ms"),
        ("due 2026-03-14 at the latest", "2026-03-14"),
        ("due 14/03/2026 at the latest", "14/03/2026"),
        ("due March 14, 2026 at the latest", "March 14, 2026"),
        ("due 14 March 2026 at the latest", "14 March 2026"),
        ("meet at 14:05 sharp", "14:05"),
        ("pages 3-7 matter", "3-7"),
    ],
)
def test_numbers_and_dates_are_found_as_written(text: str, number: str) -> None:
    assert number in extract(text).numbers


def test_ordinary_prose_has_no_terms() -> None:
    features = extract(
        "The quick brown fox jumps over the lazy dog. Sure, and/or maybe e.g. a well-known thing (see below)! "
        "Don't worry: it's fine."
    )
    assert features.identifiers == frozenset()
    assert features.numbers == frozenset()


def test_a_term_covers_its_whole_token_and_leaves_sentence_punctuation_out() -> None:
    features = extract("Refund ORD-10432, due 2026-03-14. Edit src/app/main.py. Version v1.2.3; 1,024 rows.")
    assert features.identifiers == {"ORD-10432", "src/app/main.py", "v1.2.3"}
    assert features.numbers == {"2026-03-14", "1,024"}


def test_terms_inside_json_and_key_value_pairs() -> None:
    features = extract('{"order_id": "ORD-10432", "total": 19.99, "items": [1, 2]} retry_count=3 latency=300ms')
    assert {"order_id", "ORD-10432", "retry_count"} <= features.identifiers
    assert {"19.99", "1", "2", "3", "300ms"} <= features.numbers


@pytest.mark.parametrize(
    ("text", "goal", "constraint", "decision"),
    [
        ("My goal is to migrate the orders table.", True, False, False),
        ("I need you to fix the flaky test.", True, False, False),
        ("Please build a dashboard for refunds.", True, False, False),
        ("Task: summarize the incident.", True, False, False),
        ("We want to cut latency in half.", True, False, False),
        ("You must not touch the billing schema.", False, True, False),
        ("Never email customers directly.", False, True, False),
        ("Only use the read replica.", False, True, False),
        ("Send no more than 3 requests per second.", False, True, False),
        ("Don't delete anything.", False, True, False),
        ("We decided to use Postgres.", False, False, True),
        ("Decision: ship on Friday.", False, False, True),
        ("We're going with option B.", False, False, True),
        ("The mustard jar, whenever it rains, is unrequired.", False, False, False),
    ],
)
def test_goal_constraint_and_decision_flags(text: str, goal: bool, constraint: bool, decision: bool) -> None:
    features = extract(text)
    assert (features.goal, features.constraint, features.decision) == (goal, constraint, decision)


def test_term_hash_is_blake2b_four_bytes_big_endian() -> None:
    expected = int.from_bytes(hashlib.blake2b(b"ORD-10432", digest_size=4).digest(), "big")
    assert term_hash("ORD-10432") == expected
    assert 0 <= term_hash("x") < 2**32


def test_term_hashes_put_the_most_distinctive_terms_first_and_respect_the_limit() -> None:
    features = Features(frozenset({"ORD-10432", "src/app/main.py", "ab"}), frozenset({"42", "1,024"}),
                        False, False, False)
    hashes = term_hashes(features, limit=2)
    assert hashes == (term_hash("src/app/main.py"), term_hash("ORD-10432"))
    assert term_hashes(features) == tuple(term_hash(t) for t in ("src/app/main.py", "ORD-10432", "1,024"))
    assert term_hashes(features, limit=0) == ()  # and the too-common "42", "ab" never identify an item


def test_ties_in_distinctiveness_break_lexicographically() -> None:
    assert sorted(["b_1", "a_1", "c_1"], key=distinctiveness) == ["a_1", "b_1", "c_1"]


def test_a_later_turn_naming_an_earlier_items_identifier_is_noticed() -> None:
    stored = term_hashes(extract("Traceback: ValueError in src/app/main.py line 118, order ORD-10432"))
    assert set(stored) & mentions("what happened with ORD-10432?")
    assert not set(stored) & mentions("Let's talk about the weather instead.")


def test_extract_is_fast_on_two_kilobytes() -> None:
    prose = (
        "The user wants the migration finished before Friday. I read the configuration and found that the "
        "retry policy is set too low, so requests fail under load. We decided to use exponential backoff. "
    )
    log = (
        "2026-03-14T14:05:01Z INFO worker started pid=4242 version v1.2.3 config=./conf/app.yaml\n"
        'File "src/app/main.py", line 118, in parse_config() ValueError: bad key max_retries\n'
        "order ORD-10432 total $19.99 qty 1,024 ratio 15% commit 3f2a9c1e user bob@corp.io\n"
    )
    texts = [(prose + log) * 8, (log + prose) * 8, prose * 16, log * 12]
    texts = [t[:2048] for t in texts]
    for text in texts:
        extract(text)
    rounds = 200
    started = time.process_time()
    for _ in range(rounds):
        for text in texts:
            extract(text)
    mean = (time.process_time() - started) / (rounds * len(texts))
    assert mean < 1e-3, f"extract() took {mean * 1e6:.0f} us on 2 KB"  # about 50-100 us; generous for slow CI


@pytest.mark.parametrize("piece", ["1,", "a(", "12:30:", "March ", "a.", "/a", "x-", "((", "v1.", "aB_", "a@b."])
def test_hostile_input_costs_linear_time(piece: str) -> None:
    text = piece * (100_000 // len(piece))
    started = time.process_time()
    extract(text)
    assert time.process_time() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aZ09_./-:@$%,() \n'\"xX")), max_size=300))
def test_every_term_is_a_verbatim_slice_of_the_text(text: str) -> None:
    features = extract(text)
    assert features == extract(text)
    for term in features.identifiers | features.numbers:
        assert term and term in text and term == term.strip()


LOG = ("2026-03-14T09:12:44Z ERROR payment ORD-10432 refused by gateway us-east-1 (HTTP 502) after 3 retries; "
       "see src/billing/charge.py line 118 and ticket JIRA-77. We must never refund twice.")


def test_carried_features_hold_the_extractors_terms_in_rank_order_and_its_flags() -> None:
    found = extract(LOG)
    carried = content_features(LOG)
    assert carried.version == FEATURES_VERSION
    assert unpack_terms(carried) == [term_hash(t) for t in ranked_terms(found)]
    assert carried.terms == len(found.identifiers) + len(found.numbers)
    assert (carried.goal, carried.constraint, carried.decision) == (found.goal, found.constraint, found.decision)


def test_a_turn_carries_at_most_64_terms_the_most_distinctive_kept() -> None:
    text = " ".join(f"ORD-{10_000 + i}" for i in range(100)) + " src/app/very/long/path/to/main.py"
    carried = content_features(text)
    assert len(unpack_terms(carried)) == MAX_CARRIED_TERMS and carried.terms == 101
    assert unpack_terms(carried)[0] == term_hash("src/app/very/long/path/to/main.py")


def _turn(**update: object) -> TurnEvent:
    return TurnEvent(event_id="e", tenant_id="acme", user_id="u", session_id="s", run_id="r", agent_id="a", seq=0,
                     role=Role.TOOL, kind=ItemKind.TOOL_RESULT, slot=Slot.HISTORY, item_id="i", content=LOG,
                     content_digest=None, model="gpt-4o", occurred_at=datetime(2026, 3, 14, tzinfo=UTC),
                     tool_call_id="call_1").model_copy(update=update)


def test_the_worker_uses_what_the_turn_carries_and_extracts_only_when_it_must() -> None:
    mine = _turn(features=content_features("order ORD-1 shipped"))
    assert turn_features(mine) == content_features("order ORD-1 shipped")  # not read from the text again
    older = _turn(features=mine.features.model_copy(update={"version": FEATURES_VERSION + 1}))
    assert turn_features(older) == content_features(LOG)  # another extractor's: this worker's own
    assert turn_features(_turn()) == content_features(LOG)  # a writer that sends none
    assert turn_features(_turn(content=None, content_digest="0" * 64)) is None
    assert turn_features(older.model_copy(update={"content": None, "content_digest": "0" * 64})) == older.features


def test_the_sdk_attaches_features_to_retained_turns_only() -> None:
    assert with_features(_turn()).features == content_features(LOG)
    private = _turn(privacy=PrivacyMode.NO_RETENTION, features=content_features(LOG))
    assert with_features(private).features is None  # hashed identifiers are still the payload's
    assert outgoing(private).features is None and outgoing(private).content is None
