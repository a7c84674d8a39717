"""Provider usage payloads normalized into the contract's five disjoint token kinds.

A :class:`~schemas.models.UsageReport` counts every token of a call exactly once (see ``schemas/README.md``):
``input_tokens`` is the uncached prompt, ``cached_read_tokens`` and ``cache_write_tokens`` the prompt tokens read
from and written to the provider's cache, ``output_tokens`` the generated tokens other than reasoning and
``reasoning_tokens`` the generated reasoning. Providers count differently:

==========================  ===================================================  ===================================
payload                     prompt                                               completion
==========================  ===================================================  ===================================
OpenAI Chat Completions     ``prompt_tokens`` includes ``cached_tokens``         ``completion_tokens`` includes
                                                                                 ``reasoning_tokens``
OpenAI Responses            ``input_tokens`` includes ``cached_tokens``          ``output_tokens`` includes
                                                                                 ``reasoning_tokens``
Anthropic Messages          ``input_tokens`` excludes ``cache_read_input_tokens``  ``output_tokens`` includes
                            and ``cache_creation_input_tokens``                  ``output_tokens_details.
                                                                                 thinking_tokens`` when given
OpenTelemetry GenAI spans   ``gen_ai.usage.input_tokens`` includes               ``gen_ai.usage.output_tokens``
                            ``gen_ai.usage.cache_read.input_tokens`` and          includes ``gen_ai.usage.reasoning.
                            ``gen_ai.usage.cache_creation.input_tokens``         output_tokens``
==========================  ===================================================  ===================================

So the normalizers subtract what a total includes and add what it excludes; the sum of the five kinds is the
provider's own total. A breakdown larger than the total it belongs to (a payload no provider documents) is
capped at that total: the total is what the provider bills, and nothing is counted twice. An OTel span whose
``input_tokens`` is smaller than its cache counts evidently did not include them (an instrumentation passing
Anthropic's field through), so its ``input_tokens`` is taken as the uncached part.

Every normalizer accepts a dict or a provider SDK object (pydantic models, any object with attributes) without
importing the provider SDKs, and a whole response as well as its ``usage`` (the response also names the
model). The stream accumulators take a call's events one by one and end with the call's usage, marked
``streamed``; a stream cut before its final usage yields ``complete=False`` with what it saw, its generated
text counted with the model's tokenizer when the provider reported nothing yet, never a silent zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ctxflow.processors.tokens import TokenCounter
from ctxflow.streams.sdk.records import token_counter


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """One provider call's tokens in the contract's disjoint kinds; build a report with ``RunContext.usage_from``.

    Guarantees, as the normalizers build it: every count is a non-negative int and :attr:`total_tokens` is the
    provider's own total for the call.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    streamed: bool = False
    complete: bool = True
    provider: str | None = None
    model: str | None = None

    @property
    def total_tokens(self) -> int:
        """Every token of the call, each counted once."""
        return (self.input_tokens + self.output_tokens + self.cached_read_tokens + self.cache_write_tokens
                + self.reasoning_tokens)


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    # Provider SDK objects (pydantic models, keeping undeclared fields of a newer API as attributes too) read
    # like any object; JSON payloads are mappings.
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _path(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = _get(obj, key)
    return obj


def _count(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
    return value


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _usage_and_model(payload: Any, total_key: str) -> tuple[Any, str | None]:
    """``(usage object, model)`` from a usage object or a whole response (which carries ``usage``)."""
    if _get(payload, total_key) is None and _get(payload, "usage") is not None:
        return _get(payload, "usage"), _name(_get(payload, "model"))
    return payload, None


def _openai(usage: Any, model: str | None, prompt: str, completion: str, where: str) -> TokenUsage:
    prompt_total = _count(_get(usage, prompt), f"{where}.{prompt}")
    completion_total = _count(_get(usage, completion), f"{where}.{completion}")
    cached = min(_count(_path(usage, f"{prompt}_details", "cached_tokens"),
                        f"{where}.{prompt}_details.cached_tokens"), prompt_total)
    reasoning = min(_count(_path(usage, f"{completion}_details", "reasoning_tokens"),
                           f"{where}.{completion}_details.reasoning_tokens"), completion_total)
    return TokenUsage(input_tokens=prompt_total - cached, output_tokens=completion_total - reasoning,
                      cached_read_tokens=cached, reasoning_tokens=reasoning, provider="openai", model=model)


def openai_chat_usage(payload: Any) -> TokenUsage:
    """Normalize an OpenAI Chat Completions ``usage`` (or the completion holding it).

    ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``; ``completion_tokens`` includes
    ``completion_tokens_details.reasoning_tokens`` (and accepted or rejected prediction tokens, billed as output).
    """
    usage, model = _usage_and_model(payload, "prompt_tokens")
    return _openai(usage, model, "prompt_tokens", "completion_tokens", "openai chat usage")


def openai_responses_usage(payload: Any) -> TokenUsage:
    """Normalize an OpenAI Responses API ``usage`` (or the response holding it).

    ``input_tokens`` includes ``input_tokens_details.cached_tokens``; ``output_tokens`` includes
    ``output_tokens_details.reasoning_tokens``.
    """
    usage, model = _usage_and_model(payload, "input_tokens")
    return _openai(usage, model, "input_tokens", "output_tokens", "openai responses usage")


def anthropic_usage(payload: Any) -> TokenUsage:
    """Normalize an Anthropic Messages ``usage`` (or the message holding it).

    ``input_tokens`` excludes ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` (the three add up to
    the prompt); ``output_tokens`` includes extended thinking, which ``output_tokens_details.thinking_tokens``
    breaks out when the API reports it (otherwise thinking stays in ``output_tokens``, priced alike).
    """
    usage, model = _usage_and_model(payload, "input_tokens")
    where = "anthropic usage"
    output = _count(_get(usage, "output_tokens"), f"{where}.output_tokens")
    thinking = min(_count(_path(usage, "output_tokens_details", "thinking_tokens"),
                          f"{where}.output_tokens_details.thinking_tokens"), output)
    return TokenUsage(
        input_tokens=_count(_get(usage, "input_tokens"), f"{where}.input_tokens"),
        output_tokens=output - thinking,
        cached_read_tokens=_count(_get(usage, "cache_read_input_tokens"), f"{where}.cache_read_input_tokens"),
        cache_write_tokens=_count(_get(usage, "cache_creation_input_tokens"), f"{where}.cache_creation_input_tokens"),
        reasoning_tokens=thinking, provider="anthropic", model=model,
    )


#: OpenTelemetry GenAI span attributes (semantic conventions, gen_ai registry), newest name first.
OTEL_INPUT = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OTEL_OUTPUT = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
OTEL_CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
OTEL_CACHE_WRITE = "gen_ai.usage.cache_creation.input_tokens"
OTEL_REASONING = "gen_ai.usage.reasoning.output_tokens"
OTEL_PROVIDER = ("gen_ai.provider.name", "gen_ai.system")
OTEL_MODEL = ("gen_ai.response.model", "gen_ai.request.model")


def _first(attributes: Any, names: Iterable[str]) -> Any:
    return next((value for name in names if (value := _get(attributes, name)) is not None), None)


def otel_genai_usage(span: Any) -> TokenUsage:
    """Normalize OpenTelemetry GenAI usage attributes: a span (``.attributes``) or its attribute mapping.

    ``gen_ai.usage.input_tokens`` includes ``gen_ai.usage.cache_read.input_tokens`` and
    ``gen_ai.usage.cache_creation.input_tokens``; ``gen_ai.usage.output_tokens`` includes
    ``gen_ai.usage.reasoning.output_tokens``. The provider and model come from ``gen_ai.provider.name`` and
    ``gen_ai.response.model`` (or ``gen_ai.request.model``) when present.
    """
    attributes = span if isinstance(span, Mapping) else _get(span, "attributes") or {}
    where = "otel gen_ai attributes"
    prompt = _count(_first(attributes, OTEL_INPUT), f"{where} {OTEL_INPUT[0]}")
    completion = _count(_first(attributes, OTEL_OUTPUT), f"{where} {OTEL_OUTPUT[0]}")
    read = _count(_get(attributes, OTEL_CACHE_READ), f"{where} {OTEL_CACHE_READ}")
    write = _count(_get(attributes, OTEL_CACHE_WRITE), f"{where} {OTEL_CACHE_WRITE}")
    reasoning = min(_count(_get(attributes, OTEL_REASONING), f"{where} {OTEL_REASONING}"), completion)
    uncached = prompt - read - write if prompt >= read + write else prompt
    return TokenUsage(input_tokens=uncached, output_tokens=completion - reasoning, cached_read_tokens=read,
                      cache_write_tokens=write, reasoning_tokens=reasoning,
                      provider=_name(_first(attributes, OTEL_PROVIDER)), model=_name(_first(attributes, OTEL_MODEL)))


class _Stream:
    """What every stream accumulator shares: the generated text it saw, counted only if no usage came."""

    provider = ""

    def __init__(self, model: str | None = None, counter: TokenCounter | None = None) -> None:
        self.model = model
        self._counter = counter
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._final: TokenUsage | None = None

    def _saw_model(self, value: Any) -> None:
        self.model = self.model or _name(value)

    def _seen(self, pieces: list[str]) -> int:
        if not pieces:
            return 0
        counter = self._counter or token_counter()
        return counter.count("".join(pieces), self.model or "").tokens

    def _partial(self, start: TokenUsage) -> TokenUsage:
        return replace(start, output_tokens=max(start.output_tokens, self._seen(self._text)),
                       reasoning_tokens=max(start.reasoning_tokens, self._seen(self._reasoning)), complete=False)

    @property
    def usage(self) -> TokenUsage:
        """The call's usage: the provider's final counts, else ``complete=False`` with what the stream showed."""
        if self._final is not None:
            return replace(self._final, streamed=True, complete=True, provider=self.provider,
                           model=self.model or self._final.model)
        return replace(self._partial(TokenUsage()), streamed=True, provider=self.provider, model=self.model)


class OpenAIChatStream(_Stream):
    """Usage of one streamed Chat Completions call: :meth:`add` every chunk, then read :attr:`usage`.

    Request it with ``stream_options={"include_usage": True}``: the last chunk (empty ``choices``) then carries
    the whole call's usage; every other chunk has ``usage: null``. Without that chunk the call counts as
    interrupted: its streamed text, counted with the model's tokenizer, is the output it reports.
    """

    provider = "openai"

    def add(self, chunk: Any) -> None:
        """Take one ``chat.completion.chunk`` (dict or SDK object)."""
        self._saw_model(_get(chunk, "model"))
        if (usage := _get(chunk, "usage")) is not None:
            self._final = openai_chat_usage(usage)
        for choice in _get(chunk, "choices") or ():
            delta = _get(choice, "delta")
            self._text += [t for t in (_get(delta, "content"), _get(delta, "refusal")) if isinstance(t, str)]
            for call in _get(delta, "tool_calls") or ():
                if isinstance(arguments := _path(call, "function", "arguments"), str):
                    self._text.append(arguments)


class OpenAIResponsesStream(_Stream):
    """Usage of one streamed Responses API call: :meth:`add` every event, then read :attr:`usage`.

    The final ``response.completed`` (or ``response.incomplete``/``response.failed``) event's response carries the
    call's usage; a stream cut before it reports the text deltas it saw, counted, with ``complete=False``.
    """

    provider = "openai"
    _TEXT = ("response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta")

    def add(self, event: Any) -> None:
        """Take one Responses stream event (dict or SDK object)."""
        kind, response = _get(event, "type"), _get(event, "response")
        if response is not None:
            self._saw_model(_get(response, "model"))
            if (usage := _get(response, "usage")) is not None:
                self._final = openai_responses_usage(usage)
        if kind in self._TEXT and isinstance(delta := _get(event, "delta"), str):
            self._text.append(delta)


class AnthropicStream(_Stream):
    """Usage of one streamed Messages call: :meth:`add` every event, then read :attr:`usage`.

    ``message_start`` carries the prompt's counts (input and cache) and a first output count; each
    ``message_delta`` carries cumulative counts, so the last one seen replaces earlier values field by field
    (a field it omits keeps its value). The call is complete once a ``message_delta`` arrived; before that the
    output is the larger of the reported count and the streamed text counted.
    """

    provider = "anthropic"

    def __init__(self, model: str | None = None, counter: TokenCounter | None = None) -> None:
        super().__init__(model, counter)
        self._fields: dict[str, Any] = {}

    def add(self, event: Any) -> None:
        """Take one Messages stream event (dict or SDK object)."""
        kind = _get(event, "type")
        if kind == "message_start":
            message = _get(event, "message")
            self._saw_model(_get(message, "model"))
            self._merge(_get(message, "usage"))
        elif kind == "message_delta":
            self._merge(_get(event, "usage"))
            self._final = anthropic_usage(self._fields)
        elif kind == "content_block_delta":
            delta = _get(event, "delta")
            for key, into in (("text", self._text), ("partial_json", self._text), ("thinking", self._reasoning)):
                if isinstance(piece := _get(delta, key), str):
                    into.append(piece)

    def _merge(self, usage: Any) -> None:
        for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                    "output_tokens_details"):
            if (value := _get(usage, key)) is not None:
                self._fields[key] = value

    @property
    def usage(self) -> TokenUsage:
        if self._final is None and self._fields:
            started = anthropic_usage(self._fields)
            return replace(self._partial(started), streamed=True, provider=self.provider, model=self.model)
        return super().usage
