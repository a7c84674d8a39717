"""Deterministic identity of a memory: the same thing promoted twice is the same record (a recorded merge).

``memory_id = "mem-" + blake2b-128(tenant, scope, owner, type, identity digest)`` where

* ``tenant`` is used exactly as sent: tenant ids are case-sensitive, so ``Acme`` and ``acme`` never share a
  memory (isolation outranks convenience);
* ``owner`` is the user id for user scope, the session id for session scope and empty for tenant and global
  scope (:func:`owner_of`): two users' identical preferences are two memories;
* the identity digest is the sha256 of the *normalised* content (:func:`normalise_content`): Unicode NFKC,
  case-folded, runs of whitespace collapsed to one space, leading/trailing whitespace and trailing sentence
  punctuation removed. So ``"Prefers dark mode."`` and ``"prefers  dark mode"`` are one memory, while any change
  of words, digits or signs is another. A candidate without content (digest only) uses its content digest.

The fields are joined with ``\\x1f`` (unit separator), which no id or enum value contains.
"""

from __future__ import annotations

import hashlib
import unicodedata
from hashlib import blake2b

from ctxflow.schemas.models import MemoryCandidate, MemoryScope, MemoryType

_TRAILING = ".!?;,。 "


def normalise_content(text: str) -> str:
    """The content as identity sees it (see the module docstring); idempotent."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split()).rstrip(_TRAILING)


def identity_digest(content: str | None, content_digest: str) -> str:
    """sha256 hex of the normalised content, or ``content_digest`` when only the digest is known."""
    if content is None:
        return content_digest
    return hashlib.sha256(normalise_content(content).encode("utf-8")).hexdigest()


def owner_of(scope: MemoryScope, user_id: str | None, session_id: str | None) -> str | None:
    """Who owns a memory inside its scope: user (user scope), session (session scope), nobody otherwise."""
    if scope is MemoryScope.USER:
        return user_id
    if scope is MemoryScope.SESSION:
        return session_id
    return None


def memory_id(tenant_id: str, scope: MemoryScope, owner: str | None, type_: MemoryType, digest: str) -> str:
    """The deterministic id of a memory; equal inputs give equal ids, any differing input a different id."""
    raw = "\x1f".join((tenant_id, scope.value, owner or "", type_.value, digest)).encode("utf-8")
    return "mem-" + blake2b(raw, digest_size=16).hexdigest()


def candidate_memory_id(candidate: MemoryCandidate) -> str:
    """The id the candidate's record has (or would have) in its target scope."""
    owner = owner_of(candidate.scope, candidate.user_id, candidate.session_id)
    digest = identity_digest(candidate.content, candidate.content_digest)
    return memory_id(candidate.tenant_id, candidate.scope, owner, candidate.type, digest)


def bucket_key(tenant_id: str, scope: MemoryScope, owner: str | None) -> str:
    """State key of the records sharing a tenant, scope and owner: what duplicates and conflicts compare."""
    return f"{tenant_id}:{scope.value}:{owner or ''}"


def verdict_id(tenant_id: str, candidate_id: str) -> str:
    """The id of the verdict on a candidate: a replay of the candidate reproduces it."""
    raw = "\x1f".join((tenant_id, candidate_id)).encode("utf-8")
    return "vrd-" + blake2b(raw, digest_size=16).hexdigest()
