"""A versioned price table: every cost surface (inference, retrieval, tooling, persistence) in micro-USD.

Inference: model -> micro-USD per million tokens for each kind of token. Costs are integers in micro-USD (1e-6
USD), so sums are exact and replays reproduce them to the unit. Token kinds in a
:class:`~schemas.models.UsageReport` are disjoint, as the contract says (``streams.sdk.usage`` normalises provider
conventions): uncached input, output, cached reads, cache writes and reasoning tokens; a call's tokens are their
sum, and each is charged once at its own price. A model missing from the table is priced at the table's
``fallback`` and reported ``estimated``. The other surfaces have one price each: per tool call, per retrieval (a
chunk or memory that entered a context) and per stored GB-day (content kept by the projections; an estimate, since
what storage costs depends on how long it is kept).

The bundled :data:`DEFAULT_PRICES` are illustrative list prices; operators load their own table and every
cost carries the table's ``version``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ctxflow.schemas.models import UsageReport

_PER_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Micro-USD per million tokens of each kind."""

    input: int
    output: int
    cached_read: int
    cache_write: int
    reasoning: int


@dataclass(frozen=True, slots=True)
class Cost:
    """A priced amount: ``micros`` of USD, the table ``version`` used, and whether the price was a guess."""

    micros: int
    version: str
    estimated: bool


def usage_tokens(report: UsageReport) -> int:
    """All tokens a provider call consumed (the kinds are disjoint, see the module docstring)."""
    return (
        report.input_tokens
        + report.output_tokens
        + report.cached_read_tokens
        + report.cache_write_tokens
        + report.reasoning_tokens
    )


def prompt_tokens(report: UsageReport) -> int:
    """The tokens the provider read as the prompt: uncached input, cache reads and cache writes."""
    return report.input_tokens + report.cached_read_tokens + report.cache_write_tokens


def usage_incomplete(report: UsageReport) -> bool:
    """Whether a report's counts are not the call's consumption: an interrupted stream (``complete=false``), or no
    tokens at all (gateways log streamed calls at zero: such a call is estimated, never recorded as free)."""
    return not report.complete or usage_tokens(report) == 0


def _micros(tokens: int, per_mtok: int) -> int:
    # Round half up per line item so every replay sums the same integers.
    return (tokens * per_mtok + _PER_MTOK // 2) // _PER_MTOK


_PER_GB = 1_000_000_000


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by model-name prefix (longest prefix wins), with a fallback for unknown models."""

    version: str
    prices: Mapping[str, ModelPrice]
    fallback: ModelPrice
    #: Micro-USD per tool call issued.
    tool_call: int = 0
    #: Micro-USD per retrieval (a retrieved chunk or memory entering a run's context).
    retrieval: int = 0
    #: Micro-USD per GB of content stored for a day.
    gb_day: int = 0
    _memo: dict[str, tuple[ModelPrice, bool]] = field(default_factory=dict, compare=False, repr=False)

    def price(self, model: str) -> tuple[ModelPrice, bool]:
        """``(price, estimated)`` for ``model``; estimated is True when the fallback was used."""
        found = self._memo.get(model)
        if found is None:
            best = max((p for p in self.prices if model.startswith(p)), key=len, default=None)
            found = (self.prices[best], False) if best is not None else (self.fallback, True)
            self._memo[model] = found
        return found

    def usage_cost(self, report: UsageReport) -> Cost:
        """The cost of one provider call."""
        price, estimated = self.price(report.model)
        micros = (
            _micros(report.input_tokens, price.input)
            + _micros(report.output_tokens, price.output)
            + _micros(report.cached_read_tokens, price.cached_read)
            + _micros(report.cache_write_tokens, price.cache_write)
            + _micros(report.reasoning_tokens, price.reasoning)
        )
        return Cost(micros, self.version, estimated)

    def estimate_cost(self, model: str | None, tokens: int) -> Cost:
        """The cost of ``tokens`` estimated consumption, priced as uncached input; always ``estimated``."""
        price = self.price(model)[0] if model else self.fallback
        return Cost(_micros(tokens, price.input), self.version, True)

    def tool_cost(self, calls: int) -> Cost:
        """The cost of ``calls`` tool calls (observed: the calls were issued)."""
        return Cost(calls * self.tool_call, self.version, False)

    def retrieval_cost(self, retrievals: int) -> Cost:
        """The cost of ``retrievals`` retrievals (observed)."""
        return Cost(retrievals * self.retrieval, self.version, False)

    def storage_cost(self, byte_days: int) -> Cost:
        """The cost of storing ``byte_days`` (bytes x days kept); always ``estimated``."""
        return Cost((byte_days * self.gb_day + _PER_GB // 2) // _PER_GB, self.version, True)


def _usd(input_: float, output: float, cached: float, write: float | None = None) -> ModelPrice:
    """Build a price from USD per million tokens (reasoning is billed as output)."""
    m = _PER_MTOK
    return ModelPrice(
        round(input_ * m),
        round(output * m),
        round(cached * m),
        round((input_ if write is None else write) * m),
        round(output * m),
    )


DEFAULT_PRICES = PriceTable(
    version="list-2025-06.2",
    prices={
        "gpt-4o-mini": _usd(0.15, 0.60, 0.075),
        "gpt-4o": _usd(2.50, 10.00, 1.25),
        "gpt-4.1": _usd(2.00, 8.00, 0.50),
        "gpt-4": _usd(30.00, 60.00, 30.00),
        "gpt-3.5": _usd(0.50, 1.50, 0.50),
        "o3": _usd(2.00, 8.00, 0.50),
        "claude-3-5-haiku": _usd(0.80, 4.00, 0.08, 1.00),
        "claude-sonnet": _usd(3.00, 15.00, 0.30, 3.75),
        "claude-3-7-sonnet": _usd(3.00, 15.00, 0.30, 3.75),
        "claude-opus": _usd(15.00, 75.00, 1.50, 18.75),
        "gemini-2.5-pro": _usd(1.25, 10.00, 0.31),
        "gemini-2.5-flash": _usd(0.30, 2.50, 0.075),
    },
    fallback=_usd(3.00, 15.00, 0.30),
    tool_call=100,  # $0.10 per thousand calls
    retrieval=40,  # $0.04 per thousand retrievals
    gb_day=3_333,  # $0.10 per GB-month
)
"""Illustrative list prices (USD per million tokens converted to micro-USD); replace with the real table."""
