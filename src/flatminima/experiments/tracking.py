"""Sharpness during training (``--track-sharpness N``) and the stability thresholds it is read
against.

Every N epochs, and at the last one, the runner measures the largest eigenvalue λ_max of the
Hessian of the training loss (Lanczos, :data:`LANCZOS_ITERATIONS` Hessian-vector products at
most) on a fixed subset of the run's training examples, with the labels it trains on: the
:data:`TRACKED_EXAMPLES` positions ``sorted(numpy.random.default_rng(TRACKING_SEED).choice(
n_train, TRACKED_EXAMPLES, replace=False))`` of its training set (every example when fewer),
the same for every epoch and, since runs of one seed share their training set, for every
method. These are the examples ``flatminima sharpness --examples 512 --seed 0`` measures on.
Beside λ_max it measures the mean norm of the mini-batch gradient over the subset's batches of
:data:`TRACKING_BATCH_SIZE` (the ‖g‖ that normalised SAM divides by, which its predicted edge
of stability depends on).

Measuring never changes training: it runs in eval mode (BatchNorm's running statistics are
read, not updated; dropout is off), draws its random start vector from its own generator (the
global generator, which the training may use, is not touched), never writes ``.grad``, and the
model's weights, buffers and modes are restored by copy afterwards.

The thresholds (for the report): on a quadratic with Hessian eigenvalue λ, SGD with heavy-ball
momentum β (PyTorch's SGD) and learning rate η is stable exactly when ηλ < 2(1 + β); plain
gradient descent (β = 0) when λ < 2/η. Unnormalised SAM (ε = ρg) multiplies the gradient along
that eigenvector by 1 + ρλ, so it is stable when ηλ(1 + ρλ) < 2(1 + β): SAM's edge of stability
(Agarwala & Dauphin, "SAM operates far from home", ICML 2023) is the λ solving it with
equality, below the base optimizer's. Normalised SAM (ε = ρg/‖g‖, the one this library
implements) is the unnormalised one with radius ρ/‖g‖ at the current gradient, so its edge
moves with ‖g‖ (Long & Bartlett, 2024, derive the same SAM edge).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flatminima.sharpness import hessian_eigenvalues
from flatminima.sharpness._common import measuring, trainable_parameters

TRACKED_EXAMPLES = 512
TRACKING_BATCH_SIZE = 128
TRACKING_SEED = 0
"""Seeds the tracked subset and the Lanczos start vector."""
LANCZOS_ITERATIONS = 20
"""Hessian-vector products per measurement at most: λ_max converges first (Lanczos finds the
extreme eigenvalues in a few steps), and the overhead stays a few epochs' worth per run."""
LANCZOS_TOLERANCE = 1e-3
"""Relative residual at which Lanczos stops before its last iteration."""

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrackedSharpness:
    """One measurement during training; the keys match the database's ``epochs`` columns."""

    top_eigenvalue: float
    gradient_norm: float
    """Mean over the tracked batches of the mini-batch gradient's norm."""
    sharpness_time_s: float
    """Seconds the measurement took (both quantities)."""


def tracked_batches(inputs: torch.Tensor, labels: torch.Tensor) -> Batches:
    """The fixed subset of the training set ``(inputs, labels)`` sharpness is tracked on, in
    batches of ``TRACKING_BATCH_SIZE``."""
    size = min(TRACKED_EXAMPLES, len(labels))
    chosen = np.random.default_rng(TRACKING_SEED).choice(len(labels), size=size, replace=False)
    positions = torch.from_numpy(np.sort(chosen))
    return list(
        zip(
            inputs[positions].split(TRACKING_BATCH_SIZE),
            labels[positions].split(TRACKING_BATCH_SIZE),
            strict=True,
        )
    )


def is_tracked_epoch(epoch: int, every: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (from 1) of ``epochs`` is measured when tracking ``every``
    epochs (0: never): every ``every``-th epoch and the last."""
    return every > 0 and (epoch % every == 0 or epoch == epochs)


def _training_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


def measure_tracked_sharpness(model: nn.Module, batches: Batches) -> TrackedSharpness:
    """λ_max of the mean training loss over ``batches`` and the mean mini-batch gradient norm,
    leaving ``model`` exactly as found (see the module's description)."""
    started = time.perf_counter()
    # A measurement stopped at LANCZOS_ITERATIONS is expected (a few digits suffice here):
    # the eigensolver's warning about it would interrupt every progress line.
    solver_logger = logging.getLogger("flatminima.sharpness.hessian")
    previous_level = solver_logger.level
    solver_logger.setLevel(logging.ERROR)
    try:
        [top] = hessian_eigenvalues(
            model,
            _training_loss,
            batches,
            k=1,
            max_iter=LANCZOS_ITERATIONS,
            tol=LANCZOS_TOLERANCE,
            seed=TRACKING_SEED,
        ).tolist()
    finally:
        solver_logger.setLevel(previous_level)
    parameters = trainable_parameters(model)
    norms = []
    with measuring(model, train_mode=False):
        for batch in batches:
            gradient = torch.autograd.grad(_training_loss(model, batch), parameters)
            norms.append(
                float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradient])))
            )
    return TrackedSharpness(
        top_eigenvalue=float(top),
        gradient_norm=float(np.mean(norms)),
        sharpness_time_s=time.perf_counter() - started,
    )


# --- thresholds ------------------------------------------------------------------------------


def stability_threshold(learning_rate: float, momentum: float = 0.0) -> float:
    """The largest Hessian eigenvalue at which SGD with heavy-ball ``momentum`` β and learning
    rate η is stable on a quadratic: 2(1 + β)/η (2/η without momentum)."""
    return 2.0 * (1.0 + momentum) / learning_rate


def sam_edge_of_stability(
    learning_rate: float,
    rho: float,
    momentum: float = 0.0,
    gradient_norm: float | None = None,
) -> float:
    """SAM's edge of stability: the λ with ηλ(1 + rλ) = 2(1 + β), where r = ρ for unnormalised
    SAM (``gradient_norm=None``) and r = ρ/‖g‖ for normalised SAM at gradient norm ‖g‖.

    The positive root of rλ² + λ − c = 0 with c = 2(1 + β)/η, written as 2c/(1 + √(1 + 4rc))
    (no cancellation when r is small); the base optimizer's threshold c when r = 0.
    """
    if learning_rate <= 0 or rho < 0:
        raise ValueError(f"need learning_rate > 0 and rho >= 0, got {learning_rate}, {rho}")
    threshold = stability_threshold(learning_rate, momentum)
    if gradient_norm is None:
        radius = rho
    elif gradient_norm > 0 and math.isfinite(gradient_norm):
        radius = rho / gradient_norm
    else:
        return math.nan
    return 2.0 * threshold / (1.0 + math.sqrt(1.0 + 4.0 * radius * threshold))
