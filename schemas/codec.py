"""Avro encoding and decoding of every ctxflow record: the only module that imports fastavro.

Wire formats (a reader accepts both):

* Avro single-object encoding (default): ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the
  writer schema's Parsing Canonical Form + Avro binary body. The fingerprint must name a kept schema version.
* Confluent framing (with a schema registry): ``00`` + 4-byte big-endian schema id + Avro binary body. Schemas
  are registered under the fully qualified record name (RecordNameStrategy, e.g. ``ctxflow.TurnEvent``).

Schemas are parsed once per process. A decode resolves the writer version to the reader version (the newest
kept one unless overridden), validates the contract and returns the pydantic model; anything else raises a
:class:`~schemas.contract.RejectedRecord` subclass that the dead-letter path can store as is.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, TypeVar, cast

from ctxflow.schemas.contract import (
    ContractLimits,
    ContractViolation,
    RejectedRecord,
    Undecodable,
    UnknownSchema,
    check_limits,
    declares_no_retention,
    explain,
    tenant_of,
)
from ctxflow.schemas.models import MODEL_SCHEMAS
from ctxflow.schemas.registry import SchemaNotFound, SchemaRegistryClient
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaValidator

M = TypeVar("M", bound=BaseModel)

NAMESPACE = "ctxflow"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_]\w*)\.v(?P<version>[1-9]\d*)\.avsc$")


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One kept version of a record schema, parsed once.

    ``canonical`` is its Parsing Canonical Form; ``fingerprint`` the 8 wire bytes (CRC-64-AVRO of
    ``canonical``, little-endian).
    """

    name: str
    version: int
    text: str
    parsed: dict[str, Any]
    canonical: str
    fingerprint: bytes

    @property
    def full_name(self) -> str:
        """``ctxflow.<Record>``: the Avro full name and the registry subject."""
        return f"{NAMESPACE}.{self.name}"

    @property
    def label(self) -> str:
        """``ctxflow.<Record> v<N>``, as used in rejection reasons."""
        return f"{self.full_name} v{self.version}"


def _parse(text: str) -> tuple[dict[str, Any], str, bytes]:
    # named_schemas per schema: each file defines its enums and nested records on its own.
    parsed = parse_schema(json.loads(text), named_schemas={})
    canonical = to_parsing_canonical_form(parsed)
    return parsed, canonical, bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


@functools.cache
def kept_schemas() -> dict[str, tuple[SchemaVersion, ...]]:
    """Every released schema version by record name, oldest first (read from ``schemas/avro``)."""
    found: dict[str, list[SchemaVersion]] = {}
    for entry in resources.files("ctxflow.schemas").joinpath("avro").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        text = entry.read_text(encoding="utf-8")
        parsed, canonical, fp = _parse(text)
        version = SchemaVersion(match["name"], int(match["version"]), text, parsed, canonical, fp)
        if parsed["name"] != version.full_name:
            raise ValueError(f"{entry.name} defines {parsed['name']}, expected {version.full_name}")
        found.setdefault(version.name, []).append(version)
    return {name: tuple(sorted(vs, key=lambda v: v.version)) for name, vs in found.items()}


@functools.cache
def _by_fingerprint() -> dict[bytes, SchemaVersion]:
    table: dict[bytes, SchemaVersion] = {}
    for versions in kept_schemas().values():
        for v in versions:
            if v.fingerprint in table:
                raise ValueError(f"{v.label} and {table[v.fingerprint].label} share a fingerprint")
            table[v.fingerprint] = v
    return table


def _pick(overrides: Mapping[str, int] | None) -> dict[str, SchemaVersion]:
    chosen = {name: versions[-1] for name, versions in kept_schemas().items()}
    for name, wanted in (overrides or {}).items():
        matches = [v for v in kept_schemas().get(name, ()) if v.version == wanted]
        if not matches:
            raise ValueError(f"no kept schema {name} v{wanted}")
        chosen[name] = matches[0]
    return chosen


class _Plan(NamedTuple):
    """How to read one writer schema: resolved once per fingerprint or schema id."""

    name: str
    label: str
    writer: dict[str, Any]
    reader: dict[str, Any] | None  # None: read with the writer schema alone (fast), then reshape
    fill: tuple[tuple[str, Any], ...]  # reader fields the writer lacks, with their defaults
    drop: tuple[str, ...]  # writer fields the reader lacks
    tenant_at: int | None  # string fields before tenant_id, when all leading fields are strings


def _shortcut(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> _Plan | None:
    """Fill and drop lists when writer and reader differ only by whole fields with plain defaults.

    fastavro resolves field by field on every record; when the shared fields have identical types, reading
    with the writer schema alone and then adding defaults gives the same result at no resolution cost.
    """
    w_fields = {f["name"]: f for f in writer["fields"]}
    r_fields = {f["name"]: f for f in reader["fields"]}
    shared = w_fields.keys() & r_fields.keys()
    if any(_undoc(w_fields[n]["type"]) != _undoc(r_fields[n]["type"]) for n in shared):
        return None
    fill = []
    for name in [n for n in r_fields if n not in w_fields]:
        field = r_fields[name]
        if "default" not in field or _converted(field["type"]):
            return None
        fill.append((name, field["default"]))
    return _Plan("", "", writer, None, tuple(fill), tuple(n for n in w_fields if n not in r_fields), None)


def _undoc(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_undoc(s) for s in schema]
    if isinstance(schema, dict):
        return {k: _undoc(v) for k, v in schema.items() if k != "doc"}
    return schema


def _converted(schema: Any) -> bool:
    """True when a JSON default of this type is not already the Python value fastavro would return."""
    if isinstance(schema, list):
        return any(_converted(s) for s in schema)
    if isinstance(schema, str):
        return schema in ("bytes", "fixed")
    if "logicalType" in schema or schema.get("type") in ("bytes", "fixed"):
        return True
    nested = [schema[k] for k in ("items", "values") if k in schema]
    nested += [f["type"] for f in schema.get("fields", ())]
    return any(_converted(s) for s in nested)


def _record_name(model: type[BaseModel]) -> str:
    name = MODEL_SCHEMAS.get(model)
    if name is None:
        raise TypeError(f"{model.__name__} is not a top-level ctxflow record (see schemas.MODEL_SCHEMAS)")
    return name


def _tenant_position(parsed: Mapping[str, Any]) -> int | None:
    for index, field in enumerate(parsed["fields"]):
        if field["type"] != "string":
            return None
        if field["name"] == "tenant_id":
            return index
    return None


def _peek_tenant(data: bytes, offset: int, skip: int | None) -> str | None:
    """The tenant id of a body that failed to decode, when its leading string fields are intact."""
    if skip is None:
        return None
    try:
        for index in range(skip + 1):
            length, offset = _read_long(data, offset)
            if length < 0 or offset + length > len(data):
                return None
            if index == skip:
                return tenant_of({"tenant_id": data[offset : offset + length].decode("utf-8")})
            offset += length
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _read_long(data: bytes, offset: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 63:
            return (result >> 1) ^ -(result & 1), offset
        shift += 7


class Codec:
    """Encodes models to Avro bytes and decodes bytes back to validated models.

    ``reader_versions``/``writer_versions`` pin a record to an older kept version, to act as an older
    consumer or producer (compatibility tests, rolling upgrades). Without ``registry_url`` records use
    single-object encoding; with it, Confluent framing. Registry outages raise
    :class:`~schemas.registry.RegistryUnavailable`, never a rejection: the record is not at fault.
    """

    def __init__(
        self,
        registry_url: str | None = None,
        max_content_bytes: int = 262144,
        *,
        reader_versions: Mapping[str, int] | None = None,
        writer_versions: Mapping[str, int] | None = None,
    ) -> None:
        self._limits = ContractLimits(max_content_bytes=max_content_bytes)
        self._readers = _pick(reader_versions)
        self._writers = _pick(writer_versions)
        self._registry = SchemaRegistryClient(registry_url) if registry_url else None
        self._plans: dict[bytes, _Plan] = {}
        self._id_plans: dict[int, _Plan] = {}
        self._headers: dict[str, bytes] = {}

    def encode(self, record: BaseModel) -> bytes:
        """Bytes of ``record`` written with this codec's writer version (the newest unless pinned).

        Raises :class:`ContractViolation` when the record breaks a deployment limit or cannot be written.
        """
        name = _record_name(type(record))
        values = record.model_dump()
        check_limits(values, name, self._limits)
        writer = self._writers[name]
        out = io.BytesIO()
        out.write(self._headers.get(name) or self._header(writer))
        try:
            schemaless_writer(out, writer.parsed, values)
        except (ValueError, TypeError, OverflowError, UnicodeError) as err:
            raise ContractViolation(
                f"{name} cannot be written as {writer.label}: {err}",
                tenant_id=tenant_of(values),
                no_retention=declares_no_retention(values),
            ) from err
        return out.getvalue()

    def decode(self, data: bytes, expected: type[M]) -> M:
        """The validated ``expected`` model in ``data``, read from any kept writer version.

        Raises :class:`Undecodable`, :class:`UnknownSchema` or :class:`ContractViolation`.
        """
        return cast(M, self._decode(data, _record_name(expected), expected.__pydantic_validator__))

    def decode_batch(
        self, items: Sequence[bytes], expected: type[M]
    ) -> tuple[list[M], list[tuple[int, RejectedRecord]]]:
        """Decode ``items`` in order: the models that passed, and ``(index in items, error)`` for the rest."""
        good: list[M] = []
        rejected: list[tuple[int, RejectedRecord]] = []
        decode, name, validator = self._decode, _record_name(expected), expected.__pydantic_validator__
        for index, data in enumerate(items):
            try:
                good.append(decode(data, name, validator))
            except RejectedRecord as err:
                rejected.append((index, err))
        return good, rejected

    def _decode(self, data: bytes, name: str, validator: SchemaValidator) -> Any:
        plan, offset = self._plan(data)
        if plan.name != name:
            raise UnknownSchema(f"expected {NAMESPACE}.{name}, got writer schema {plan.label}: wrong topic?")
        stream = io.BytesIO(data)
        stream.seek(offset)
        try:
            raw = schemaless_reader(stream, plan.writer, plan.reader)
        except SchemaResolutionError as err:
            raise UnknownSchema(f"{plan.label} cannot be resolved to this reader: {err}") from err
        except Exception as err:  # fastavro raises many types on corrupt input; all mean the same here
            raise Undecodable(
                f"{plan.label} body does not decode ({type(err).__name__}: {err}): truncated or corrupt",
                tenant_id=_peek_tenant(data, offset, plan.tenant_at),
            ) from err
        if stream.tell() != len(data):
            raise Undecodable(
                f"{len(data) - stream.tell()} trailing bytes after a {plan.label} body: mis-framed",
                tenant_id=tenant_of(raw),
                no_retention=declares_no_retention(raw),
            )
        if plan.fill or plan.drop:
            for field, default in plan.fill:
                raw[field] = copy.deepcopy(default) if isinstance(default, list | dict) else default
            for field in plan.drop:
                del raw[field]
        check_limits(raw, name, self._limits)
        try:
            return validator.validate_python(raw)
        except ValidationError as err:
            raise ContractViolation(
                explain(err, name), tenant_id=tenant_of(raw), no_retention=declares_no_retention(raw)
            ) from err

    def _plan(self, data: bytes) -> tuple[_Plan, int]:
        try:
            head = data[:2]
        except TypeError as err:  # e.g. None: a compaction tombstone carries no record
            raise Undecodable(f"record value is {type(data).__name__}, not bytes") from err
        if head == SINGLE_OBJECT_MAGIC and len(data) >= 10:
            key = data[2:10]
            plan = self._plans.get(key)
            return (plan if plan is not None else self._plan_for_fingerprint(key)), 10
        if head[:1] == CONFLUENT_MAGIC and len(data) >= 5:
            schema_id = int.from_bytes(data[1:5], "big")
            plan = self._id_plans.get(schema_id)
            return (plan if plan is not None else self._plan_for_id(schema_id)), 5
        raise Undecodable(
            "not a ctxflow record: expected Avro single-object encoding (C3 01 + 8-byte fingerprint) or "
            f"Confluent framing (00 + 4-byte schema id); got {len(data)} bytes: {data[:4].hex() or '-'}..."
        )

    def _plan_for_fingerprint(self, key: bytes) -> _Plan:
        writer = _by_fingerprint().get(key)
        if writer is None:
            kept = ", ".join(f"{n} v{v.version}" for n, vs in kept_schemas().items() for v in vs)
            raise UnknownSchema(
                f"writer schema fingerprint {key.hex()} is not a kept schema version ({kept}): "
                "the producer uses an unreleased schema or this consumer is older than it"
            )
        plan = self._plans[key] = self._make_plan(writer.name, writer.parsed, writer.label)
        return plan

    def _plan_for_id(self, schema_id: int) -> _Plan:
        if self._registry is None:
            raise UnknownSchema(
                f"Confluent-framed record (schema id {schema_id}) but this codec has no schema registry: "
                "set CTXFLOW_SCHEMA_REGISTRY_URL"
            )
        try:
            text = self._registry.schema(schema_id)
        except SchemaNotFound as err:
            raise UnknownSchema(f"schema id {schema_id} is not in the schema registry") from err
        try:
            parsed, _, key = _parse(text)
        except Exception as err:  # any malformed registry schema is equally unusable
            raise UnknownSchema(f"schema id {schema_id} is not a parseable Avro schema: {err}") from err
        kept = _by_fingerprint().get(key)
        full_name = str(parsed.get("name", ""))
        name = full_name.removeprefix(f"{NAMESPACE}.")
        if kept is None and (name not in self._readers or full_name != f"{NAMESPACE}.{name}"):
            raise UnknownSchema(f"schema id {schema_id} is {full_name or 'unnamed'}, not a ctxflow record")
        label = kept.label if kept else f"{NAMESPACE}.{name} (registry id {schema_id})"
        plan = self._id_plans[schema_id] = self._make_plan(name, kept.parsed if kept else parsed, label)
        return plan

    def _make_plan(self, name: str, writer: dict[str, Any], label: str) -> _Plan:
        reader = self._readers[name].parsed
        tenant_at = _tenant_position(writer)
        if reader is writer:
            return _Plan(name, label, writer, None, (), (), tenant_at)
        fast = _shortcut(writer, reader)
        if fast is None:
            return _Plan(name, label, writer, reader, (), (), tenant_at)
        return fast._replace(name=name, label=label, tenant_at=tenant_at)

    def _header(self, writer: SchemaVersion) -> bytes:
        if self._registry is None:
            header = SINGLE_OBJECT_MAGIC + writer.fingerprint
        else:
            schema_id = self._registry.register(writer.full_name, writer.text)
            self._id_plans.setdefault(schema_id, self._make_plan(writer.name, writer.parsed, writer.label))
            header = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        self._headers[writer.name] = header
        return header
