"""The OpenAI-compatible summarizer against a local stand-in endpoint (``http.server`` on a free loopback port):
what it sends, how it scores what comes back, and the extractive fallback when the endpoint fails."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem, SummaryRefused
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.models import content_digest
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.summarizer.endpoint import EndpointSettings, EndpointSummarizer, configured_summarizer, fidelity
from ctxflow.streams.summarizer.jobs import token_count_for

SOURCES = [
    SourceItem("i1", "Order ORD-10432 shipped on 2026-03-14.", role="user", label="user message"),
    SourceItem("i2", "Refund of $1,250.00 approved under ticket SUP-2291.", role="assistant", label="tool result"),
]
COUNT = token_count_for(TokenCounter(), "gpt-4o")


@dataclass
class StandIn:
    """What the stand-in endpoint answers, and the requests it saw."""

    url: str
    status: int = 200
    reply: Any = None
    delay_s: float = 0.0
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def answer(self, text: str) -> None:
        self.reply = {"id": "c1", "object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "stop"}]}


@pytest.fixture
def endpoint() -> Iterator[StandIn]:
    port = free_port()
    stand_in = StandIn(url=f"http://127.0.0.1:{port}/v1")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stand_in.requests.append((self.path, dict(self.headers), body))
            time.sleep(stand_in.delay_s)
            payload = json.dumps(stand_in.reply if stand_in.status == 200 else {"error": "overloaded"}).encode()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up (timeout)
                self.send_response(stand_in.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def summarizer_for(stand_in: StandIn, **kwargs: Any) -> EndpointSummarizer:
    return EndpointSummarizer(EndpointSettings(url=stand_in.url, model="local-7b", api_key="sk-test"), **kwargs)


def test_the_endpoint_writes_the_text_and_provenance_and_fidelity_are_computed_here(endpoint: StandIn) -> None:
    # Keeps ORD-10432, 2026-03-14 and SUP-2291; drops $1,250.00: three of the four terms the sources carry.
    endpoint.answer("ORD-10432 shipped 2026-03-14; a refund was approved (SUP-2291).")
    summary = summarizer_for(endpoint).summarize(SOURCES, 120, COUNT)

    assert summary.summarizer == "openai-compatible:local-7b" and summary.version == "1"
    assert summary.text == "ORD-10432 shipped 2026-03-14; a refund was approved (SUP-2291)."
    assert summary.source_ids == ("i1", "i2")
    assert summary.source_digests == tuple(content_digest(s.text) for s in SOURCES)
    assert summary.depth == 1
    assert summary.fidelity == pytest.approx(0.75)
    assert summary.fidelity == fidelity(SOURCES, summary.text)
    [(path, headers, body)] = endpoint.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "local-7b" and body["max_tokens"] == 120 and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system"
    for demand in ("verbatim", "identifier", "number", "date", "decision", "constraint"):
        assert demand in system["content"]
    assert user["role"] == "user"
    assert "[1] i1 (user user message):\nOrder ORD-10432" in user["content"]
    assert "[2] i2 (assistant tool result):\nRefund of $1,250.00" in user["content"]


def test_a_summary_of_a_summary_is_one_deeper_and_a_third_level_is_refused_before_any_request(
        endpoint: StandIn) -> None:
    endpoint.answer("ORD-10432 and SUP-2291.")
    summarizer = summarizer_for(endpoint)
    nested = [SourceItem("s1", "ORD-10432 and SUP-2291 (earlier summary).", depth=1), SOURCES[0]]
    assert summarizer.summarize(nested, 50, COUNT).depth == 2
    with pytest.raises(SummaryRefused):
        summarizer.summarize([SourceItem("s2", "a depth-2 summary", depth=2)], 50, COUNT)
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize("failure", ["http_500", "empty_reply", "malformed_reply", "over_budget", "timeout"])
def test_a_failing_endpoint_falls_back_to_the_extractive_summary_and_says_so(
        endpoint: StandIn, failure: str, caplog: pytest.LogCaptureFixture) -> None:
    if failure == "http_500":
        endpoint.status = 500
    elif failure == "empty_reply":
        endpoint.answer("   ")
    elif failure == "malformed_reply":
        endpoint.reply = {"choices": []}
    elif failure == "over_budget":
        endpoint.answer("word " * 400)
    else:
        endpoint.answer("too late")
        endpoint.delay_s = 1.0
    summarizer = summarizer_for(endpoint, timeout_s=0.3)
    with caplog.at_level(logging.WARNING):
        summary = summarizer.summarize(SOURCES, 60, COUNT)

    assert summary == ExtractiveSummarizer().summarize(SOURCES, 60, COUNT)
    assert summary.summarizer == "extractive"
    assert summarizer.failures == 1
    [record] = [r for r in caplog.records if r.getMessage().startswith("summarizer endpoint failed")]
    assert record.fallback == "extractive"  # type: ignore[attr-defined]
    assert "sk-test" not in record.error  # type: ignore[attr-defined]


def test_an_endpoint_nobody_listens_on_falls_back_at_once() -> None:
    summarizer = EndpointSummarizer(EndpointSettings(url=f"http://127.0.0.1:{free_port()}/v1", model="m"))
    began = time.monotonic()
    assert summarizer.summarize(SOURCES, 60, COUNT).summarizer == "extractive"
    assert time.monotonic() - began < 2


def test_the_environment_chooses_the_summarizer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(configured_summarizer(), ExtractiveSummarizer)
    monkeypatch.setenv("CTXFLOW_SUMMARIZER_URL", "http://127.0.0.1:9/v1")
    assert isinstance(configured_summarizer(), ExtractiveSummarizer)  # a URL without a model is not enough
    monkeypatch.setenv("CTXFLOW_SUMMARIZER_MODEL", "llama-3.1-8b")
    monkeypatch.setenv("CTXFLOW_SUMMARIZER_API_KEY", "sk-secret")
    chosen = configured_summarizer()
    assert isinstance(chosen, EndpointSummarizer) and chosen.name == "openai-compatible:llama-3.1-8b"
    assert chosen.settings.api_key is not None and chosen.settings.api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(chosen.settings)
