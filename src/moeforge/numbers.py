"""Numbers in moeforge's JSON reports: stable digits, and one policy for non-finite values.

Reports are compared across runs byte for byte, so floats are rounded to a fixed number of
significant digits. JSON has no NaN or infinity: a non-finite value is written as null, and
the markdown renderers show it as "n/a".
"""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT_DIGITS = 6


def report_number(value: Any) -> float | None:
    """A float (or 0-d tensor) rounded to stable digits; None when it is not finite."""
    x = float(value)
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(x) else None


def fmt(value: float | None, spec: str = ".4g") -> str:
    """A report number for markdown: formatted, or "n/a" for a non-finite (null) value."""
    return "n/a" if value is None else format(value, spec)
