"""Hyperparameter checks that fail loudly, naming the argument and the accepted range."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

Check = Callable[[str, Any], None]


def _number(name: str, value: Any) -> float:
    # numbers.Real covers Python and NumPy scalars alike (np.float32 is not a float subclass).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a real number, got NaN")
    return number


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


def unit_interval(name: str, value: Any) -> None:
    """0 ≤ value ≤ 1."""
    number = _number(name, value)
    if not (0.0 <= number <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def positive_int(name: str, value: Any) -> None:
    """An integer ≥ 1 (Python or NumPy integer; 2.0 and True are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if operator.index(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def optional(check: Check) -> Check:
    """``check``, or ``None``."""

    def check_optional(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    check_optional.__doc__ = f"None, or {check.__doc__}"
    return check_optional


def positive(name: str, value: Any) -> None:
    """0 < value < ∞."""
    number = _number(name, value)
    if not (0.0 < number < math.inf):
        raise ValueError(f"{name} must be in (0, inf), got {value!r}")


def boolean(name: str, value: Any) -> None:
    """True or False (a Python or NumPy bool; 0 and 1 are refused, as they may be typos for a
    number)."""
    if isinstance(value, bool):
        return
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return
    raise ValueError(f"{name} must be True or False, got {value!r}")


def positive_unit(name: str, value: Any) -> None:
    """0 < value ≤ 1."""
    number = _number(name, value)
    if not (0.0 < number <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
