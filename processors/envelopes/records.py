"""Published records built without a second validation: their every value already passed one.

A cost line or an envelope is assembled from fields of records the codec validated (ids, timestamps, enums) and
from sums of non-negative counts, so validating it again would only check what is known; on the hot path (one line
per priced event) that check cost more than the rest of the line. The tests re-validate every record the processor
publishes (``tests/unit/test_envelopes.py``, the crash property test), so a construction bug still fails there.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_FIELDS: dict[type[BaseModel], frozenset[str]] = {}
_new, _set = object.__new__, object.__setattr__


def trusted(model: type[M], values: dict[str, Any]) -> M:
    """A ``model`` holding ``values`` (every field, already of its type), as pydantic's ``model_construct`` would
    build it, without its per-field Python loop. ``values`` is not copied: the caller hands it over."""
    fields = _FIELDS.get(model)
    if fields is None:
        fields = _FIELDS[model] = frozenset(model.model_fields)
    if values.keys() != fields:
        raise TypeError(f"{model.__name__} needs exactly {sorted(fields)}, got {sorted(values)}")
    record = _new(model)
    _set(record, "__dict__", values)
    _set(record, "__pydantic_fields_set__", fields)
    _set(record, "__pydantic_extra__", None)
    _set(record, "__pydantic_private__", None)
    return record
