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
from flatminima.methods.looksam import LOOKSAM_DIRECTION
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
    descends_with_first_pass_gradient: bool = False
    """Whether the first pass's gradient enters the update (Momentum-SAM, whose only pass it
    is; Bilateral SAM): a non-finite gradient there reaches the base optimizer, as it would
    without the method."""
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

# -- GSAM and WSAM (issue 9) --------------------------------------------------------------------

RECORDS += [
    MethodRecord(
        cls=flatminima.GSAM,
        # "typical" has no rho_min: the suite gives one group rho = 0, which a rho_min > 0
        # refuses. The learning-rate-following radius is tested in tests/methods/test_gsam.py
        # and in lockstep under a changing learning rate (test_lockstep.py).
        configurations={
            "typical": {"rho": 0.1, "alpha": 0.4},
            "large_alpha": {"rho": 0.1, "alpha": 1.5},
            "adaptive": {"rho": 0.5, "alpha": 0.6, "adaptive": True},
            "following_lr": {"rho": 0.2, "alpha": 0.4, "rho_min": 0.05, "lr_min": 0.01},
        },
        identity={"rho": 0.0, "alpha": 0.0},
        passes=two_passes,
        sam_equivalent={"rho": 0.1, "alpha": 0.0},
        invalid=[
            *COMMON_INVALID,
            ({"alpha": -0.1}, r"alpha must be in \[0, inf\)"),
            ({"alpha": float("nan")}, r"alpha must be a real number, got NaN"),
            ({"rho_min": -0.1}, r"rho_min must be in \[0, inf\)"),
            ({"rho_min": 0.2}, r"rho_min must be in \[0, rho\] = \[0, 0.1\], got 0.2"),
            ({"lr_min": -1.0}, r"lr_min must be in \[0, inf\)"),
            ({"lr_min": 1.0}, r"lr_min must be in \[0, lr_max\] = \[0, 0.1\]"),
            ({"lr_max": -1.0}, r"lr_max must be in \[0, inf\)"),
            ({"adaptive": 1}, r"adaptive must be True or False, got 1"),
        ],
        memory_copies=2.0,
        reference=lambda: loops.gsam_step,
        lockstep=("typical", "large_alpha", "adaptive"),
    ),
    MethodRecord(
        cls=flatminima.WSAM,
        configurations={
            "typical": {"rho": 0.1, "gamma": 0.9},
            "coupled": {"rho": 0.1, "gamma": 0.7, "decouple": False},
            "clipped": {"rho": 0.1, "gamma": 0.9, "max_norm": 0.2},
            "coupled_clipped": {"rho": 0.1, "gamma": 0.6, "decouple": False, "max_norm": 0.2},
            "adaptive": {"rho": 0.5, "gamma": 0.9, "adaptive": True},
        },
        identity={"gamma": 0.0},
        passes=two_passes,
        sam_equivalent={"rho": 0.1, "gamma": 0.5, "decouple": False},
        invalid=[
            *COMMON_INVALID,
            ({"gamma": 1.0}, r"gamma must be in \[0, 1\)"),
            ({"gamma": -0.1}, r"gamma must be in \[0, 1\)"),
            ({"max_norm": 0.0}, r"max_norm must be in \(0, inf\)"),
            ({"decouple": "yes"}, r"decouple must be True or False, got 'yes'"),
        ],
        memory_copies=2.0,
        reference=lambda: loops.wsam_step,
        lockstep=("typical", "coupled", "clipped", "coupled_clipped", "adaptive"),
    ),
]


# -- methods-b (issue 9): LookSAM, Momentum-SAM, Bilateral SAM ------------------------------------


def looksam_passes(hyperparameters: dict[str, Any], step: int) -> int:
    """A SAM step (two passes) on steps 0, k, 2k, ...; one pass in between."""
    return 2 if step % hyperparameters["k"] == 0 else 1


RECORDS += [
    MethodRecord(
        cls=flatminima.LookSAM,
        configurations={
            "typical": {"rho": 0.1, "k": 2, "alpha": 0.7},
            "slow_refresh": {"rho": 0.2, "k": 3, "alpha": 0.2},
        },
        identity={"rho": 0.0, "alpha": 0.0},
        passes=looksam_passes,
        sam_equivalent={"rho": 0.1, "k": 1},
        persistent_state=(LOOKSAM_DIRECTION,),
        invalid=[
            *COMMON_INVALID,
            ({"k": 0}, r"k must be an integer >= 1"),
            ({"k": 2.0}, r"k must be an integer >= 1"),
            ({"alpha": -0.1}, r"alpha must be in \[0, inf\)"),
            ({"alpha": float("nan")}, r"alpha must be a real number, got NaN"),
        ],
        manual_two_pass=False,
        memory_copies=2.0,
        reference=lambda: functools.partial(loops.looksam_step, state=loops.LookSAMState()),
        lockstep=("typical", "slow_refresh"),
        compiles_without_recompiling=False,
    ),
    MethodRecord(
        cls=flatminima.MomentumSAM,
        configurations={"typical": {"rho": 0.5}},
        identity={"rho": 0.0},
        passes=lambda hyperparameters, step: 1,
        invalid=COMMON_INVALID,
        manual_two_pass=False,
        starts_at_weights=False,
        perturbs_along_a_pass_gradient=False,
        descends_with_first_pass_gradient=True,
        memory_copies=1.0,
        reference=lambda: loops.momentum_sam_step,
        compiles_without_recompiling=False,
    ),
    MethodRecord(
        cls=flatminima.BilateralSAM,
        configurations={
            "typical": {"rho": 0.1, "rho_min": 0.05},
            "wide_min_side": {"rho": 0.05, "rho_min": 0.2},
        },
        identity={"rho": 0.0, "rho_min": 0.0},
        passes=lambda hyperparameters, step: 3,
        invalid=[
            *COMMON_INVALID,
            ({"rho_min": -0.1}, r"rho_min must be in \[0, inf\)"),
            ({"rho_min": float("inf")}, r"rho_min must be in \[0, inf\)"),
        ],
        manual_two_pass=False,
        descends_with_first_pass_gradient=True,
        memory_copies=3.0,
        reference=lambda: loops.bilateral_sam_step,
        lockstep=("typical", "wide_min_side"),
        compiles_without_recompiling=False,
    ),
]
