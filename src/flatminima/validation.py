"""Hyperparameter checks that fail loudly, naming the argument and the accepted range."""

from __future__ import annotations

import math
from typing import Any


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number, got NaN")
    return value


def non_negative(name: str, value: Any) -> None:
    """0 ≤ value < ∞."""
    number = _number(name, value)
    if not (0.0 <= number < math.inf):
        raise ValueError(f"{name} must be in [0, inf), got {value!r}")


def finite(name: str, value: Any) -> None:
    """-∞ < value < ∞."""
    number = _number(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")


def half_open_unit(name: str, value: Any) -> None:
    """0 ≤ value < 1."""
    number = _number(name, value)
    if not (0.0 <= number < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def positive_int(name: str, value: Any) -> None:
    """An integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
