"""What each method declares about itself; the conformance suite reads only this.

Tests never branch on a method's name: a capability a test needs (a setting that makes the
method the bare base optimizer, one that makes it SAM, its persistent state, how many passes a
step runs, whether the two-pass manual form applies, its reference loop) is a field here, in
the spirit of ``torch.testing``'s ``OptimizerInfo``. Adding a method is one record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import flatminima
from flatminima.directions import FRIENDLY_EMA
from reference import loops

ReferenceStep = Callable[..., list[torch.Tensor]]
"""``step(weights, grad_fn, base, **hyperparameters) -> new weights`` (see loops.py)."""


@dataclass(frozen=True)
class MethodRecord:
    cls: type
    configurations: dict[str, dict[str, Any]]
    """Named non-trivial settings; ``typical`` is the one most tests run with."""
    identity: dict[str, Any]
    """Hyperparameters that make the method the bare base optimizer, bit for bit."""
    passes: Callable[[dict[str, Any], int], int]
    """Forward/backward passes of step number ``step`` (from 0) with these hyperparameters:
    what the method must declare in ``passes_per_step`` and what its closure sees."""
    sam_equivalent: dict[str, Any] | None = None
    """Hyperparameters that make it plain SAM with ``rho = sam_equivalent['rho']``."""
    persistent_state: tuple[str, ...] = ()
    """Keys every parameter's state holds after a step (and that ``state_dict`` saves)."""
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """Bad keyword arguments and a regex the ``ValueError``'s message must match."""
    loss_scale_invariant: bool = True
    """Whether multiplying the loss by c > 0 leaves ε unchanged."""
    manual_two_pass: bool = True
    """Whether ``first_step()`` / ``second_step()`` apply (a pass at w, then at w + ε)."""
    starts_at_weights: bool = True
    """Whether the step's first pass is at the weights themselves, and its loss returned."""
    perturbs_along_a_pass_gradient: bool = True
    """Whether ε is built from the gradient of a pass of the same step (Momentum-SAM's is
    built from the base optimizer's momentum instead)."""
    memory_copies: float = 1.0
    """Extra parameter copies the method holds at its peak (the benchmarks check it)."""
    reference: Callable[[], ReferenceStep] | None = None
    """A fresh (stateful) reference step, transcribed from the equations (loops.py)."""
    lockstep: tuple[str, ...] = ("typical",)
    """The configurations run in lockstep with the reference."""
    extras: Callable[[], dict[str, Any]] = dict
    """Constructor arguments that are not hyperparameters (a seeded generator)."""
    compiles_without_recompiling: bool = True
    """Whether ``torch.compile`` of its step keeps one graph across steps (a method whose
    arithmetic depends on Python numbers that change every step, such as Tilted SAM's
    loss-based weights, recompiles)."""

    @property
    def id(self) -> str:
        return self.cls.__name__

    @property
    def typical(self) -> dict[str, Any]:
        return self.configurations["typical"]


def two_passes(hyperparameters: dict[str, Any], step: int) -> int:
    return 2


COMMON_INVALID = [
    ({"rho": -0.1}, r"rho must be in \[0, inf\)"),
    ({"rho": float("nan")}, r"rho must be a real number, got NaN"),
    ({"rho": float("inf")}, r"rho must be in \[0, inf\)"),
    ({"rho": "0.1"}, r"rho must be a real number"),
]

RECORDS = [
    MethodRecord(
        cls=flatminima.SAM,
        configurations={"typical": {"rho": 0.1}},
        identity={"rho": 0.0},
        passes=two_passes,
        sam_equivalent={"rho": 0.1},
        invalid=COMMON_INVALID,
        reference=lambda: loops.sam_step,
    ),
    MethodRecord(
        cls=flatminima.ASAM,
        configurations={
            "typical": {"rho": 0.5, "eta": 0.01},
            "no_offset": {"rho": 0.5, "eta": 0.0},
        },
        identity={"rho": 0.0},
        passes=two_passes,
        invalid=[*COMMON_INVALID, ({"eta": -1.0}, r"eta must be in \[0, inf\)")],
        reference=lambda: loops.asam_step,
        lockstep=("typical", "no_offset"),
    ),
    MethodRecord(
        cls=flatminima.FisherSAM,
        configurations={"typical": {"rho": 0.1, "eta": 1.0}},
        identity={"rho": 0.0},
        passes=two_passes,
        sam_equivalent={"rho": 0.1, "eta": 0.0},
        invalid=[*COMMON_INVALID, ({"eta": -1.0}, r"eta must be in \[0, inf\)")],
        loss_scale_invariant=False,
        reference=lambda: loops.fisher_sam_step,
    ),
    MethodRecord(
        cls=flatminima.MongeSAM,
        configurations={"typical": {"rho": 0.1}},
        identity={"rho": 0.0},
        passes=two_passes,
        invalid=COMMON_INVALID,
        loss_scale_invariant=False,
        reference=lambda: loops.monge_sam_step,
    ),
    MethodRecord(
        cls=flatminima.TiltedSAM,
        configurations={
            "typical": {"rho": 0.05, "tilt": 2.0, "num_samples": 2, "radius": 0.05},
            "three_samples": {
                "rho": 0.05,
                "tilt": 3.0,
                "num_samples": 3,
                "radius": 0.05,
                "noise_scale": 1.0,
            },
        },
        identity={"rho": 0.0, "radius": 0.0, "num_samples": 1},
        passes=lambda hyperparameters, step: 2 * hyperparameters["num_samples"],
        sam_equivalent={"rho": 0.1, "radius": 0.0, "num_samples": 1},
        invalid=[
            *COMMON_INVALID,
            ({"tilt": -1.0}, r"tilt must be in \[0, inf\)"),
            ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
            ({"num_samples": 1.5}, r"num_samples must be an integer >= 1"),
            ({"radius": -1.0}, r"radius must be in \[0, inf\)"),
            ({"noise_scale": -1.0}, r"noise_scale must be in \[0, inf\)"),
        ],
        manual_two_pass=False,
        starts_at_weights=False,
        memory_copies=2.0,
        compiles_without_recompiling=False,
        reference=lambda: functools.partial(
            loops.tilted_sam_step, generator=torch.Generator().manual_seed(4)
        ),
        lockstep=("three_samples",),
        extras=lambda: {"generator": torch.Generator().manual_seed(4)},
    ),
    MethodRecord(
        cls=flatminima.FriendlySAM,
        configurations={
            "typical": {"rho": 0.1, "sigma": 1.0, "lmbda": 0.6},
            "partial_removal": {"rho": 0.1, "sigma": 0.5, "lmbda": 0.9},
        },
        identity={"rho": 0.0},
        passes=two_passes,
        sam_equivalent={"rho": 0.1, "sigma": 0.0},
        persistent_state=(FRIENDLY_EMA,),
        invalid=[
            *COMMON_INVALID,
            ({"lmbda": 1.0}, r"lmbda must be in \[0, 1\)"),
            ({"lmbda": -0.1}, r"lmbda must be in \[0, 1\)"),
            ({"sigma": -1.0}, r"sigma must be in \[0, inf\)"),
        ],
        memory_copies=2.0,
        reference=lambda: functools.partial(loops.friendly_sam_step, state=loops.FriendlyState()),
        lockstep=("typical", "partial_removal"),
    ),
]
