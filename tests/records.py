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
from flatminima.methods.esam import WEIGHT_PERTURBED
from flatminima.methods.looksam import LOOKSAM_DIRECTION
from flatminima.methods.sparse_sam import MASK, MASK_SHAPE
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
    needs_per_example_closure: bool = False
    """Whether the closure must take the evaluation (which rows, whether a gradient) and
    return per-example losses (ESAM selects examples by them; micro-batch SAM asks for rows)."""
    compute: Callable[[dict[str, Any], int, int], float] | None = None
    """Compute of step number ``step`` in full passes (``Cost.passes``) for a batch of
    ``batch_size`` examples; ``None``: every pass is a full pass, so it equals ``passes``."""
    prepare: Callable[[Any, torch.nn.Module, list[Any]], None] | None = None
    """``prepare(optimizer, model, batches)``, run by the suites right after construction:
    what a training loop does before the first step for a method that learns from data
    outside the step (Sparse SAM's mask), so that the suites step a non-trivial method."""
    packed_state: tuple[str, ...] = ()
    """Persistent state keys that hold bit-packed masks (uint8), not the parameter's dtype."""
    runs_sharded: bool = True
    """Whether it takes FSDP2-sharded parameters (a method that does not must refuse them at
    construction; every method does today)."""
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


def esam_compute(hyperparameters: dict[str, Any], step: int, batch_size: int) -> float:
    """A full forward and backward, a full forward (the probe), and a forward and backward on
    the k − 1 examples the strict rule keeps (k = ⌊γB⌋; all of them from γ ≥ 0.99), without
    ties in the loss rises."""
    gamma = hyperparameters["gamma"]
    k = max(1, int(batch_size * gamma))
    kept = batch_size if gamma >= 0.99 else max(1, k - 1)
    share = kept / batch_size
    forward, backward = 2.0 + share, 1.0 + share
    return (forward + 2.0 * backward) / 3.0


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
    # -- data-aware methods (issue 10, first half) -----------------------------------------------
    MethodRecord(
        cls=flatminima.ESAM,
        configurations={
            "typical": {"rho": 0.1, "beta": 0.5, "gamma": 0.5},
            "quarter_of_the_batch": {"rho": 0.2, "beta": 0.7, "gamma": 0.25},
        },
        identity={"rho": 0.0},
        passes=lambda hyperparameters, step: 3,
        persistent_state=(WEIGHT_PERTURBED,),
        invalid=[
            *COMMON_INVALID,
            ({"beta": 0.0}, r"beta must be in \(0, 1\]"),
            ({"beta": 1.5}, r"beta must be in \(0, 1\]"),
            ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
            ({"gamma": float("nan")}, r"gamma must be a real number, got NaN"),
        ],
        manual_two_pass=False,
        reference=lambda: functools.partial(
            loops.esam_step, state=loops.EsamState(torch.Generator().manual_seed(4))
        ),
        lockstep=("typical", "quarter_of_the_batch"),
        extras=lambda: {"generator": torch.Generator().manual_seed(4)},
        needs_per_example_closure=True,
        compute=esam_compute,
        compiles_without_recompiling=False,  # the examples kept depend on the data
    ),
    MethodRecord(
        cls=flatminima.MicroBatchSAM,
        configurations={
            "typical": {"rho": 0.1, "micro_batches": 4},
            "uneven": {"rho": 0.1, "micro_batches": 3},
        },
        identity={"rho": 0.0, "micro_batches": 1},
        passes=lambda hyperparameters, step: 2 * hyperparameters["micro_batches"],
        sam_equivalent={"rho": 0.1, "micro_batches": 1},
        invalid=[
            *COMMON_INVALID,
            ({"micro_batches": 0}, r"micro_batches must be an integer >= 1"),
            ({"micro_batches": 2.0}, r"micro_batches must be an integer >= 1"),
        ],
        manual_two_pass=False,
        memory_copies=2.0,
        reference=lambda: loops.micro_batch_sam_step,
        lockstep=("typical", "uneven"),
        needs_per_example_closure=True,
        compute=lambda hyperparameters, step, batch_size: 2.0,
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
    ),
    # -- Sparse SAM and Fisher-mask FSAM (issue 10) ----------------------------------------
    MethodRecord(
        cls=flatminima.SparseSAM,
        configurations={
            "typical": {"rho": 0.1, "sparsity": 0.5, "mask": "dynamic", "total_epochs": 4},
            "dense": {"rho": 0.1, "sparsity": 0.2, "mask": "dynamic", "total_epochs": 4},
            "fisher": {"rho": 0.1, "sparsity": 0.5, "num_samples": 12},
        },
        identity={"rho": 0.0},
        passes=two_passes,
        # sparsity 0 is SAM with the authors' ξ = 1e-7 instead of SAM's 1e-12 (2.9e-9 apart
        # after 5 steps): test_sparse_sam.py holds it to a SAM loop with that ξ.
        persistent_state=(MASK, MASK_SHAPE),
        invalid=[
            *COMMON_INVALID,
            ({"sparsity": 1.5}, r"sparsity must be in \[0, 1\]"),
            ({"mask": "random"}, r"mask must be one of 'fisher', 'dynamic'"),
            ({"update_every": 0}, r"update_every must be an integer >= 1"),
            ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
            ({"drop_rate": -0.1}, r"drop_rate must be in \[0, 1\]"),
            ({"drop_strategy": "size"}, r"drop_strategy must be one of 'weight'"),
            ({"growth_strategy": None}, r"growth_strategy must be one of 'weight'"),
            ({"total_epochs": None}, r"total_epochs must be an integer >= 1 with mask='dynamic'"),
        ],
        # ε = ρ·m⊙g/(‖g‖ + 1e-7): the authors' ξ = 1e-7 makes ε move by ~1e-7·(1 − 1/c) when
        # the loss is scaled by c (invariant only up to ξ, like their code).
        loss_scale_invariant=False,
        # A step's peak: the backup and one bit per coordinate (1 + 1/32 for float32); the
        # step that draws the first dynamic mask: an int32 permutation and a bool per
        # coordinate, before the backup (1.25 for float32).
        memory_copies=1.25,
        reference=lambda: functools.partial(
            loops.sparse_sam_step,
            state=loops.SparseState(torch.Generator().manual_seed(4)),
        ),
        lockstep=("typical", "dense"),
        extras=lambda: {"generator": torch.Generator().manual_seed(4)},
        prepare=lambda optimizer, model, data: learn_the_mask(optimizer, model, data),
        packed_state=(MASK,),
    ),
    MethodRecord(
        cls=flatminima.FisherMaskSAM,
        configurations={"typical": {"rho": 0.1, "sparsity": 0.5, "num_samples": 12}},
        identity={"rho": 0.0},
        passes=two_passes,
        persistent_state=(MASK, MASK_SHAPE),
        invalid=[
            *COMMON_INVALID,
            ({"sparsity": -0.5}, r"sparsity must be in \[0, 1\]"),
            ({"num_samples": 2.0}, r"num_samples must be an integer >= 1"),
        ],
        memory_copies=1.25,
        # Before its first refresh the Fisher mask is all zeros; the lockstep with a learnt
        # mask is test_sparse_sam.py's (the suite's lockstep has no data to learn it from).
        reference=lambda: functools.partial(loops.sparse_sam_step, state=loops.SparseState()),
        lockstep=(),
        prepare=lambda optimizer, model, data: learn_the_mask(optimizer, model, data),
        packed_state=(MASK,),
    ),
]


def learn_the_mask(optimizer: Any, model: torch.nn.Module, data: list[Any]) -> None:
    """The runner's per-epoch hook for epoch 0 on ``data``. The Fisher passes run one example
    at a time, which BatchNorm1d cannot do in train mode: the mask is learnt in eval mode."""
    was_training = model.training
    model.eval()
    optimizer.start_epoch(
        0, model=model, loss_fn=torch.nn.functional.cross_entropy, batches=lambda: data
    )
    model.train(was_training)
