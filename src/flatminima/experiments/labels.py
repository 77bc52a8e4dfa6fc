"""How an arm (a method with one set of hyperparameters) is named wherever runs are shown: the
report's tables and plots, ``flatminima sharpness``, progress bars and errors. One function, so
that the same run reads the same everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from flatminima.registry import canonical_method_name, get_method

SYMBOLS = {"rho": "ρ", "eta": "η", "sigma": "σ", "lmbda": "λ"}
"""Hyperparameters shown by the symbol the papers use (the others by their argument name)."""


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_hyperparameter(name: str, value: Any) -> str:
    """``ρ=0.1``: a hyperparameter as labels show it."""
    return f"{SYMBOLS.get(name, name)}={_shown(value)}"


def _known_defaults(method: str) -> Mapping[str, Any]:
    try:
        return get_method(method).hyperparameters
    except ValueError:  # a method of a newer flatminima, read from its database
        return {}


def arm_labels(arms: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """A label for each ``(method, hyperparameters)``: the method, then its first declared
    hyperparameter (the radius ρ of every SAM variant), every hyperparameter that differs from
    the method's default, and every one that varies among that method's arms in ``arms``
    (e.g. ``sam ρ=0.1``, ``tilted-sam ρ=0.1 radius=0.1``). The base optimizer alone is
    ``base``."""
    labels = []
    for method, hyperparameters in arms:
        method = canonical_method_name(method)
        defaults = _known_defaults(method)
        siblings = [h for m, h in arms if canonical_method_name(m) == method]
        varying = {
            name
            for name in hyperparameters
            if len({json.dumps(h.get(name), sort_keys=True) for h in siblings}) > 1
        }
        first = next(iter(defaults), None)
        declared = list(defaults)
        ordered = sorted(
            hyperparameters.items(),
            key=lambda item: declared.index(item[0]) if item[0] in declared else len(declared),
        )
        shown = [
            describe_hyperparameter(name, value)
            for name, value in ordered
            if name == first or name in varying or name not in defaults or value != defaults[name]
        ]
        labels.append(" ".join([method, *shown]))
    return labels


def arm_label(method: str, hyperparameters: Mapping[str, Any]) -> str:
    """The label of one arm on its own (see :func:`arm_labels`)."""
    return arm_labels([(method, hyperparameters)])[0]


def run_label(method: str, hyperparameters: Mapping[str, Any], seed: int) -> str:
    """One run: its arm's label and its seed, e.g. ``sam ρ=0.1 seed=0``."""
    return f"{arm_label(method, hyperparameters)} seed={seed}"
