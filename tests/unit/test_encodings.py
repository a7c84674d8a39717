"""Offline encodings: o200k from bpe-openai's data is tiktoken's own o200k_base, loaded without a download."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken
from ctxflow.processors import encodings
from ctxflow.processors.encodings import O200K_BASE_SHA256, has_offline_encoding, offline_encoding
from ctxflow.processors.tokens import TokenCounter
from tiktoken_ext import openai_public

#: Where tiktoken_ext.openai_public.o200k_base downloads its ranks from (its tiktoken cache key).
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
#: Proxies on the discard port: any download attempt fails at once, on this machine, instead of leaving it.
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def test_o200k_is_exactly_tiktokens_own_o200k_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = offline_encoding("o200k_base")
    assert ours is not None
    # Give tiktoken's own constructor a cache holding the same bytes under its download's key, so it loads
    # without the network, checking them against its own pinned sha256.
    source = inspect.getsource(openai_public.o200k_base)
    assert O200K_URL in source and O200K_BASE_SHA256 in source, "tiktoken moved o200k_base: update the pins"
    data = encodings._decompressed(*encodings._O200K_DATA, O200K_BASE_SHA256).read_bytes()
    (tmp_path / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    theirs = tiktoken.Encoding(**openai_public.o200k_base())
    assert (ours.name, ours._pat_str, ours._special_tokens) == (theirs.name, theirs._pat_str, theirs._special_tokens)
    assert ours._mergeable_ranks == theirs._mergeable_ranks


def test_o200k_models_count_exactly_with_o200k_not_cl100k() -> None:
    # tiktoken's README example ids: "hello world" is [24912, 2375] in o200k_base and [15339, 1917] in cl100k.
    assert offline_encoding("o200k_base").encode("hello world") == [24912, 2375]  # type: ignore[union-attr]
    text = "Hello, 世界! Ünïcödé tokenization"
    counter = TokenCounter()
    for model in ("gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4.1-nano", "gpt-5", "o1", "o3-mini", "o4-mini"):
        counted = counter.count(text, model)
        assert (counted.tokens, counted.estimated, counted.method) == (10, False, "o200k_base"), model
    assert counter.count(text, "gpt-4").tokens == 16  # cl100k splits the same text into more tokens
    harmony = counter.count(text, "gpt-oss-120b")  # o200k_harmony: o200k's ranks, more special tokens
    assert (harmony.tokens, harmony.estimated) == (10, False)


def test_models_without_a_public_tokenizer_stay_flagged() -> None:
    counter = TokenCounter()
    for model in ("claude-sonnet-4-5", "gemini-2.5-pro", "llama-3.1-70b"):
        assert counter.count("some text to count", model).estimated, model
    assert counter.count("some text to count", "acme-llm-7b").method == "estimator"
    assert has_offline_encoding("o200k_base") and has_offline_encoding("o200k_harmony")
    assert not has_offline_encoding("p50k_base")


def test_a_damaged_cached_copy_is_written_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    damaged = tmp_path / f"o200k_base.tiktoken.{O200K_BASE_SHA256[:16]}"
    damaged.write_bytes(b"aGVsbG8= 0\n")
    assert encodings._o200k_base().encode("hello world") == [24912, 2375]
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == O200K_BASE_SHA256


def test_a_fresh_process_preloads_offline_into_tiktokens_cache(tmp_path: Path) -> None:
    """What a worker does at start (``TokenCounter.preload``), in a process that cannot reach any network."""
    script = textwrap.dedent("""
        import json, time
        start = time.perf_counter()
        from ctxflow.processors.tokens import TokenCounter
        counter = TokenCounter()
        counter.preload()
        took = time.perf_counter() - start
        print(json.dumps([counter.count("hello world", "gpt-4o").tokens, took]))
    """)
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path), **NO_NETWORK}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tokens, took = json.loads(done.stdout)
    assert tokens == 2
    assert took < 30, f"preload took {took:.1f}s"  # about a second on an idle core
    assert (tmp_path / f"o200k_base.tiktoken.{O200K_BASE_SHA256[:16]}").is_file()
    assert "no offline" not in done.stderr and "cannot load" not in done.stderr
