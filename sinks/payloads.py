"""Content-addressed payload store for memory content above the inline limit (issue 15, item 2).

The memory processor emits a :class:`~processors.memory.processor.PayloadWrite` for content too large to inline
on the compacted ``memory.records`` topic; the shell stores it here *before* producing the record that names it,
so a published ``payload_ref`` always resolves. Keys are ``<tenant>/sha256/<2 hex>/<64 hex>``: the tenant first
(a bucket policy or a directory permission can isolate it), then the content's sha256, so a write is idempotent
and a read can prove the bytes are the ones the record's ``content_digest`` names.

:class:`LocalPayloadStore` (a directory: the default) is the only implementation today; an S3-compatible one
implements the same three methods.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/sha256/(?P<prefix>[0-9a-f]{2})/(?P<digest>[0-9a-f]{64})$")


class CorruptPayload(ValueError):
    """Stored bytes whose sha256 is not the one their key names."""


def check_ref(ref: str) -> str:
    """The digest a payload key names; raises ``ValueError`` for any other key (no path can escape the root)."""
    match = _REF.match(ref)
    if match is None or match["prefix"] != match["digest"][:2]:
        raise ValueError(f"not a payload key: {ref!r}")
    return match["digest"]


class PayloadStore(Protocol):
    """Where large memory payloads live, by content address."""

    def put(self, ref: str, content: bytes) -> None:
        """Store ``content`` under ``ref`` (idempotent); raises :class:`CorruptPayload` if it does not hash to it."""
        ...

    def get(self, ref: str) -> bytes:
        """The content under ``ref``; ``KeyError`` when absent, :class:`CorruptPayload` when damaged."""
        ...

    def delete(self, ref: str) -> None:
        """Remove the content (a revocation's cascade); deleting an absent key is harmless."""
        ...


class LocalPayloadStore:
    """:class:`PayloadStore` in a local directory; writes are atomic (temporary file, fsync, rename).

    Tenant directories are told apart by case (``acme`` and ``ACME`` are two tenants), so the root must be on a
    case-sensitive filesystem.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, ref: str) -> tuple[Path, str]:
        digest = check_ref(ref)
        return self.root / ref, digest

    def put(self, ref: str, content: bytes) -> None:
        """Store ``content`` under ``ref`` unless the same bytes are already there."""
        path, digest = self._path(ref)
        if hashlib.sha256(content).hexdigest() != digest:
            raise CorruptPayload(f"{ref}: content does not hash to its key")
        if path.exists():
            return  # content-addressed: the same key always holds the same bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, ref: str) -> bytes:
        """The stored bytes, verified against the key."""
        path, digest = self._path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(ref) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptPayload(f"{ref}: stored bytes do not hash to their key")
        return data

    def delete(self, ref: str) -> None:
        """Remove the payload if present."""
        path, _ = self._path(ref)
        path.unlink(missing_ok=True)
