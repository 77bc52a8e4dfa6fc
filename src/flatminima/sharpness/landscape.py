"""Loss-landscape slices: the loss along a line or over a plane through the weights.

* :func:`landscape_1d`: L(w + α·d) along one direction d (by default a random
  filter-normalised direction, Li et al., 2018, "Visualizing the Loss Landscape of Neural
  Nets");
* :func:`interpolate_1d`: L((1 − α)·w_a + α·w_b), the linear path between two weight sets
  (Goodfellow, Vinyals & Saxe, 2015);
* :func:`surface_2d`: L(w + α·d₁ + β·d₂) over a grid (Li et al., 2018);
* :func:`filter_normalized_direction`: the random direction of Li et al.

Raw random directions are meaningless for comparing networks: ReLU networks can rescale a
layer without changing the function, which rescales its curvature. Filter normalisation
removes that by giving every filter of the direction the norm of the matching filter of
the weights. The plots are in :mod:`flatminima.sharpness.plots`.

The loss is the unweighted mean of ``loss_fn`` over the batches, evaluated in eval mode by
default, and the model is left exactly as found (see :mod:`flatminima.sharpness`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.sharpness._common import (
    LossFn,
    as_batch_list,
    assign_,
    flatten,
    make_generator,
    mean_loss,
    measuring,
    trainable_parameters,
)

__all__ = [
    "Landscape1D",
    "Landscape2D",
    "filter_normalized_direction",
    "interpolate_1d",
    "landscape_1d",
    "surface_2d",
]


@dataclass(frozen=True)
class Landscape1D:
    """The loss along a line: ``losses[i]`` is the loss at coordinate ``alphas[i]``.

    Attributes:
        alphas: 1-D float64 coordinates along the line.
        losses: 1-D float64 losses, same length.
        axis_label: what α means, for plots.
    """

    alphas: Tensor
    losses: Tensor
    axis_label: str = "α"


@dataclass(frozen=True)
class Landscape2D:
    """The loss over a plane: ``losses[i, j]`` is the loss at (``alphas[j]``, ``betas[i]``).

    Rows follow β and columns α, the layout ``contour(alphas, betas, losses)`` expects.

    Attributes:
        alphas: 1-D float64 coordinates along the first direction.
        betas: 1-D float64 coordinates along the second direction.
        losses: (len(betas), len(alphas)) float64.
    """

    alphas: Tensor
    betas: Tensor
    losses: Tensor


def filter_normalized_direction(
    model: nn.Module, *, seed: int = 0, include_1d: bool = False
) -> list[Tensor]:
    """A random Gaussian direction rescaled filter by filter to the norms of the weights.

    d_{i} ← d_{i} · ‖w_{i}‖ / ‖d_{i}‖  for every filter i,  d ~ N(0, I)  (Li et al., 2018, §4)

    A filter is a slice along the first dimension of a weight tensor with two or more
    dimensions: a row of a Linear weight (one output unit), an output channel of a Conv
    weight. Parameters with fewer than two dimensions (biases, BatchNorm and LayerNorm
    scales and shifts) are set to zero in the direction by default, as Li et al. do; with
    ``include_1d=True`` each of their entries is its own filter, so the direction there is
    ±|w_i| with a random sign. A zero filter of the weights gives a zero filter of d.

    Args:
        model: the network; one tensor is returned per trainable parameter.
        seed: seeds the Gaussian draw (drawn on the CPU in float64, so the same seed gives
            the same direction on every device).
        include_1d: perturb parameters with fewer than two dimensions too.

    Returns:
        One tensor per trainable parameter, shaped, typed and placed like it.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> d = filter_normalized_direction(model, seed=0)
        >>> torch.allclose(d[0].norm(dim=1), model.weight.norm(dim=1)), d[1].abs().sum().item()
        (True, 0.0)
    """
    return _filter_normalized(trainable_parameters(model), make_generator(seed), include_1d)


def _filter_normalized(
    params: Sequence[Tensor], generator: torch.Generator, include_1d: bool
) -> list[Tensor]:
    direction = []
    for p in params:
        w = p.detach().to(device="cpu", dtype=torch.float64)
        if (w.dim() < 2 and not include_1d) or w.numel() == 0:
            direction.append(torch.zeros_like(p, requires_grad=False))
            continue
        # One row per filter: the first dimension, or every entry of a 0-d/1-d parameter.
        rows = (w.shape[0], w.numel() // w.shape[0]) if w.dim() >= 2 else (w.numel(), 1)
        d = torch.randn(rows, generator=generator, dtype=torch.float64)
        d *= w.reshape(rows).norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True)
        direction.append(d.reshape(p.shape).to(device=p.device, dtype=p.dtype))
    return direction


def _coordinates(name: str, values: Sequence[float] | Tensor | None, default: Tensor) -> Tensor:
    if values is None:
        return default
    coords = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if coords.dim() != 1 or coords.numel() == 0 or not torch.isfinite(coords).all():
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of finite numbers, got {values!r}"
        )
    return coords


def _check_direction(name: str, direction: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The direction as one flat float64 vector, after checking it matches the parameters."""
    direction = list(direction)
    if len(direction) != len(params) or any(
        d.shape != p.shape for d, p in zip(direction, params, strict=False)
    ):
        raise ValueError(
            f"{name} must hold one tensor per trainable parameter, shaped like it: expected "
            f"{[tuple(p.shape) for p in params]}, got {[tuple(d.shape) for d in direction]}"
        )
    return flatten(direction, dtype=torch.float64, device=params[0].device)


def _scan(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    tensors: Sequence[Tensor],
    directions: Sequence[Tensor],
    points: Iterable[Sequence[float]],
    *,
    train_mode: bool,
) -> list[float]:
    """The mean batch loss with ``tensors`` set to origin + Σ_i c_i·directions_i, per point c.

    The arithmetic is in float64 and cast on assignment, so c = 0 reproduces the weights
    bit for bit.
    """
    batch_list = as_batch_list(batches)
    origin = flatten(tensors, dtype=torch.float64, device=directions[0].device)
    losses = []
    with measuring(model, train_mode=train_mode):
        for point in points:
            moved = origin.clone()
            for c, d in zip(point, directions, strict=True):
                moved.add_(d, alpha=float(c))
            assign_(tensors, moved)
            losses.append(mean_loss(model, loss_fn, batch_list))
    return losses


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    direction: Sequence[Tensor] | None = None,
    alphas: Sequence[float] | Tensor | None = None,
    seed: int = 0,
    include_1d: bool = False,
    train_mode: bool = False,
) -> Landscape1D:
    """The loss along a line through the weights: L(w + α·d) for each α.

    By default d is :func:`filter_normalized_direction` (Li et al., 2018), so α = 1 moves
    every filter by its own norm and slices of different networks are comparable. Any other
    direction can be given, e.g. a Hessian eigenvector from
    :func:`flatminima.sharpness.hessian_eigenpairs` (then α is a Euclidean distance).

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches; the loss is the mean over them.
        direction: one tensor per trainable parameter, or ``None`` for a random
            filter-normalised direction drawn from ``seed`` (with ``include_1d``).
        alphas: coordinates along d; default 21 points evenly spaced in [-1, 1].
        seed: seeds the random direction (unused when ``direction`` is given).
        include_1d: also perturb biases and normalisation parameters (random direction only).
        train_mode: measure the train-mode loss.

    Returns:
        A :class:`Landscape1D`; plot it with :func:`flatminima.sharpness.plot_landscape_1d`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> line = landscape_1d(model, loss_fn, [x], alphas=[-1.0, 0.0, 1.0])
        >>> line.losses[1].item() == loss_fn(model, x).item()
        True
    """
    params = trainable_parameters(model)
    alphas = _coordinates("alphas", alphas, torch.linspace(-1.0, 1.0, 21, dtype=torch.float64))
    if direction is None:
        direction = _filter_normalized(params, make_generator(seed), include_1d)
        label = "α (filter-normalised random direction)"
    else:
        label = "α (along the given direction)"
    d = _check_direction("direction", direction, params)
    losses = _scan(
        model, loss_fn, batches, params, [d], [(a,) for a in alphas.tolist()], train_mode=train_mode
    )
    return Landscape1D(alphas, torch.tensor(losses, dtype=torch.float64), label)


def interpolate_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    target: nn.Module | Mapping[str, Tensor],
    *,
    alphas: Sequence[float] | Tensor | None = None,
    train_mode: bool = False,
) -> Landscape1D:
    """The loss on the straight line between two weight sets: L((1 − α)·w_a + α·w_b).

    w_a is the model's current state and w_b the ``target``'s (Goodfellow, Vinyals & Saxe,
    2015): α = 0 is the model, α = 1 the target. Every floating-point entry of the state dict
    is interpolated, parameters (frozen ones too) *and* buffers such as BatchNorm's running
    statistics, so that in eval mode the end point really is the target network; integer
    buffers (``num_batches_tracked``) keep the model's values.

    Args:
        model: the network at w_a.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches; the loss is the mean over them.
        target: a module of the same architecture, or its ``state_dict()``.
        alphas: interpolation coefficients; default 21 points evenly spaced in [-0.5, 1.5].
        train_mode: measure the train-mode loss.

    Returns:
        A :class:`Landscape1D`.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> x = torch.randn(8, 2)
        >>> loss_fn = lambda m, batch: m(batch).pow(2).mean()
        >>> line = interpolate_1d(a, loss_fn, [x], b, alphas=[0.0, 1.0])
        >>> ends = [loss_fn(a, x).item(), loss_fn(b, x).item()]
        >>> torch.allclose(line.losses, torch.tensor(ends, dtype=torch.float64))
        True
    """
    alphas = _coordinates("alphas", alphas, torch.linspace(-0.5, 1.5, 21, dtype=torch.float64))
    target_state = target.state_dict() if isinstance(target, nn.Module) else target
    tensors, ends = [], []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        end = target_state.get(name)
        if end is None or end.shape != tensor.shape:
            got = "missing" if end is None else f"shape {tuple(end.shape)}"
            raise ValueError(
                f"target must have the model's state entries with the same shapes: "
                f"{name!r} has shape {tuple(tensor.shape)} in the model, {got} in target"
            )
        tensors.append(tensor)
        ends.append(end)
    if not tensors:
        raise ValueError("model must have at least one floating-point parameter or buffer")
    device = tensors[0].device
    start = flatten(tensors, dtype=torch.float64, device=device)
    d = flatten(ends, dtype=torch.float64, device=device) - start
    losses = _scan(
        model,
        loss_fn,
        batches,
        tensors,
        [d],
        [(a,) for a in alphas.tolist()],
        train_mode=train_mode,
    )
    return Landscape1D(
        alphas,
        torch.tensor(losses, dtype=torch.float64),
        "α (interpolation: 0 = model, 1 = target)",
    )


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    alphas: Sequence[float] | Tensor | None = None,
    betas: Sequence[float] | Tensor | None = None,
    seed: int = 0,
    include_1d: bool = False,
    train_mode: bool = False,
) -> Landscape2D:
    """The loss over a plane through the weights: L(w + α·d₁ + β·d₂) on a grid.

    By default d₁ and d₂ are two independent random filter-normalised directions (Li et al.,
    2018), nearly orthogonal in high dimension; d₁ is ``filter_normalized_direction(model,
    seed=seed)``, so the β = 0 row equals :func:`landscape_1d` with the same seed. The grid
    costs len(alphas)·len(betas) passes over the batches.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches; the loss is the mean over them.
        directions: (d₁, d₂), each one tensor per trainable parameter, or ``None`` for two
            random filter-normalised directions drawn from ``seed`` (with ``include_1d``).
        alphas: coordinates along d₁; default 21 points evenly spaced in [-1, 1].
        betas: coordinates along d₂; default as ``alphas``.
        seed: seeds the random directions.
        include_1d: also perturb biases and normalisation parameters (random directions only).
        train_mode: measure the train-mode loss.

    Returns:
        A :class:`Landscape2D`; plot it with :func:`flatminima.sharpness.plot_surface_2d`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> x = torch.randn(8, 2)
        >>> loss_fn = lambda m, batch: m(batch).pow(2).mean()
        >>> surface = surface_2d(model, loss_fn, [x], alphas=[-1.0, 0.0, 1.0], betas=[0.0, 1.0])
        >>> surface.losses.shape, surface.losses[0, 1].item() == loss_fn(model, x).item()
        (torch.Size([2, 3]), True)
    """
    params = trainable_parameters(model)
    default = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)
    alphas = _coordinates("alphas", alphas, default)
    betas = _coordinates("betas", betas, default)
    if directions is None:
        generator = make_generator(seed)
        directions = (
            _filter_normalized(params, generator, include_1d),
            _filter_normalized(params, generator, include_1d),
        )
    if len(directions) != 2:
        raise ValueError(f"directions must be a pair (d1, d2), got {len(directions)} directions")
    d1 = _check_direction("directions[0]", directions[0], params)
    d2 = _check_direction("directions[1]", directions[1], params)
    points = [(a, b) for b in betas.tolist() for a in alphas.tolist()]
    losses = _scan(model, loss_fn, batches, params, [d1, d2], points, train_mode=train_mode)
    grid = torch.tensor(losses, dtype=torch.float64).reshape(len(betas), len(alphas))
    return Landscape2D(alphas, betas, grid)
