"""One call that measures everything the runner reports about a trained model's flatness."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from flatminima.sharpness._common import LossFn, as_batch_list, mean_loss, measuring
from flatminima.sharpness.hessian import hessian_eigenvalues, hessian_trace_estimate
from flatminima.sharpness.msharpness import average_sharpness, worst_case_sharpness
from flatminima.validation import non_negative, positive_int

__all__ = ["measure_sharpness"]

logger = logging.getLogger(__name__)


def measure_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    rho: float = 0.05,
    adaptive_rho: float = 0.5,
    average_rho: float = 1.0,
    adaptive_average_rho: float = 5.0,
    top_k: int = 1,
    num_probes: int = 10,
    m: int | None = None,
    steps: int = 5,
    num_samples: int = 4,
    max_iter: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
    train_mode: bool = False,
) -> dict[str, float]:
    """Named scalar flatness measurements of a model at its current weights.

    For the loss L(w) = (1/B) Σ_b loss_fn(model, batch_b) and its Hessian H:

    ================================  ==========================================================
    key                               quantity
    ================================  ==========================================================
    ``loss``                          L(w)
    ``hessian_top_eigenvalue``        λ_1(H), algebraically largest (Lanczos, float64)
    ``hessian_eigenvalue_<i>``        λ_i(H) for i = 2 … top_k (only when top_k > 1)
    ``hessian_trace``                 tr(H), Hutchinson with ``num_probes`` Rademacher probes
    ``hessian_trace_stderr``          its standard error (NaN with one probe)
    ``worst_case_sharpness``          mean over sub-batches of max_{‖ε‖₂≤ρ} L_s(w+ε) − L_s(w),
                                      ρ = ``rho``
    ``average_sharpness``             mean over sub-batches of E L_s(w+ε) − L_s(w),
                                      ε ~ N(0, ρ²I/d), ρ = ``average_rho``
    ``adaptive_worst_case_sharpness`` as worst case, ‖ε ⊘ |w|‖₂ ≤ ``adaptive_rho``
    ``adaptive_average_sharpness``    as average, ε = |w| ⊙ δ,
                                      δ ~ N(0, ρ²I/d), ρ = ``adaptive_average_rho``
    ================================  ==========================================================

    The definitions, and what each budget argument trades, are those of
    :func:`~flatminima.sharpness.hessian_eigenvalues` (``max_iter``, ``tol``),
    :func:`~flatminima.sharpness.hessian_trace_estimate` (``num_probes``),
    :func:`~flatminima.sharpness.worst_case_sharpness` (``m``, ``steps``) and
    :func:`~flatminima.sharpness.average_sharpness` (``m``, ``num_samples``). The defaults
    take a few seconds for a ~20k-parameter model on a few thousand examples on one CPU
    thread; the trace's standard error says whether ``num_probes`` suffices. The model is
    measured in eval mode by default and left exactly as found.

    Radii. The adaptive radii are relative to |w| and not comparable with the Euclidean
    ones; 0.5 is ASAM's published CIFAR-10 value. The average measures get larger radii than
    the worst case on purpose: within the same ball, near a minimum, the average rise is only
    ≈ ρ²·tr(H)/(2d), the trace again and d times smaller than the worst case ≈ ρ²λ_1/2; at
    ρ = 0.05 it is ~1e-7 for a 20k-parameter model, below the rounding error of a float32
    loss of order one. At ``average_rho=1`` (per-coordinate standard deviation 1/√d) it is
    well resolved and starts to see beyond the quadratic approximation.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches (read into a list once).
        rho: Euclidean worst-case radius ≥ 0.
        adaptive_rho: adaptive worst-case radius ≥ 0.
        average_rho: Euclidean average-case radius ≥ 0.
        adaptive_average_rho: adaptive average-case radius ≥ 0.
        top_k: how many Hessian eigenvalues, ≥ 1.
        num_probes: Hutchinson probes, ≥ 1.
        m: sub-batch size for the sharpness measures, or ``None`` for the batches as given.
        steps: projected-ascent steps of the worst-case measures, ≥ 0.
        num_samples: antithetic noise pairs per sub-batch of the average measures, ≥ 1.
        max_iter: the cap on Lanczos products, ≥ top_k.
        tol: Lanczos relative residual tolerance, ≥ 0.
        seed: seeds every random draw.
        train_mode: measure the train-mode loss (BatchNorm with batch statistics).

    Returns:
        The measurements, keyed as in the table, as Python floats.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> result = measure_sharpness(model, loss_fn, [x])
        >>> round(result["hessian_top_eigenvalue"], 6), round(result["hessian_trace"], 6)
        (2.0, 2.5)
    """
    non_negative("rho", rho)
    non_negative("adaptive_rho", adaptive_rho)
    non_negative("average_rho", average_rho)
    non_negative("adaptive_average_rho", adaptive_average_rho)
    positive_int("top_k", top_k)
    positive_int("num_probes", num_probes)
    positive_int("num_samples", num_samples)
    positive_int("max_iter", max_iter)
    batch_list = as_batch_list(batches)
    common: dict[str, Any] = {"seed": seed, "train_mode": train_mode}

    with measuring(model, train_mode=train_mode):
        results = {"loss": mean_loss(model, loss_fn, batch_list)}
    eigenvalues = hessian_eigenvalues(
        model, loss_fn, batch_list, top_k, max_iter=max_iter, tol=tol, **common
    ).tolist()
    results["hessian_top_eigenvalue"] = eigenvalues[0]
    for i, value in enumerate(eigenvalues[1:], start=2):
        results[f"hessian_eigenvalue_{i}"] = value
    trace = hessian_trace_estimate(model, loss_fn, batch_list, num_probes=num_probes, **common)
    results["hessian_trace"] = trace.value
    results["hessian_trace_stderr"] = trace.standard_error
    for prefix, metric, worst_rho, average_radius in (
        ("", "euclidean", rho, average_rho),
        ("adaptive_", "adaptive", adaptive_rho, adaptive_average_rho),
    ):
        results[f"{prefix}worst_case_sharpness"] = worst_case_sharpness(
            model, loss_fn, batch_list, rho=worst_rho, m=m, metric=metric, steps=steps, **common
        )
        results[f"{prefix}average_sharpness"] = average_sharpness(
            model,
            loss_fn,
            batch_list,
            rho=average_radius,
            m=m,
            metric=metric,
            num_samples=num_samples,
            **common,
        )
    logger.info("measure_sharpness: %s", results)
    return results
