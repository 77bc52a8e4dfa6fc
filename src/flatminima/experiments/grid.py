"""Expanding a comparison grid: methods × seeds × swept hyperparameters.

Hyperparameter settings are written ``NAME=VALUE`` (every method of the grid that takes
``NAME``) or ``METHOD:NAME=VALUE`` (that method only); a sweep gives several comma-separated
values, ``rho=0.05,0.1,0.2``. A setting no method of the grid takes is an error, so a typo never
silently runs the defaults.

A grid is at most ``MAX_GRID_RUNS`` runs, counted before any is built: a typo such as
``--seeds 0-1000000000`` is refused in one line instead of filling the memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flatminima.experiments.config import ConfigError, RunConfig, make_run_config
from flatminima.experiments.runner import unique_configs
from flatminima.registry import get_method

MAX_GRID_RUNS = 10_000
"""The most runs one command plans (seeds × methods × swept values): at a few seconds a run
on MNIST-1D that is already days of training; a larger grid is split into several commands."""


@dataclass(frozen=True)
class Assignment:
    """``[method:]name=value[,value...]`` from the command line."""

    method: str | None
    name: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, option: str) -> Assignment:
        target, equals, values = text.partition("=")
        method, colon, name = target.rpartition(":")
        if not equals or not name.strip() or not values.strip():
            raise ConfigError(
                f"{option} takes [METHOD:]NAME=VALUE[,VALUE...] (e.g. rho=0.1 or "
                f"fisher-sam:eta=0.5), got {text!r}"
            )
        return cls(
            method.strip() if colon else None,
            name.strip(),
            tuple(value.strip() for value in values.split(",")),
        )

    def applies_to(self, method: str) -> bool:
        if self.method is not None:
            return self.method == method
        return self.name in get_method(method).hyperparameters


def parse_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{option} needs at least one value")
    return items


def parse_seeds(texts: Sequence[str]) -> list[int]:
    """Seeds from ``0,1,2`` or ranges ``0-4`` (inclusive), in order, without repeats; at most
    ``MAX_GRID_RUNS`` of them (a range is measured before it is expanded)."""
    seeds: dict[int, None] = {}  # ordered, with constant-time membership
    for text in texts:
        for item in parse_list(text, "--seeds"):
            first, dash, last = item.partition("-")
            try:
                values = (
                    range(int(first), int(last) + 1) if dash else range(int(item), int(item) + 1)
                )
            except ValueError:
                raise ConfigError(
                    f"--seeds takes non-negative integers or ranges such as 0-4, got {item!r}"
                ) from None
            if not values:
                raise ConfigError(f"--seeds range {item!r} is empty: write it as LOW-HIGH")
            if len(seeds) + len(values) > MAX_GRID_RUNS:
                raise ConfigError(
                    f"--seeds gives more than {MAX_GRID_RUNS} seeds ({item!r} alone is "
                    f"{len(values)}): a grid is at most {MAX_GRID_RUNS} runs; split it into "
                    "several commands on the same --db"
                )
            seeds.update(dict.fromkeys(values))
    return list(seeds)


def expand_grid(
    methods: Sequence[str],
    seeds: Sequence[int],
    fixed: Sequence[Assignment],
    sweeps: Sequence[Assignment],
    training: Mapping[str, Any],
) -> list[RunConfig]:
    """Every configuration of the grid, validated, without duplicates (a method that takes no
    swept hyperparameter runs once per seed), seed by seed."""
    for method in methods:
        get_method_or_error(method)
    for assignment in [*fixed, *sweeps]:
        if assignment.method is not None and assignment.method not in methods:
            raise ConfigError(
                f"{assignment.method}:{assignment.name} names a method that is not in the grid "
                f"({', '.join(methods)})"
            )
        if not any(assignment.applies_to(method) for method in methods):
            raise ConfigError(
                f"no method in the grid takes hyperparameter {assignment.name!r}; accepted: "
                + "; ".join(
                    f"{method}: {', '.join(get_method(method).hyperparameters) or 'none'}"
                    for method in methods
                )
            )
    for assignment in fixed:
        if len(assignment.values) != 1:
            raise ConfigError(f"--param {assignment.name} takes one value; use --sweep for several")
    sizes = {
        method: math.prod(
            len(a.values) for a in _settings_of(method, fixed, sweeps) if a not in fixed
        )
        for method in methods
    }
    planned = len(seeds) * sum(sizes.values())
    if planned > MAX_GRID_RUNS:
        raise ConfigError(
            f"the grid is {planned} runs ({len(seeds)} seed(s) × {sum(sizes.values())} method "
            f"and sweep combination(s)); at most {MAX_GRID_RUNS} are planned by one command: "
            "split it into several commands on the same --db"
        )
    arms: list[tuple[str, dict[str, str]]] = []
    for method in methods:
        chosen = _settings_of(method, fixed, sweeps)
        fixed_values = {a.name: a.values[0] for a in chosen if a in fixed}
        own_sweeps = [a for a in chosen if a not in fixed]
        for combination in itertools.product(*(a.values for a in own_sweeps)):
            swept = {a.name: value for a, value in zip(own_sweeps, combination, strict=True)}
            arms.append((method, {**fixed_values, **swept}))
    # Seeds outermost: an interrupted grid already holds complete paired comparisons.
    configs = [
        make_run_config(method=method, hyperparameters=overrides, seed=seed, **training)
        for seed in seeds
        for method, overrides in arms
    ]
    return unique_configs(configs)


def _settings_of(
    method: str, fixed: Sequence[Assignment], sweeps: Sequence[Assignment]
) -> list[Assignment]:
    """The settings (fixed or swept) that apply to ``method``, one per hyperparameter: one
    naming the method (``sam:rho=0.1``) overrides one for every method (``rho=0.05``), in any
    order; two at the same level are an error rather than a silent choice."""
    chosen: dict[str, Assignment] = {}
    for specific in (False, True):
        level = [
            a
            for a in [*fixed, *sweeps]
            if a.applies_to(method) and (a.method is not None) == specific
        ]
        names = [a.name for a in level]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            given = f"{method}:NAME" if specific else "NAME"
            raise ConfigError(
                f"{', '.join(repeated)} is set more than once as {given} (by --param and/or "
                f"--sweep) for {method}: give each hyperparameter one value or one sweep"
            )
        chosen.update({a.name: a for a in level})
    return list(chosen.values())


def get_method_or_error(method: str) -> None:
    try:
        get_method(method)
    except ValueError as error:
        raise ConfigError(str(error)) from None
