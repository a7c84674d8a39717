"""Values as the report shows them, the same in the terminal and in the HTML file."""

from __future__ import annotations

from typing import Any

from ctxflow.streams.report.views import Format

MISSING = "-"


def show(value: Any, fmt: Format) -> str:
    """``value`` (a JSON value from a view's row) as text; NULL reads ``-``."""
    if value is None:
        return MISSING
    if not fmt.numeric:
        return _text(value)
    try:
        number = float(value)  # a decimal arrives as its text
    except (TypeError, ValueError):
        return _text(value)
    if fmt is Format.USD:
        return usd(number)
    if fmt is Format.SHARE:
        return f"{number:.1%}"
    if fmt is Format.CHANGE:
        return f"{number:+.1%}"
    if fmt is Format.RATIO:
        return f"{number:.1f}x"
    if fmt is Format.SCORE:
        return f"{number:.2f}"
    if fmt is Format.MS:
        return duration(number)
    return f"{round(number):,}"


def usd(dollars: float) -> str:
    """Dollars in cents; four decimals below a cent (a run can cost a fraction of one)."""
    return f"${dollars:.4f}" if 0 < abs(dollars) < 0.01 else f"${dollars:,.2f}"


def duration(ms: float) -> str:
    """Milliseconds in the largest unit that keeps the number readable."""
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 1000:
        return f"{sign}{ms:.0f} ms"
    if ms < 120_000:
        return f"{sign}{ms / 1000:.1f} s"
    if ms < 2 * 3_600_000:
        return f"{sign}{ms / 60_000:.1f} min"
    if ms < 2 * 86_400_000:
        return f"{sign}{ms / 3_600_000:.1f} h"
    return f"{sign}{ms / 86_400_000:,.1f} d"


def _text(value: Any) -> str:
    text = str(value)
    # A time bucket comes as ISO 8601 with seconds and offset: minutes are what a reader needs.
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return text[:16].replace("T", " ")
    return text
