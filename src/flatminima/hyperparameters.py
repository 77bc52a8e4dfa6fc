"""A method's hyperparameters, declared once.

Each method lists its hyperparameters as :class:`Hyperparameter` rows. Everything else is
derived from that one table: the constructor's defaults (a test holds the signature to it),
validation at construction *and* whenever a param group changes, the symbol table in the
method's docstring, the registry entry the runner and the CLI read, and the README's row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flatminima.validation import (  # noqa: F401 - the checks a declaration names
    boolean,
    finite,
    half_open_unit,
    non_negative,
    optional,
    positive,
    positive_int,
    positive_unit,
    unit_interval,
)

Check = Callable[[str, Any], None]
"""Raises ``ValueError`` naming the argument and its accepted range."""


@dataclass(frozen=True)
class Hyperparameter:
    """One row of a method's declaration."""

    name: str
    """The argument name (the authors' name where they have one)."""
    default: Any
    check: Check
    symbol: str
    """The paper's symbol (``-`` where the paper has none)."""
    meaning: str
    """What it does and where the default comes from, in one or two short sentences."""
    step_level: bool = False
    """Shapes the whole step, so it must be the same in every param group."""


Declaration = Sequence[Hyperparameter]


def defaults_of(declaration: Declaration) -> dict[str, Any]:
    """Name → default."""
    return {row.name: row.default for row in declaration}


def check_values(declaration: Declaration, values: Mapping[str, Any]) -> None:
    """Checks every declared hyperparameter present in ``values``."""
    for row in declaration:
        if row.name in values:
            row.check(row.name, values[row.name])


def check_groups_agree(
    declaration: Declaration, groups: Sequence[Mapping[str, Any]], method: str
) -> None:
    """Raises ``ValueError`` if a step-level hyperparameter differs between ``groups``."""
    for row in declaration:
        if not row.step_level:
            continue
        values = [group[row.name] for group in groups if row.name in group]
        for value in values[1:]:
            if value != values[0]:
                raise ValueError(
                    f"{row.name} shapes the whole {method} step and must be the same in every "
                    f"param group, got {values[0]!r} and {value!r}"
                )


def symbol_table(declaration: Declaration) -> str:
    """The docstring's table: paper symbol, argument, default, meaning (reStructuredText)."""
    rows = [(row.symbol, f"``{row.name}``", repr(row.default), row.meaning) for row in declaration]
    headers = ("paper", "argument", "default", "meaning")
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([rule, line(headers), rule, *(line(r) for r in rows), rule])
