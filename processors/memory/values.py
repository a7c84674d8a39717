"""Value normalisation for contradiction checks: values that differ only in unit or format are the same value.

:func:`normalise_value` tries, in order, and the first that applies wins:

1. **Money** (price-parser): a currency and an amount. ``"$1,200"``, ``"1200 USD"`` and ``"USD 1,200.00"`` are
   all ``money:USD:1200``. Currency symbols map to ISO codes through a small table (price-parser reports the
   symbol as written); an unknown symbol stays as written, so it never equals another currency.
2. **Quantity** (pint): a number followed by a unit with a physical dimension, converted to SI base units.
   ``"5 km"`` and ``"5000 m"`` are ``qty:[length]:5000 meter``. Only text starting with a number is tried: many
   English words are unit names (``in``, ``at``, ``min``), and a bare word is never a quantity here.
3. **Date** (dateparser): a full calendar date, strictly parsed (day, month and year all present, English, no
   relative dates). ``"2026-01-05"``, ``"Jan 5, 2026"`` and ``"5 January 2026"`` are ``date:2026-01-05``.
   Numeric dates are read year-month-day or month-day-year (dateparser's English default).
4. **Number**: a plain number with thousands separators: ``"1,200"`` and ``"1200.0"`` are ``num:1200``.
5. **Text**: Unicode NFKC, case-folded, whitespace collapsed, trailing sentence punctuation removed.

Magnitudes are compared at 9 significant digits, so float noise from unit conversion never looks like a change.
Each library is loaded once, lazily: normalisation runs at hardening, not on the gate's hot path.
"""

from __future__ import annotations

import unicodedata
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from ctxflow.processors.memory.identity import normalise_content

_CURRENCY_SYMBOLS = {"$": "USD", "US$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR", "CHF": "CHF"}


def _magnitude(value: float | Decimal) -> str:
    return f"{float(value):.9g}"


@cache
def _units() -> Any:
    import pint

    return pint.UnitRegistry()


def _money(text: str) -> str | None:
    from price_parser import Price

    price = Price.fromstring(text)
    if price.currency is None or price.amount is None:
        return None
    code = _CURRENCY_SYMBOLS.get(price.currency, price.currency.upper())
    return f"money:{code}:{_magnitude(price.amount)}"


def _quantity(text: str) -> str | None:
    if not text[:1].isdigit():
        return None
    registry = _units()
    try:
        quantity = registry.parse_expression(text)
    except Exception:  # pint raises several unrelated types for text that is not a quantity
        return None
    if not isinstance(quantity, registry.Quantity) or quantity.dimensionless:
        return None
    base = quantity.to_base_units()
    return f"qty:{base.dimensionality}:{_magnitude(base.magnitude)} {base.units}"


_DATE_SETTINGS = {
    "STRICT_PARSING": True,
    "REQUIRE_PARTS": ["day", "month", "year"],
    "RETURN_TIME_AS_PERIOD": False,
    "PREFER_LOCALE_DATE_ORDER": False,
    "DATE_ORDER": "YMD",
}


def _date(text: str) -> str | None:
    if not any(ch.isdigit() for ch in text):
        return None
    import dateparser

    settings = dict(_DATE_SETTINGS)
    # ISO-like numeric dates read year first; written dates ("Jan 5, 2026") are unambiguous either way.
    if not text[:4].isdigit():
        settings["DATE_ORDER"] = "MDY"
    parsed = dateparser.parse(text, languages=["en"], settings=settings)
    if parsed is None:
        return None
    if parsed.hour or parsed.minute or parsed.second:
        return f"datetime:{parsed.replace(tzinfo=None).isoformat()}"
    return f"date:{parsed.date().isoformat()}"


def _number(text: str) -> str | None:
    try:
        return f"num:{_magnitude(Decimal(text.replace(',', '').replace('_', '')))}"
    except InvalidOperation:
        return None


def normalise_value(value: str) -> str:
    """The canonical form of ``value`` (see the module docstring); equal forms mean the same value."""
    text = " ".join(unicodedata.normalize("NFKC", value).split())
    for parse in (_money, _quantity, _date, _number):
        found = parse(text)
        if found is not None:
            return found
    return "text:" + normalise_content(text)


def normalise_key(part: str) -> str:
    """A subject or attribute as compared: case-folded, with spaces, ``-`` and ``_`` read as one separator."""
    folded = unicodedata.normalize("NFKC", part).casefold().replace("-", " ").replace("_", " ")
    return " ".join(folded.split())
