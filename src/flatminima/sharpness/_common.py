"""Plumbing shared by the sharpness measurements: batches, parameters, flat vectors, a model guard.

Every measurement sees the model through the same three conventions:

* ``loss_fn(model, batch)`` returns a scalar loss tensor;
* the loss being measured is the *unweighted mean* of ``loss_fn`` over the batches;
* the model is evaluated in eval mode unless ``train_mode=True``, and whatever a measurement
  does to weights, buffers or modes is undone by copy when it returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar loss tensor``."""


def as_batch_list(batches: Iterable[Any]) -> Sequence[Any]:
    """The batches as a sequence that can be iterated many times.

    A list or tuple is used as given. Any other iterable (a generator, a ``DataLoader``) is
    materialised once, so that every pass of an iterative method sees the same batches: a
    shuffling loader would otherwise change the operator between two matrix-vector products.
    """
    if isinstance(batches, Tensor):
        raise ValueError(
            "batches must be an iterable of batches (a list, a DataLoader...), got a Tensor; "
            "wrap a single batch as [batch]"
        )
    batch_list = batches if isinstance(batches, (list, tuple)) else list(batches)
    if len(batch_list) == 0:
        raise ValueError("batches must contain at least one batch, got none")
    return batch_list


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad=True``: the coordinates every measurement moves."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model must have at least one parameter with requires_grad=True")
    return params


def scalar_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a 0-d tensor (autograd needs a scalar)."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (0-d) tensor, got {got}")
    return loss


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> float:
    """(1/B) Σ_b loss_fn(model, b), without building a graph, as a Python float."""
    with torch.no_grad():
        total = sum(float(scalar_loss(loss_fn, model, batch)) for batch in batches)
    return total / len(batches)


def gradients(
    loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False
) -> tuple[Tensor, ...]:
    """∂loss/∂p for every p, zeros for parameters the loss does not use; ``.grad`` is untouched."""
    return torch.autograd.grad(
        loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )


def flatten(tensors: Iterable[Tensor], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """All tensors concatenated into one 1-D tensor of ``dtype`` on ``device``."""
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``vector`` cut into tensors shaped, typed and placed like ``like``."""
    pieces = vector.split([t.numel() for t in like])
    return [
        piece.reshape(t.shape).to(device=t.device, dtype=t.dtype)
        for piece, t in zip(pieces, like, strict=True)
    ]


def assign_(tensors: Sequence[Tensor], vector: Tensor) -> None:
    """Copies the flat ``vector`` into ``tensors`` in place (the model's own tensors stay)."""
    with torch.no_grad():
        for t, piece in zip(tensors, vector.split([t.numel() for t in tensors]), strict=True):
            t.copy_(piece.reshape(t.shape))


def basis_device(params: Sequence[Tensor]) -> torch.device:
    """Where float64 work vectors live: with the parameters, except on MPS (no float64)."""
    device = params[0].device
    return torch.device("cpu") if device.type == "mps" else device


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws are the same on every device for the same seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


@contextmanager
def measuring(model: nn.Module, *, train_mode: bool) -> Iterator[None]:
    """Puts ``model`` in eval (or train) mode; restores weights, buffers and modes on exit.

    The restore is by copy from a snapshot taken on entry, so it is bit-exact, keeps the
    model's own tensor objects (optimizers holding them stay valid), and runs even when the
    measurement raises. Modes are restored module by module, so a model that was partly in
    eval mode comes back exactly so. BatchNorm running statistics updated by train-mode
    forwards are restored with the other buffers.
    """
    modes = [(module, module.training) for module in model.modules()]
    snapshot = [(t, t.detach().clone()) for t in chain(model.parameters(), model.buffers())]
    model.train(train_mode)
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, saved in snapshot:
                tensor.copy_(saved)
        for module, training in modes:
            module.training = training
