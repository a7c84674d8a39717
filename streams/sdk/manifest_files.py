"""Tenant manifest files: read one from disk, validate it completely, and decide its version.

Formats, chosen by suffix: ``.json`` (always), ``.toml`` (stdlib ``tomllib``; TOML has no null, so leave a
field out to mean null) and ``.yaml``/``.yml`` (only when PyYAML is importable: it is a dev dependency, so a
production install reads JSON and TOML). A file holds the fields of ``schemas.models.TenantManifest``;
``version`` is optional (the next version is assigned at publish time) and ``updated_at``/``updated_by`` are
stamped by ``ctxflow tenants set`` (a value in the file is replaced), so the output of ``tenants get --json``
(its ``manifest`` member) can be edited and set again.

Validation reports *every* problem at once, each as ``field.path: what is wrong (what is allowed)``: the
schema checks of the pydantic model first, then, for a manifest that passes them, the consistency checks
of :func:`processors.manifest.manifest_problems`.

Versions are monotonic per tenant: the worker applies a manifest only if its version is above the one it
holds (:class:`processors.budget.BudgetProcessor`), so a stale version would be published yet silently
ignored. :func:`assign_version` refuses it before publishing instead.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctxflow.processors.manifest import manifest_problems
from ctxflow.schemas.models import TenantManifest
from pydantic import BaseModel, ValidationError

#: Map-valued manifest fields: a location part after them is a key (``user_overrides['bob']``), not a field.
_MAPS = frozenset({"user_overrides", "tokenizers"})
_STAMPED = ("updated_at", "updated_by")
SUFFIXES = (".json", ".toml", ".yaml", ".yml")


class ManifestFileError(ValueError):
    """A manifest file that cannot be published; ``problems`` holds one line per thing to fix."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source, self.problems = source, problems


class StaleVersion(ValueError):
    """A requested version not above the tenant's latest published version."""


@dataclass(frozen=True, slots=True)
class ManifestDraft:
    """A validated manifest not yet published: ``requested_version`` is None when the file gave none."""

    manifest: TenantManifest
    requested_version: int | None


def read_document(path: Path) -> dict[str, Any]:
    """The mapping stored in ``path``; raises :class:`ManifestFileError` saying why it cannot be read."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ManifestFileError(str(path), [f"unknown file type {suffix or '(none)'!r}: use one of {SUFFIXES}"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestFileError(str(path), [f"cannot read the file: {error}"]) from error
    try:
        document = _parse(text, suffix)
    except ManifestFileError as error:
        raise ManifestFileError(str(path), error.problems) from error
    except ValueError as error:  # JSONDecodeError, TOMLDecodeError and yaml.YAMLError all say where
        raise ManifestFileError(str(path), [f"not valid {suffix[1:].upper()}: {error}"]) from error
    if not isinstance(document, dict):
        kind = type(document).__name__
        raise ManifestFileError(str(path), [f"the top level must be a mapping of fields, not a {kind}"])
    return document


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    try:
        import yaml
    except ImportError:
        raise ManifestFileError("", ["YAML needs PyYAML (pip install pyyaml); JSON and TOML work without it"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from error


def validate_document(document: dict[str, Any], source: str, now: datetime | None = None) -> ManifestDraft:
    """Validate a manifest mapping; raise :class:`ManifestFileError` listing every problem it has."""
    fields = {k: v for k, v in document.items() if k not in _STAMPED}
    requested = fields.get("version")
    if requested is None:
        fields["version"] = 1  # a placeholder, so a file without a version still validates
    fields["updated_at"] = now or datetime.now(UTC)
    try:
        manifest = TenantManifest.model_validate(fields)
    except ValidationError as error:
        raise ManifestFileError(source, [_describe(e) for e in error.errors()]) from error
    problems = manifest_problems(manifest)
    if problems:
        raise ManifestFileError(source, problems)
    return ManifestDraft(manifest, None if requested is None else manifest.version)


def load_manifest(path: Path, now: datetime | None = None) -> ManifestDraft:
    """Read and validate the manifest file at ``path`` (see the module docstring for formats)."""
    return validate_document(read_document(path), str(path), now)


def _describe(error: Any) -> str:
    loc: tuple[Any, ...] = error["loc"]
    where = field_path(loc) or "(manifest)"
    message: str = error["msg"]
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return f"{where}: unknown field (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    got = error.get("input")
    return f"{where}: {message}" + ("" if isinstance(got, dict | list) else f" (got {got!r})")


def field_path(loc: Iterable[Any]) -> str:
    """``('user_overrides', 'bob', 'total_cap')`` -> ``user_overrides['bob'].total_cap``; indexes as ``[i]``."""
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif previous in _MAPS:
            out += f"[{part!r}]"
        elif part != "[key]":
            out += f".{part}" if out else str(part)
        previous = part
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = TenantManifest
    previous = None
    for part in loc:
        if model is not None and isinstance(part, str) and previous not in _MAPS and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
        previous = part
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation if issubclass(annotation, BaseModel) else None
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def latest_version(history: Iterable[TenantManifest]) -> int | None:
    """The highest version published for a tenant (None when it has none): what the worker holds."""
    return max((m.version for m in history), default=None)


def assign_version(tenant_id: str, requested: int | None, latest: int | None) -> int:
    """The version to publish: ``latest + 1`` (or 1) when none was requested; raise :class:`StaleVersion`
    when ``requested`` is not above ``latest`` (the worker would ignore it)."""
    if requested is None:
        return (latest or 0) + 1
    if latest is not None and requested <= latest:
        raise StaleVersion(
            f"tenant {tenant_id!r} is at version {latest}: version {requested} would be ignored (versions only "
            f"grow); publish {latest + 1} or more, or leave the version out (or pass --version auto)"
        )
    return requested


def stamp(manifest: TenantManifest, version: int, now: datetime, by: str | None) -> TenantManifest:
    """``manifest`` with its version and update stamp set, validated again (timestamps cut to milliseconds)."""
    return TenantManifest.model_validate(
        {**manifest.model_dump(), "version": version, "updated_at": now, "updated_by": by}
    )


def first_with_version(history: Iterable[TenantManifest], version: int) -> TenantManifest | None:
    """The earliest published manifest with ``version``: the one the worker applies when two raced."""
    return next((m for m in history if m.version == version), None)


def latest_per_tenant(entries: Iterable[tuple[str, TenantManifest | None]]) -> dict[str, TenantManifest]:
    """The manifest the worker enforces per tenant, from a manifests log read in offset order: the first one
    published with the tenant's highest version (the worker applies a version only above the one it holds, so
    a stale or raced version published later changes nothing). A null value changes nothing either: the worker
    dead-letters it, and a tenant's budget changes only by a new version."""
    latest: dict[str, TenantManifest] = {}
    for tenant_id, manifest in entries:
        held = latest.get(tenant_id)
        if manifest is not None and (held is None or manifest.version > held.version):
            latest[tenant_id] = manifest
    return dict(sorted(latest.items()))
