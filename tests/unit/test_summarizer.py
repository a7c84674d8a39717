"""The extractive summarizer: verbatim terms, honest fidelity, the budget, the depth rule and determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from ctxflow.processors.eviction.features import extract
from ctxflow.processors.eviction.summarizer import (
    FACTS,
    FACTS_PARTIAL,
    GAP,
    MAX_DEPTH,
    ExtractiveSummarizer,
    SourceItem,
    Summary,
    SummaryRefused,
    facts_line,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def words(text: str) -> int:
    """The tests' token count: whitespace-separated words."""
    return len(text.split())


def quarter_chars(text: str) -> int:
    return -(-len(text) // 4)


def terms_of(sources: list[SourceItem]) -> set[str]:
    found: set[str] = set()
    for source in sources:
        features = extract(source.text)
        found |= features.identifiers | features.numbers
    return found


def appears(term: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text) is not None


def measured(sources: list[SourceItem], text: str) -> float:
    terms = terms_of(sources)
    return sum(appears(t, text) for t in terms) / len(terms) if terms else 1.0


def verbose_tool_output() -> str:
    lines = ["Running the export job with the default settings, this may take a while.", ""]
    for i in range(12):
        lines.append(f"Processing batch {i + 1} of 12, please wait while the worker finishes the current step.")
        lines.append("The worker is still running and everything looks normal so far, nothing to report.")
    lines += [
        "Export finished: wrote 1,024 rows to ./out/orders.csv in 300ms.",
        "Warning: order ORD-10432 has a refund of $19.99 pending since 2026-03-14.",
        "Error E1102 raised in src/app/main.py by parse_config() at 14:05.",
        "All remaining batches completed without errors and the job exited normally.",
    ]
    return "\n".join(lines)


USER = SourceItem(
    "turn-1",
    "Hi there! My goal is to reconcile refunds for March. Thanks so much for helping out. "
    "You must not touch the billing schema.",
    role="user",
)
ASSISTANT = SourceItem(
    "turn-2", "Okay, let me look. We decided to use the read replica db-replica-2 for all queries.", role="assistant"
)
TOOL = SourceItem("call-7", verbose_tool_output(), role="tool", label="run_export")
SOURCES = [USER, TOOL, ASSISTANT]


def summarize(sources: list[SourceItem], max_tokens: int, count=words) -> Summary:
    return ExtractiveSummarizer().summarize(sources, max_tokens, count)


def test_identifiers_and_numbers_survive_verbatim_in_a_much_shorter_text() -> None:
    summary = summarize(SOURCES, 10_000)
    for term in ("1,024", "./out/orders.csv", "300ms", "ORD-10432", "$19.99", "2026-03-14", "E1102",
                 "src/app/main.py", "parse_config()", "14:05", "db-replica-2"):
        assert term in summary.text
    assert summary.fidelity == 1.0 == measured(SOURCES, summary.text)
    assert words(summary.text) <= 0.3 * sum(words(s.text) for s in SOURCES)


def test_goals_constraints_and_decisions_are_kept_verbatim_with_attribution_and_filler_dropped() -> None:
    text = summarize(SOURCES, 10_000).text
    assert "user: My goal is to reconcile refunds for March." in text
    assert "You must not touch the billing schema." in text
    assert "assistant: We decided to use the read replica db-replica-2 for all queries." in text
    assert "[tool run_export] " in text
    assert "Thanks so much" not in text
    assert "nothing to report" not in text
    assert "Processing batch" not in text


def test_every_sentence_of_a_summary_is_copied_from_a_source() -> None:
    for budget in (10_000, 120, 60, 40):
        text = summarize(SOURCES, budget).text
        for line in text.splitlines():
            if line.startswith((FACTS, FACTS_PARTIAL)):
                continue
            body = re.sub(r"^(?:\[[^\]]*\] |[^\s:]+: |- )", "", line)
            for extract_ in body.split(GAP):
                assert any(extract_ in s.text for s in SOURCES), extract_


def test_the_facts_line_carries_what_the_sentences_leave_out() -> None:
    full = facts_line(sorted(terms_of(SOURCES)))
    summary = summarize(SOURCES, words(full))
    assert summary.fidelity == 1.0
    assert words(summary.text) <= words(full)


def test_a_summary_squeezed_below_its_facts_line_names_what_it_kept_and_reports_less_fidelity() -> None:
    full = facts_line(sorted(terms_of(SOURCES)))
    budget = words(full) // 2
    summary = summarize(SOURCES, budget)
    assert words(summary.text) <= budget
    assert summary.text.startswith(FACTS_PARTIAL)
    kept = summary.text.removeprefix(FACTS_PARTIAL).strip().split("; ")
    assert kept and all(term in terms_of(SOURCES) for term in kept)
    assert 0 < summary.fidelity < 1
    assert summary.fidelity == measured(SOURCES, summary.text)
    # The most distinctive terms are the ones kept.
    assert "ORD-10432" in kept and "./out/orders.csv" in kept


def test_the_budget_is_never_exceeded() -> None:
    for count in (words, quarter_chars):
        for budget in range(3, 200, 7):
            try:
                summary = summarize(SOURCES, budget, count)
            except SummaryRefused:
                continue
            assert count(summary.text) <= budget


def test_a_budget_that_holds_nothing_is_refused() -> None:
    with pytest.raises(SummaryRefused, match="cannot hold"):
        summarize(SOURCES, 1)
    with pytest.raises(SummaryRefused):
        summarize(SOURCES, 0)


def test_provenance_names_sources_digests_summarizer_and_version() -> None:
    summary = summarize(SOURCES, 10_000)
    assert summary.source_ids == ("turn-1", "call-7", "turn-2")
    assert summary.source_digests == tuple(hashlib.sha256(s.text.encode()).hexdigest() for s in SOURCES)
    assert (summary.summarizer, summary.version, summary.depth) == ("extractive", "1", 1)


def test_summaries_of_summaries_stop_at_depth_two() -> None:
    first = summarize(SOURCES, 10_000)
    as_source = SourceItem("sum-1", first.text, depth=first.depth, role="system", label="summary")
    second = summarize([as_source, SourceItem("turn-9", "Also check ORD-20001 please.", role="user")], 10_000)
    assert second.depth == MAX_DEPTH == 2
    assert second.fidelity == 1.0 and "ORD-10432" in second.text and "ORD-20001" in second.text
    again = SourceItem("sum-2", second.text, depth=second.depth)
    with pytest.raises(SummaryRefused, match="stop at depth 2"):
        summarize([again], 10_000)


def test_no_sources_is_refused() -> None:
    with pytest.raises(SummaryRefused):
        summarize([], 100)
    assert issubclass(SummaryRefused, ValueError)


def test_sources_without_terms_have_full_fidelity_and_keep_their_gist() -> None:
    summary = summarize([SourceItem("t", "No matches were found. The search covered everything.", role="tool")], 50)
    assert summary.fidelity == 1.0
    assert summary.text == "tool: No matches were found."


def test_attribution_is_compact() -> None:
    sources = [SourceItem("a", "We decided to deploy build 4821.", role="assistant", label="deploy"),
               SourceItem("b", "You must keep tag v2.0.1 on main.", label="notes"),
               SourceItem("c", "My goal is to finish job J-77 today.")]
    lines = summarize(sources, 10_000).text.splitlines()
    assert lines == ["[assistant deploy] We decided to deploy build 4821.", "[notes] You must keep tag v2.0.1 on main.",
                     "- My goal is to finish job J-77 today."]


def test_repeated_sentences_are_kept_once() -> None:
    line = "Connection to db-replica-2 refused, retrying."
    summary = summarize([SourceItem("t", "\n".join([line] * 20), role="tool")], 10_000)
    assert summary.text.count("db-replica-2") == 1


def test_same_input_same_output_in_every_process() -> None:
    assert summarize(SOURCES, 10_000) == summarize(SOURCES, 10_000)
    script = textwrap.dedent(
        """
        import json, sys
        from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem
        sources = [SourceItem(**s) for s in json.loads(sys.argv[1])]
        for budget in (10_000, 60, 20):
            print(ExtractiveSummarizer().summarize(sources, budget, lambda t: len(t.split())).text)
        """
    )
    arg = json.dumps([{"item_id": s.item_id, "text": s.text, "role": s.role, "label": s.label} for s in SOURCES])
    outputs = set()
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=env,
                             timeout=60, check=True)
        outputs.add(run.stdout)
    assert len(outputs) == 1


IDENTIFIERS = ["src/app/main.py", "ORD-10432", "parse_config()", "max_retries", "v1.2.3", "3f2a9c1e",
               "bob@corp.io", "https://example.com/x", "JIRA-77", "E1102", "us-east-1", "./x.yaml"]
NUMBERS = ["42", "3.14", "1,024", "15%", "$19.99", "300ms", "2026-03-14", "14:05", "2.5GB", "-7"]
FILLER = ["the", "service", "returned", "and", "then", "we", "looked", "at", "it", "again", "Okay.",
          "everything", "is", "fine.", "Sure,", "we", "must", "not", "retry.", "We", "decided", "to", "wait."]
PIECES = st.sampled_from(IDENTIFIERS + NUMBERS + FILLER)
TEXTS = st.lists(PIECES, min_size=1, max_size=40).map(" ".join)
ROLES = st.sampled_from(["user", "assistant", "tool", ""])


@st.composite
def source_lists(draw: st.DrawFn) -> list[SourceItem]:
    count = draw(st.integers(min_value=1, max_value=4))
    return [SourceItem(f"i{i}", draw(TEXTS), role=draw(ROLES), label=draw(st.sampled_from(["", "grep"])))
            for i in range(count)]


@settings(max_examples=150, deadline=None)
@given(source_lists(), st.integers(min_value=0, max_value=60))
def test_fidelity_is_the_measured_share_and_the_budget_holds(sources: list[SourceItem], extra: int) -> None:
    terms = terms_of(sources)
    budget = words(facts_line(sorted(terms))) + extra
    try:
        summary = summarize(sources, budget)
    except SummaryRefused:
        assert not terms  # only sources without terms can fail to fit a budget that holds their facts line
        return
    assert words(summary.text) <= budget
    assert summary.fidelity == measured(sources, summary.text)
    assert summary.fidelity == 1.0


@settings(max_examples=150, deadline=None)
@given(source_lists(), st.integers(min_value=1, max_value=40))
def test_any_budget_is_respected_and_fidelity_stays_honest(sources: list[SourceItem], budget: int) -> None:
    try:
        summary = summarize(sources, budget)
    except SummaryRefused:
        return
    assert words(summary.text) <= budget
    assert summary.fidelity == measured(sources, summary.text)
