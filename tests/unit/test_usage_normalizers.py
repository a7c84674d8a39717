"""Provider usage payloads, shaped as the providers document them, normalized so each token is charged once.

Every payload below is copied from the provider's documentation page cited beside it. Each test checks the
normalized kinds and that pricing charges every token exactly once: priced at one micro-USD per token the cost
is the provider's own total, and priced apart (each kind a different power of a million) every kind lands at
its own price.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from ctxflow.processors.pricing import ModelPrice, PriceTable, usage_tokens
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.codec import Codec
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from ctxflow import (
    AnthropicStream,
    OpenAIChatStream,
    OpenAIResponsesStream,
    RunContext,
    TokenUsage,
    UsageReport,
    anthropic_usage,
    openai_chat_usage,
    openai_responses_usage,
    otel_genai_usage,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
_M = 1_000_000
#: One micro-USD per token of any kind: a report's cost is its token count.
UNIT = PriceTable("unit", {}, ModelPrice(_M, _M, _M, _M, _M))
#: Kinds a million apart: cost = input + output*1e6 + cached_read*1e12 + cache_write*1e18 + reasoning*1e24.
APART = PriceTable("apart", {}, ModelPrice(_M, _M * 10**6, _M * 10**12, _M * 10**18, _M * 10**24))


def report(usage: TokenUsage, model: str = "gpt-4o") -> UsageReport:
    ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a1", model=model, clock=lambda: NOW)
    made = ctx.usage_from(usage, latency_ms=250, provider=usage.provider or "otel")
    assert Codec().decode(Codec().encode(made), UsageReport) == made  # what the SDK publishes is valid Avro
    return made


def charged(
    r: UsageReport, *, input: int = 0, output: int = 0, cached_read: int = 0, cache_write: int = 0,
    reasoning: int = 0,
) -> None:
    """Assert the report's kinds and that pricing charges each token once, at its kind's price."""
    assert (r.input_tokens, r.output_tokens, r.cached_read_tokens, r.cache_write_tokens, r.reasoning_tokens) == (
        input, output, cached_read, cache_write, reasoning)
    assert UNIT.usage_cost(r).micros == usage_tokens(r) == input + output + cached_read + cache_write + reasoning
    assert APART.usage_cost(r).micros == (
        input + output * 10**6 + cached_read * 10**12 + cache_write * 10**18 + reasoning * 10**24)


def objects(payload: Any) -> Any:
    """The payload as a provider SDK returns it: nested objects with attributes instead of dicts."""
    if isinstance(payload, dict):
        return SimpleNamespace(**{k: objects(v) for k, v in payload.items()})
    if isinstance(payload, list):
        return [objects(v) for v in payload]
    return payload


# --- OpenAI Chat Completions -------------------------------------------------------------------------------------

# https://platform.openai.com/docs/api-reference/chat/object (the chat completion object's example)
CHAT_COMPLETION = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion", "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The image shows a wooden boardwalk."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035",
}

# https://platform.openai.com/docs/guides/prompt-caching (the usage of a request with a cache hit)
CHAT_CACHED_USAGE = {
    "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920},
    "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}

# https://platform.openai.com/docs/guides/reasoning (a reasoning model's usage, Chat Completions form)
CHAT_REASONING_USAGE = {
    "prompt_tokens": 75, "completion_tokens": 1186, "total_tokens": 1261,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 1024},
}


def test_openai_chat_completion_usage() -> None:
    usage = openai_chat_usage(CHAT_COMPLETION)  # the whole completion: its model comes along
    assert (usage.provider, usage.model, usage.total_tokens) == ("openai", "gpt-4o-2024-08-06", 1163)
    made = report(usage)
    assert made.model == "gpt-4o-2024-08-06" and made.provider == "openai"
    charged(made, input=1117, output=46)
    assert openai_chat_usage(objects(CHAT_COMPLETION)) == usage  # the openai SDK's object shape


def test_openai_cached_prompt_tokens_are_not_charged_as_input_too() -> None:
    usage = openai_chat_usage(CHAT_CACHED_USAGE)
    assert usage.total_tokens == CHAT_CACHED_USAGE["total_tokens"]
    charged(report(usage), input=2006 - 1920, cached_read=1920, output=300)


def test_openai_reasoning_tokens_are_not_charged_as_output_too() -> None:
    usage = openai_chat_usage(objects(CHAT_REASONING_USAGE))
    assert usage.total_tokens == CHAT_REASONING_USAGE["total_tokens"]
    charged(report(usage, "o3-mini"), input=75, output=1186 - 1024, reasoning=1024)


def test_openai_usage_without_details_is_all_uncached_and_visible() -> None:
    # Details are optional: older models and OpenAI-compatible servers send only the three totals.
    charged(report(openai_chat_usage({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21})),
            input=9, output=12)


# https://platform.openai.com/docs/api-reference/chat/create (stream_options.include_usage: "an additional chunk
# will be streamed before the data: [DONE] message. The usage field on this chunk shows the token usage statistics
# for the entire request, and the choices field will always be an empty array. All other chunks will also include
# a usage field, but with a null value. If the stream is interrupted, you may not receive the final usage chunk")
# and https://platform.openai.com/docs/api-reference/chat-streaming/streaming (the chunk object).
def _chunk(delta: dict[str, Any] | None, usage: dict[str, Any] | None = None, finish: str | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44709d6fcb", "choices": choices,
            "usage": usage}


CHAT_STREAM = [
    _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}), _chunk({"content": " there!"}),
    _chunk({}, finish="stop"),
    _chunk(None, {"prompt_tokens": 1930, "completion_tokens": 3, "total_tokens": 1933,
                  "prompt_tokens_details": {"cached_tokens": 1792, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}),
]


def test_openai_stream_takes_the_final_usage_chunk() -> None:
    stream = OpenAIChatStream()
    for chunk in objects(CHAT_STREAM):
        stream.add(chunk)
    usage = stream.usage
    assert (usage.streamed, usage.complete, usage.model) == (True, True, "gpt-4o-mini-2024-07-18")
    charged(report(usage), input=1930 - 1792, cached_read=1792, output=3)


def test_an_interrupted_openai_stream_reports_the_text_it_saw_flagged_incomplete() -> None:
    stream = OpenAIChatStream()
    for chunk in CHAT_STREAM[:3]:  # the connection drops before the usage chunk
        stream.add(chunk)
    usage = stream.usage
    seen = TokenCounter().count("Hello there!", "gpt-4o-mini-2024-07-18")
    assert not seen.estimated  # o200k: gpt-4o-mini's own tokenizer
    assert (usage.streamed, usage.complete, usage.output_tokens) == (True, False, seen.tokens)
    assert seen.tokens > 0 and report(usage).complete is False
    assert OpenAIChatStream().usage == TokenUsage(streamed=True, complete=False, provider="openai")


# --- OpenAI Responses --------------------------------------------------------------------------------------------

# https://platform.openai.com/docs/api-reference/responses/object (the response object's example)
RESPONSE = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41", "object": "response", "created_at": 1741476777,
    "status": "completed", "model": "gpt-4o-2024-08-06",
    "output": [{"type": "message", "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
                "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "The image depicts a scenic landscape.",
                             "annotations": []}]}],
    "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 52,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 380},
}

# https://platform.openai.com/docs/guides/reasoning (a reasoning model's usage, Responses form)
RESPONSES_REASONING_USAGE = {
    "input_tokens": 75, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1186,
    "output_tokens_details": {"reasoning_tokens": 1024}, "total_tokens": 1261,
}


def test_openai_responses_usage() -> None:
    usage = openai_responses_usage(objects(RESPONSE))
    assert (usage.model, usage.total_tokens) == ("gpt-4o-2024-08-06", 380)
    charged(report(usage), input=328, output=52)
    reasoning = openai_responses_usage(RESPONSES_REASONING_USAGE)
    assert reasoning.total_tokens == 1261
    charged(report(reasoning, "o4-mini"), input=75, output=162, reasoning=1024)


# https://platform.openai.com/docs/api-reference/responses-streaming (response.created, response.output_text.delta,
# response.completed whose response carries the usage)
def test_openai_responses_stream_and_its_interruption() -> None:
    started = {"type": "response.created", "sequence_number": 0,
               "response": {**RESPONSE, "status": "in_progress", "output": [], "usage": None}}
    deltas = [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
               "delta": piece, "sequence_number": i + 1} for i, piece in enumerate(["The image", " depicts"])]
    completed = {"type": "response.completed", "sequence_number": 9, "response": RESPONSE}
    stream = OpenAIResponsesStream()
    for event in [started, *deltas, completed]:
        stream.add(event)
    assert (stream.usage.streamed, stream.usage.complete) == (True, True)
    charged(report(stream.usage), input=328, output=52)
    cut = OpenAIResponsesStream()
    for event in [started, *deltas]:
        cut.add(objects(event))
    assert (cut.usage.complete, cut.usage.output_tokens) == (False, TokenCounter().count("The image depicts",
                                                                                          "gpt-4o").tokens)


# --- Anthropic Messages ------------------------------------------------------------------------------------------

# https://docs.anthropic.com/en/api/messages (the response example)
MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
    "model": "claude-3-7-sonnet-20250219", "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 2095, "output_tokens": 503},
}

# https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching (the first request writes the cache, the
# second reads it; input_tokens counts only the tokens after the last cache breakpoint)
ANTHROPIC_CACHE_WRITE = {"input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
                         "output_tokens": 393}
ANTHROPIC_CACHE_READ = {"input_tokens": 21, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 188086,
                        "output_tokens": 393}

# https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking and the Messages API's Usage type
# (anthropic-sdk-python src/anthropic/types/usage.py): "output_tokens remains the inclusive, authoritative total
# used for billing"; output_tokens_details.thinking_tokens is how many of them were extended thinking.
ANTHROPIC_THINKING = {"input_tokens": 412, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 2450, "output_tokens_details": {"thinking_tokens": 1200}}


def test_anthropic_message_usage() -> None:
    usage = anthropic_usage(objects(MESSAGE))
    assert (usage.provider, usage.model, usage.total_tokens) == ("anthropic", "claude-3-7-sonnet-20250219", 2598)
    charged(report(usage), input=2095, output=503)


def test_anthropic_cache_reads_and_writes_are_charged_besides_input_not_inside_it() -> None:
    write, read = anthropic_usage(ANTHROPIC_CACHE_WRITE), anthropic_usage(ANTHROPIC_CACHE_READ)
    assert write.total_tokens == read.total_tokens == 21 + 188086 + 393
    charged(report(write, "claude-sonnet-4"), input=21, cache_write=188086, output=393)
    charged(report(read, "claude-sonnet-4"), input=21, cached_read=188086, output=393)


def test_anthropic_thinking_is_reasoning_inside_output_tokens() -> None:
    usage = anthropic_usage(ANTHROPIC_THINKING)
    assert usage.total_tokens == 412 + 2450
    charged(report(usage, "claude-opus-4"), input=412, output=2450 - 1200, reasoning=1200)


class _SdkUsage(BaseModel):
    """An older anthropic SDK's Usage: it does not declare output_tokens_details, and keeps it as an extra."""

    model_config = ConfigDict(extra="allow")
    input_tokens: int
    output_tokens: int


def test_anthropic_sdk_objects_read_fields_their_class_does_not_declare() -> None:
    usage = anthropic_usage(_SdkUsage.model_validate(ANTHROPIC_THINKING))
    assert (usage.reasoning_tokens, usage.output_tokens, usage.total_tokens) == (1200, 1250, 412 + 2450)


# https://docs.anthropic.com/en/docs/build-with-claude/streaming: message_start carries the prompt's counts; "the
# token counts shown in the usage field of the message_delta event are cumulative" (a basic stream, then one with
# the web search tool, whose message_delta also updates the input counts).
BASIC_STREAM = [
    {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": "claude-opus-4-20250514", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
]
WEB_SEARCH_STREAM = [
    {"type": "message_start", "message": {
        "id": "msg_01G...", "type": "message", "role": "assistant", "model": "claude-opus-4-20250514",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 2679, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 3, "service_tier": "standard"}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "I'll check"}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"input_tokens": 10682, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
               "output_tokens": 510, "server_tool_use": {"web_search_requests": 1}}},
    {"type": "message_stop"},
]


def test_anthropic_stream_takes_the_last_cumulative_counts() -> None:
    basic, search = AnthropicStream(), AnthropicStream()
    for event in objects(BASIC_STREAM):
        basic.add(event)
    for event in WEB_SEARCH_STREAM:
        search.add(event)
    assert (basic.usage.streamed, basic.usage.complete, basic.usage.model) == (True, True, "claude-opus-4-20250514")
    charged(report(basic.usage), input=25, output=15)  # not 1 + 15: message_delta's count is cumulative
    charged(report(search.usage), input=10682, output=510)


def test_an_interrupted_anthropic_stream_keeps_its_prompt_counts_and_counts_the_text_seen() -> None:
    stream = AnthropicStream()
    for event in [*BASIC_STREAM[:4], *BASIC_STREAM[4:5] * 40]:  # cut before message_delta
        stream.add(event)
    usage = stream.usage
    seen = TokenCounter().count("Hello" + "!" * 40, "claude-opus-4-20250514")
    assert (usage.complete, usage.streamed, usage.input_tokens, usage.output_tokens) == (False, True, 25, seen.tokens)
    assert seen.tokens > 1  # more than message_start's first output count


# --- OpenTelemetry GenAI ----------------------------------------------------------------------------------------

# https://opentelemetry.io/docs/specs/semconv/registry/attributes/gen-ai/ (the gen_ai.usage.* examples: input 100,
# cache_read.input 50 and cache_creation.input 25 "SHOULD be included in gen_ai.usage.input_tokens", output 180,
# reasoning.output 50 "SHOULD be included in gen_ai.usage.output_tokens")
OTEL_SPAN_ATTRIBUTES = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4",
    "gen_ai.response.model": "claude-sonnet-4-20250514",
    "gen_ai.usage.input_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 50,
    "gen_ai.usage.cache_creation.input_tokens": 25, "gen_ai.usage.output_tokens": 180,
    "gen_ai.usage.reasoning.output_tokens": 50,
}


def test_otel_genai_span_attributes() -> None:
    usage = otel_genai_usage(SimpleNamespace(attributes=OTEL_SPAN_ATTRIBUTES))  # a ReadableSpan's shape
    assert (usage.provider, usage.model, usage.total_tokens) == ("anthropic", "claude-sonnet-4-20250514", 280)
    charged(report(usage), input=25, cached_read=50, cache_write=25, output=130, reasoning=50)


def test_otel_span_that_passed_anthropics_input_through_still_charges_every_token_once() -> None:
    # input_tokens below the cache counts cannot include them: the instrumentation sent Anthropic's own field.
    usage = otel_genai_usage({"gen_ai.usage.input_tokens": 21, "gen_ai.usage.cache_read.input_tokens": 188086,
                              "gen_ai.usage.output_tokens": 393})
    charged(report(usage), input=21, cached_read=188086, output=393)


def test_a_payload_without_a_provider_needs_one_named() -> None:
    usage = otel_genai_usage({"gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 4})
    ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a1", model="m", clock=lambda: NOW)
    with pytest.raises(ValueError, match="provider"):
        ctx.usage_from(usage, latency_ms=1)
    assert ctx.usage_from(usage, latency_ms=1, provider="vllm").model == "m"  # the run's model when none named


def test_malformed_counts_are_refused_not_guessed() -> None:
    for bad in ({"prompt_tokens": -1, "completion_tokens": 2}, {"prompt_tokens": "12", "completion_tokens": 2},
                {"prompt_tokens": True, "completion_tokens": 2}):
        with pytest.raises(ValueError, match="prompt_tokens"):
            openai_chat_usage(bad)


# --- Properties -------------------------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**9)


@st.composite
def openai_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any], int]:
    api = draw(st.sampled_from(["chat", "responses"]))
    prompt, completion = draw(counts), draw(counts)
    cached, reasoning = draw(st.integers(0, prompt)), draw(st.integers(0, completion))
    p, c = ("prompt_tokens", "completion_tokens") if api == "chat" else ("input_tokens", "output_tokens")
    usage: dict[str, Any] = {p: prompt, c: completion, "total_tokens": prompt + completion}
    if draw(st.booleans()):
        usage[f"{p}_details"] = {"cached_tokens": cached}
    if draw(st.booleans()):
        usage[f"{c}_details"] = {"reasoning_tokens": reasoning}
    return api, usage, prompt + completion


@st.composite
def anthropic_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    usage: dict[str, Any] = {"input_tokens": draw(counts), "output_tokens": draw(counts)}
    for key in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        usage[key] = draw(st.one_of(st.none(), counts))
    if draw(st.booleans()):
        usage["output_tokens_details"] = {"thinking_tokens": draw(st.integers(0, usage["output_tokens"]))}
    total = usage["input_tokens"] + usage["output_tokens"] + (usage["cache_creation_input_tokens"] or 0) + (
        usage["cache_read_input_tokens"] or 0)
    return usage, total


@st.composite
def otel_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    read, write, uncached = draw(counts), draw(counts), draw(counts)
    output = draw(counts)
    attributes = {"gen_ai.usage.input_tokens": read + write + uncached, "gen_ai.usage.output_tokens": output,
                  "gen_ai.usage.cache_read.input_tokens": read, "gen_ai.usage.cache_creation.input_tokens": write,
                  "gen_ai.usage.reasoning.output_tokens": draw(st.integers(0, output))}
    return attributes, read + write + uncached + output


@given(openai_payloads(), anthropic_payloads(), otel_payloads(), st.booleans())
def test_normalized_kinds_sum_to_the_providers_total(
    openai: tuple[str, dict[str, Any], int], anthropic: tuple[dict[str, Any], int],
    otel: tuple[dict[str, Any], int], as_objects: bool,
) -> None:
    api, payload, total = openai
    shaped = objects(payload) if as_objects else payload
    normalized = [
        (openai_chat_usage(shaped) if api == "chat" else openai_responses_usage(shaped), total),
        (anthropic_usage(objects(anthropic[0]) if as_objects else anthropic[0]), anthropic[1]),
        (otel_genai_usage(otel[0]), otel[1]),
    ]
    for usage, provider_total in normalized:
        assert usage.total_tokens == provider_total
        made = report(usage)
        assert UNIT.usage_cost(made).micros == usage_tokens(made) == provider_total


@given(st.lists(anthropic_payloads(), min_size=1, max_size=4))
def test_an_anthropic_stream_ends_with_its_last_cumulative_usage(snapshots: list[tuple[dict[str, Any], int]]) -> None:
    """Each delta here states every count (cumulative), so the stream's usage is the last one's, complete."""
    stream = AnthropicStream()
    stream.add({"type": "message_start", "message": {"model": "claude-sonnet-4", "usage": snapshots[0][0]}})
    for usage, _ in snapshots[1:]:
        stated = {k: v or 0 for k, v in usage.items()} | {"output_tokens_details": usage.get(
            "output_tokens_details", {"thinking_tokens": 0})}
        stream.add({"type": "message_delta", "delta": {"stop_reason": None}, "usage": stated})
    assert stream.usage.total_tokens == snapshots[-1][1]
    assert stream.usage.complete is (len(snapshots) > 1)
