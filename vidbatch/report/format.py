"""How the report writes numbers and text into HTML and SVG."""

from __future__ import annotations

import html
import math
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A number for people: `digits` significant digits, whole numbers with separators above that,
    an en dash for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, float)):
        # Below 10**(digits-1) significant digits read well; above, %g would switch to exponent
        # notation (999.6 -> "1e+03"), so whole numbers with separators instead.
        return f"{value:.{digits}g}" if abs(value) < 10 ** (digits - 1) else f"{value:,.0f}"
    return str(value)


def escape(value: Any) -> str:
    """HTML-escaped text of `value` (None becomes empty), safe in attributes too."""
    return html.escape("" if value is None else str(value), quote=True)
