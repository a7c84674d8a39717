"""The ctxflow event contract: Avro schemas (``schemas/avro``), pydantic models and the codec."""

from ctxflow.schemas.codec import Codec, SchemaVersion, kept_schemas
from ctxflow.schemas.contract import ContractViolation, RejectedRecord, Undecodable, UnknownSchema
from ctxflow.schemas.models import MODEL_SCHEMAS, content_digest
from ctxflow.schemas.registry import RegistryError, RegistryUnavailable

__all__ = [
    "MODEL_SCHEMAS",
    "Codec",
    "ContractViolation",
    "RegistryError",
    "RegistryUnavailable",
    "RejectedRecord",
    "SchemaVersion",
    "Undecodable",
    "UnknownSchema",
    "content_digest",
    "kept_schemas",
]
