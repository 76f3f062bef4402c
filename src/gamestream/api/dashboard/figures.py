"""Figures as the dashboard's JSON carries them."""

from __future__ import annotations

import math


def number(value: float | int | None, decimals: int | None = None) -> float | int | None:
    """A figure as JSON can carry it: rounded, and None for a missing value, NaN or infinity (which a JSON
    document cannot hold; starlette refuses to encode them, which would fail the whole answer)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(value, decimals) if decimals is not None else value
