"""The contract every consumer of agent records applies before using one: it decodes, and its key is its tenant."""

from __future__ import annotations

from typing import TypeVar

from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import ContractViolation
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def decode_record(codec: Codec, value: bytes | None, key: bytes | None, model: type[M], *, keyed: bool) -> M:
    """The validated ``model`` in ``value``; with ``keyed``, a key (when present) must be the record's tenant id.

    Raises a :class:`~schemas.contract.RejectedRecord` subclass (the dead letter's reason) for anything else.
    """
    if value is None:
        raise ContractViolation("record has no value (a null value is not a ctxflow record)")
    event = codec.decode(value, model)
    if keyed and key is not None:
        tenant_id: str = event.tenant_id  # type: ignore[attr-defined]
        if key.decode(errors="replace") != tenant_id:
            raise ContractViolation(
                f"record key {key!r} is not its tenant_id {tenant_id!r}: key tenant records by tenant_id "
                "so one partition owns each tenant",
                tenant_id=tenant_id,
            )
    return event
