"""Expanding a comparison grid from the command line's settings."""

from __future__ import annotations

from typing import Any

import pytest

from flatminima.experiments.config import ConfigError
from flatminima.experiments.grid import Assignment, expand_grid, parse_seeds

TRAINING: dict[str, Any] = {"dataset": "digits", "model": "mlp", "epochs": 1}


def _grid(methods: list[str], fixed: list[str], sweeps: list[str]) -> dict[str, list]:
    configs = expand_grid(
        methods,
        [0],
        [Assignment.parse(text, "--param") for text in fixed],
        [Assignment.parse(text, "--sweep") for text in sweeps],
        TRAINING,
    )
    by_method: dict[str, list] = {}
    for config in configs:
        by_method.setdefault(config.method, []).append(config.hyperparameters)
    return by_method


@pytest.mark.parametrize(
    "fixed", [["rho=0.05", "sam:rho=0.1"], ["sam:rho=0.1", "rho=0.05"]], ids=["after", "before"]
)
def test_a_method_specific_value_overrides_the_common_one_in_any_order(fixed: list[str]) -> None:
    grid = _grid(["sam", "asam"], fixed, [])
    assert [h["rho"] for h in grid["sam"]] == [0.1]
    assert [h["rho"] for h in grid["asam"]] == [0.05]


def test_a_method_specific_sweep_overrides_a_common_value() -> None:
    grid = _grid(["sam", "asam"], ["rho=0.05"], ["sam:rho=0.1,0.2"])
    assert [h["rho"] for h in grid["sam"]] == [0.1, 0.2]
    assert [h["rho"] for h in grid["asam"]] == [0.05]


@pytest.mark.parametrize(
    ("fixed", "sweeps"),
    [
        (["rho=0.1"], ["rho=0.05,0.2"]),
        (["rho=0.1", "rho=0.2"], []),
        (["sam:rho=0.1"], ["sam:rho=0.2,0.3"]),
    ],
)
def test_the_same_hyperparameter_twice_at_one_level_is_an_error(
    fixed: list[str], sweeps: list[str]
) -> None:
    with pytest.raises(ConfigError, match="rho is set more than once"):
        _grid(["sam"], fixed, sweeps)


def test_seed_ranges() -> None:
    assert parse_seeds(["0-2", "5", "1"]) == [0, 1, 2, 5]
    with pytest.raises(ConfigError, match="range '3-1' is empty"):
        parse_seeds(["3-1"])
