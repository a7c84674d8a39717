"""An optional summarizer behind an OpenAI-compatible ``/chat/completions`` endpoint, with an extractive fallback.

Configured from the environment by :class:`EndpointSettings` (``CTXFLOW_SUMMARIZER_URL``,
``CTXFLOW_SUMMARIZER_MODEL``, optional ``CTXFLOW_SUMMARIZER_API_KEY``); without a URL and a model the summarizer
worker runs the extractive summarizer alone (:func:`configured_summarizer`).

The endpoint writes the text; everything else is decided here: depth (one more than the deepest source, at most
``MAX_DEPTH``), the fidelity score (computed locally, as for the extractive summarizer: the share of the sources'
identifiers and numbers, by :func:`processors.eviction.features.extract`, that the text keeps verbatim), and the
token budget (a reply over ``max_tokens`` as the job's model counts it is not used). On any failure (the endpoint
does not answer within ``timeout_s``, answers an error, an empty or over-long text) it logs a warning and returns
the fallback's summary, which names the fallback as its summarizer: a summary always says who wrote it.
"""

from __future__ import annotations

import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from ctxflow.processors.eviction.features import extract
from ctxflow.processors.eviction.summarizer import (
    MAX_DEPTH,
    ExtractiveSummarizer,
    SourceItem,
    Summary,
    SummaryRefused,
    measure_fidelity,
)
from ctxflow.schemas.models import content_digest
from ctxflow.streams.summarizer.jobs import Summarizer
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You compress part of an AI agent's working context so the agent can continue its task without the originals. "
    "Write a dense, factual summary of the numbered items. Copy verbatim, character for character: every "
    "identifier (ids, names of files, paths, URLs, emails, functions, tickets, versions, hashes), every number "
    "with its unit, every date and time, every decision taken and every constraint or requirement stated (must, "
    "never, at most...), and the user's goal. Never paraphrase or round them. Attribute statements to their role "
    "where it matters. Leave out pleasantries and repetition. Do not add facts, advice or commentary. "
    "Answer with the summary text only."
)


class EndpointSettings(BaseSettings):
    """Where the OpenAI-compatible summarizer is, from the environment.

    - ``CTXFLOW_SUMMARIZER_URL``: the API's base URL (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``
      for a local vLLM or llama.cpp server); requests go to ``{url}/chat/completions``.
    - ``CTXFLOW_SUMMARIZER_MODEL``: the model name sent with each request.
    - ``CTXFLOW_SUMMARIZER_API_KEY`` (optional): sent as ``Authorization: Bearer <key>``; never logged.

    Both the URL and the model must be set for the endpoint to be used.
    """

    model_config = SettingsConfigDict(env_prefix="CTXFLOW_SUMMARIZER_", extra="ignore")

    url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url and self.model)


class EndpointFailed(RuntimeError):
    """The endpoint gave no usable summary (the reason is the message; the fallback is used instead)."""


def fidelity(sources: Sequence[SourceItem], text: str) -> float:
    """The share of the sources' identifiers and numbers that ``text`` keeps verbatim as whole words (1.0 when they
    have none): the extractive summarizer's measure (``measure_fidelity``) over the same terms."""
    terms: set[str] = set()
    for source in sources:
        features = extract(source.text)
        terms |= features.identifiers | features.numbers
    return measure_fidelity(terms, text)


class EndpointSummarizer:
    """Summaries written by an OpenAI-compatible chat model; the fallback's when the endpoint fails.

    Guarantees: the same provenance rules as the extractive summarizer (depth, source ids and digests, a locally
    computed fidelity); ``SummaryRefused`` for a depth past ``MAX_DEPTH`` or no sources, before any request;
    otherwise always a summary.
    """

    version = "1"

    def __init__(self, settings: EndpointSettings, fallback: Summarizer | None = None, *, timeout_s: float = 30.0,
                 max_reply_tokens: int | None = None) -> None:
        if not settings.enabled:
            raise ValueError("EndpointSummarizer needs CTXFLOW_SUMMARIZER_URL and CTXFLOW_SUMMARIZER_MODEL")
        self.settings = settings
        self.name = f"openai-compatible:{settings.model}"
        self.fallback = fallback or ExtractiveSummarizer()
        self._url = f"{(settings.url or '').rstrip('/')}/chat/completions"
        self._timeout_s = timeout_s
        self._max_reply_tokens = max_reply_tokens
        self.failures = 0

    def summarize(self, sources: Sequence[SourceItem], max_tokens: int, count: Callable[[str], int]) -> Summary:
        """A summary of ``sources`` within ``max_tokens`` (see the class docstring)."""
        if not sources:
            raise SummaryRefused("nothing to summarize")
        depth = max(source.depth for source in sources) + 1
        if depth > MAX_DEPTH:
            raise SummaryRefused(f"a summary of these sources would be {depth} deep; at most {MAX_DEPTH} is allowed")
        try:
            text = self._complete(sources, max_tokens)
            if count(text) > max_tokens:
                raise EndpointFailed(f"the reply has {count(text)} tokens, over the budget of {max_tokens}")
        except (EndpointFailed, OSError, http.client.HTTPException, ValueError) as error:  # URLError, timeouts: OSError
            self.failures += 1
            log.warning("summarizer endpoint failed; using the fallback summarizer",
                        extra={"endpoint": self._url, "model": self.settings.model, "error": str(error)[:300],
                               "fallback": self.fallback.name})
            return self.fallback.summarize(sources, max_tokens, count)
        return Summary(
            text=text,
            source_ids=tuple(source.item_id for source in sources),
            source_digests=tuple(content_digest(source.text) for source in sources),
            summarizer=self.name,
            version=self.version,
            depth=depth,
            fidelity=fidelity(sources, text),
        )

    def _complete(self, sources: Sequence[SourceItem], max_tokens: int) -> str:
        body = {
            "model": self.settings.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": _prompt(sources, max_tokens)},
            ],
            "max_tokens": self._max_reply_tokens or max_tokens,
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.api_key.get_secret_value()}"
        request = urllib.request.Request(self._url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise EndpointFailed(f"HTTP {error.code}: {error.read()[:200]!r}") from error
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise EndpointFailed("the reply has no choices[0].message.content") from error
        if not isinstance(text, str) or not text.strip():
            raise EndpointFailed("the reply's summary is empty")
        return text.strip()


def _prompt(sources: Sequence[SourceItem], max_tokens: int) -> str:
    parts = [f"Summarize these {len(sources)} items in at most {max_tokens} tokens."]
    for number, source in enumerate(sources, 1):
        said_by = " ".join(part for part in (source.role, source.label) if part)
        parts.append(f"[{number}] {source.item_id}" + (f" ({said_by})" if said_by else "") + f":\n{source.text}")
    return "\n\n".join(parts)


def configured_summarizer(settings: EndpointSettings | None = None) -> Summarizer:
    """The endpoint summarizer when the environment configures one, else the extractive summarizer."""
    settings = settings or EndpointSettings()
    return EndpointSummarizer(settings) if settings.enabled else ExtractiveSummarizer()
