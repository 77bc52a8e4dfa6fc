"""What every side-by-side run of ``scripts/authors`` shares: the small MLP, the batches, the
base SGD, and how weights are compared (float64, 8 steps, SGD lr 0.1, momentum 0.9, wd 5e-4)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

STEPS = 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

Batch = tuple[torch.Tensor, torch.Tensor]


# -- shared by every method ---------------------------------------------------------------------


def small_mlp(seed: int = 0) -> nn.Module:
    """10 → 16 → 16 → 3, tanh, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def fixed_batches(count: int = STEPS, size: int = 32, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 10, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def closure_for(model: nn.Module, batch: Batch) -> Callable[[], torch.Tensor]:
    x, y = batch

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((x.detach() - y.detach()).abs().max())
        for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


def run_side_by_side(
    title: str,
    ours: Callable[[nn.Module], Callable[[Batch], None]],
    theirs: Callable[[nn.Module], Callable[[Batch], None]],
) -> float:
    """Builds both from the same initial weights, steps both on the same batches, prints the
    largest weight difference after each step, and returns the worst."""
    our_model, their_model = small_mlp(), small_mlp()
    our_step, their_step = ours(our_model), theirs(their_model)
    differences = []
    for batch in fixed_batches():
        our_step(batch)
        their_step(batch)
        differences.append(largest_difference(our_model, their_model))
    print(f"  {title}")
    print("    " + "  ".join(f"{d:.1e}" for d in differences))
    print(f"    worst over {STEPS} steps: {max(differences):.3e}")
    return max(differences)


def import_from(authors_dir: str, module: str) -> Any:
    sys.path.insert(0, authors_dir)
    try:
        return __import__(module, fromlist=["*"])
    except ImportError as error:
        raise SystemExit(
            f"cannot import {module!r} from {authors_dir}: {error} (see this script's docstring "
            "for the files it needs)"
        ) from None
