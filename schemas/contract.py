"""Contract checks beyond the Avro schema, and the errors a rejected record carries.

The codec raises a :class:`RejectedRecord` subclass for every record it will not hand to a processor. The
error says which field is wrong and what to fix, and carries what the dead-letter path needs: the tenant (when
it could be read and is a valid tenant id) and whether the payload must not be retained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ctxflow.schemas.models import TENANT_ID_PATTERN, PrivacyMode
from pydantic import ValidationError

ReasonCode = Literal["undecodable", "unknown_schema", "contract_violation", "processing_error"]

#: Fields whose values are payload, never metadata: they are not echoed into reasons.
PAYLOAD_FIELDS = frozenset({"content", "embedding", "original"})
#: Fields capped by ``ContractLimits.max_content_bytes``.
CAPPED_TEXT_FIELDS = ("content",)

_TENANT_RE = re.compile(TENANT_ID_PATTERN)
_MAX_ECHO = 80


class RejectedRecord(Exception):
    """A record the codec refuses, with what a dead letter needs.

    ``reason`` names the problem and the fix; ``tenant_id`` is set only when the bytes decoded far enough to
    read a *valid* tenant id (a malformed one must not route anywhere tenant-scoped); ``no_retention`` is True
    when the record decoded and declares ``privacy=no_retention``, so its bytes must not be kept.
    """

    reason_code: ClassVar[ReasonCode]

    def __init__(self, reason: str, *, tenant_id: str | None = None, no_retention: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tenant_id = tenant_id
        self.no_retention = no_retention

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason_code}: {self.reason!r}, tenant_id={self.tenant_id!r})"


class Undecodable(RejectedRecord):
    """The bytes are not a well-formed record of a known framing and schema."""

    reason_code = "undecodable"


class UnknownSchema(RejectedRecord):
    """The writer schema is not one this reader keeps (or not the record the topic carries)."""

    reason_code = "unknown_schema"


class ContractViolation(RejectedRecord):
    """The record decoded but breaks the contract (a field's value, a cross-field rule or a limit)."""

    reason_code = "contract_violation"


class OutsideDedupWindow(ContractViolation):
    """A run record older than its tenant's dedup window: its run's dedup state may be retired, so it could be
    counted twice; refused instead (the rule is in :mod:`processors.retention`)."""


class OutsideReorderWindow(ContractViolation):
    """A turn whose seq fell behind its run's reorder window (a later seq arrived more than
    ``processors.ledger.MAX_SEQ_GAP`` ahead, declaring the gap lost): it cannot be told from a duplicate, so it
    is refused rather than counted or dropped silently."""


class ProcessingFailed(RejectedRecord):
    """The record is valid but a processor could not apply it; the worker dead-letters it and goes on."""

    reason_code = "processing_error"


@dataclass(frozen=True, slots=True)
class ContractLimits:
    """Deployment limits that the schema cannot express."""

    #: Largest text payload accepted, in UTF-8 bytes.
    max_content_bytes: int = 256 * 1024


def check_limits(values: Mapping[str, Any], record_name: str, limits: ContractLimits) -> None:
    """Raise :class:`ContractViolation` when a record's field values exceed a deployment limit.

    Checked on the decoded values before model validation, so an oversized payload is never hashed or copied.
    The reason names the field, its size and the limit.
    """
    cap = limits.max_content_bytes
    for field in CAPPED_TEXT_FIELDS:
        text = values.get(field)
        # A character is at most 4 UTF-8 bytes, so short texts skip the encode.
        if not isinstance(text, str) or len(text) * 4 <= cap:
            continue
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > cap:
            raise ContractViolation(
                f"{record_name}.{field} is {size} UTF-8 bytes, over the limit of {cap}: "
                f"send a shorter {field} (or only content_digest)",
                tenant_id=tenant_of(values),
                no_retention=declares_no_retention(values),
            )


def tenant_of(raw: Mapping[str, Any]) -> str | None:
    """The record's tenant id when it is present and valid, else None."""
    tenant = raw.get("tenant_id")
    return tenant if isinstance(tenant, str) and _TENANT_RE.match(tenant) else None


def declares_no_retention(raw: Mapping[str, Any]) -> bool:
    """True when a decoded record says ``privacy=no_retention``."""
    return raw.get("privacy") == PrivacyMode.NO_RETENTION


def explain(error: ValidationError, record_name: str) -> str:
    """A reason naming each offending field, what was wrong and (for metadata fields) the value sent.

    Payload values (content, embeddings) are never echoed: the reason may be stored when the payload may not.
    """
    parts = []
    for issue in error.errors(include_url=False):
        loc = ".".join(str(p) for p in issue["loc"])
        where = f"{record_name}.{loc}" if loc else record_name
        parts.append(f"{where}: {issue['msg']}{_echo(issue['loc'], issue.get('input'))}")
    return "; ".join(parts)


def _echo(loc: tuple[int | str, ...], value: Any) -> str:
    if any(p in PAYLOAD_FIELDS for p in loc) or not loc:
        return ""
    if value is None or isinstance(value, bool | int | float):
        return f" (got {value!r})"
    if isinstance(value, str):
        return f" (got {value[:_MAX_ECHO]!r}{'...' if len(value) > _MAX_ECHO else ''})"
    return ""
