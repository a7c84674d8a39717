"""Token counting: supplied counts first, then the model's tiktoken encoding, then a flagged estimate.

Resolution of a model to a tokenizer, first match wins:

1. the tenant manifest's ``tokenizers`` map (exact model name, else the longest matching prefix);
2. tiktoken's own model table (:func:`processors.encodings.encoding_name_for_model`): OpenAI models count
   exactly, the o200k families (gpt-4o, gpt-4.1, gpt-5, o1/o3/o4) included;
3. :data:`DEFAULT_FAMILIES` (longest matching prefix): families without a public tokenizer (Claude, Gemini,
   Llama...) count with cl100k and are flagged ``estimated``, as a BPE count is far closer than chars/4;
4. the estimator, about four characters per token, always reported with ``estimated=True``.

Encodings load offline only (:mod:`processors.encodings`): a manifest names a public encoding
(``cl100k_base``, ``o200k_base``) and nothing is ever downloaded. An encoding ctxflow does not bundle counts
with the estimator, flagged.

Counts of content are cached by ``(encoding, content digest)`` in a bounded LRU, so static slots (system
prompt, tool schemas) sent with every run are tokenized once per worker. The cache only serves callers that
hold the content (a count is a pure function of it), never a digest-only lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import tiktoken
from ctxflow.processors.encodings import BUNDLED, encoding_name_for_model, offline_encoding
from ctxflow.schemas.models import TurnEvent, content_digest

ESTIMATOR = "estimator"
REPORTED = "reported"
UNKNOWN = "unknown"
CHARS_PER_TOKEN = 4

#: Model-name prefix -> (encoding, exact) for models tiktoken's table does not know. ``exact=False`` means the
#: encoding only approximates the model: these families publish no tokenizer ctxflow could load offline.
DEFAULT_FAMILIES: Mapping[str, tuple[str, bool]] = {
    prefix: ("cl100k_base", False)
    for prefix in ("claude", "gemini", "llama", "mistral", "mixtral", "qwen", "deepseek")
}

@dataclass(frozen=True, slots=True)
class TokenCount:
    """A token count and how it was obtained; ``estimated`` is True unless the count is exact."""

    tokens: int
    estimated: bool
    method: str


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """The encoding a model resolves to (``None``: the estimator) and whether it is the model's own."""

    encoding: str | None
    exact: bool


def estimate_tokens(text: str) -> int:
    """The fallback estimate: ceil(characters / 4)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def _longest_prefix(model: str, table: Mapping[str, object]) -> str | None:
    if model in table:
        return model
    best = None
    for prefix in table:
        if model.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


class TokenCounter:
    """The tokenizer registry with a digest-keyed LRU of counts.

    Guarantees: the same text, model and tokenizer map always give the same count; a count that is not exact
    says so (``estimated=True``); nothing is downloaded.
    """

    def __init__(self, families: Mapping[str, tuple[str, bool]] = DEFAULT_FAMILIES, cache_size: int = 65_536):
        self._families = dict(families)
        self._cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._cache_size = cache_size
        self._resolved: dict[tuple[str, tuple[tuple[str, str], ...]], Tokenizer] = {}
        self.hits = 0
        self.misses = 0

    def resolve(self, model: str, tokenizers: tuple[tuple[str, str], ...] = ()) -> Tokenizer:
        """The tokenizer for ``model`` given a manifest's ``tokenizers`` pairs (see the module docstring)."""
        key = (model, tokenizers)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolve(model, dict(tokenizers))
            if len(self._resolved) >= 4096:
                self._resolved.clear()
            self._resolved[key] = found
        return found

    def _resolve(self, model: str, tokenizers: Mapping[str, str]) -> Tokenizer:
        prefix = _longest_prefix(model, tokenizers)
        if prefix is not None:
            name = tokenizers[prefix]
            return Tokenizer(name, True) if self.encoding(name) is not None else Tokenizer(None, False)
        name = encoding_name_for_model(model)
        if name is not None and self.encoding(name) is not None:
            return Tokenizer(name, True)
        prefix = _longest_prefix(model, self._families)
        if prefix is not None:
            name, exact = self._families[prefix]
            if self.encoding(name) is not None:
                return Tokenizer(name, exact)
        return Tokenizer(None, False)

    def preload(self) -> None:
        """Load every encoding ctxflow bundles now, not on the first turn that needs one (about a second)."""
        for name in {*BUNDLED, *(name for name, _ in self._families.values())}:
            self.encoding(name)

    def encoding(self, name: str) -> tiktoken.Encoding | None:
        """The offline tiktoken encoding for a public encoding name, or None when none is bundled."""
        return offline_encoding(name)

    def count(
        self, text: str, model: str, tokenizers: tuple[tuple[str, str], ...] = (), digest: str | None = None
    ) -> TokenCount:
        """Count ``text`` for ``model``; ``digest`` (sha256 of text) saves hashing when the caller has it."""
        tok = self.resolve(model, tokenizers)
        key = (tok.encoding or ESTIMATOR, digest or content_digest(text))
        tokens = self._cache.get(key)
        if tokens is not None:
            self.hits += 1
            self._cache.move_to_end(key)
        else:
            self.misses += 1
            enc = self.encoding(tok.encoding) if tok.encoding else None
            tokens = len(enc.encode_ordinary(text)) if enc is not None else estimate_tokens(text)
            self._remember(key, tokens)
        return TokenCount(tokens, not tok.exact, key[0])

    def count_turn(
        self, turn: TurnEvent, tokenizers: tuple[tuple[str, str], ...] = (), digest: str | None = None
    ) -> TokenCount:
        """A turn's tokens: its ``token_count`` when present, else its content counted.

        ``digest`` saves hashing the content when the caller already has it. A digest-only turn without a
        count gets 0 with method ``unknown``. This worker-wide cache never
        answers digest-only lookups: a hit on a digest another tenant sent would tell the asker that the
        other tenant holds that content. The budget processor resolves them from the tenant's own table.
        """
        if turn.token_count is not None:
            return TokenCount(turn.token_count, False, REPORTED)
        if turn.content is not None:
            return self.count(turn.content, turn.model, tokenizers, digest or turn.content_digest)
        return TokenCount(0, True, UNKNOWN)

    def _remember(self, key: tuple[str, str], tokens: int) -> None:
        self._cache[key] = tokens
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
