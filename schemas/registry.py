"""A minimal Confluent Schema Registry client over the REST API (stdlib only).

Neither ``confluent-kafka`` nor ``python-schema-registry-client`` is a dependency, and the codec needs two
calls only: register a schema under a subject (idempotent: an already registered schema returns its id) and
fetch a schema by id. Credentials may ride in the URL (``https://user:secret@host``) and go out as basic auth.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(Exception):
    """The registry answered, but refused the request (e.g. an incompatible schema: HTTP 409)."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or failed (5xx): retry later; the record itself is not at fault."""


class SchemaNotFound(RegistryError):
    """The registry does not know the requested schema id."""


class SchemaRegistryClient:
    """Registers and fetches Avro schemas; every answer is a fresh HTTP call (the codec caches)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self._auth: str | None = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode()
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        self._base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._timeout_s = timeout_s

    def register(self, subject: str, schema: str) -> int:
        """The id of ``schema`` under ``subject``, registered when new (the registry checks compatibility)."""
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        answer = self._call("POST", path, {"schema": schema, "schemaType": "AVRO"})
        return int(answer["id"])

    def schema(self, schema_id: int) -> str:
        """The schema text registered under ``schema_id``; raises :class:`SchemaNotFound` when unknown."""
        answer = self._call("GET", f"/schemas/ids/{int(schema_id)}", None)
        return str(answer["schema"])

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Accept": _CONTENT_TYPE}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = _CONTENT_TYPE
        if self._auth:
            headers["Authorization"] = self._auth
        request = urllib.request.Request(self._base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if err.code == 404:
                raise SchemaNotFound(f"{method} {path}: {detail}") from err
            if err.code >= 500:
                raise RegistryUnavailable(f"{method} {path}: HTTP {err.code} {detail}") from err
            raise RegistryError(f"{method} {path}: HTTP {err.code} {detail}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            log.warning("schema registry unreachable at %s: %s", self._base, err)
            raise RegistryUnavailable(f"{method} {path}: {err}") from err
