"""The models and batches the benchmark trains on.

Two regimes decide what a sharpness-aware step costs:

* **W1, compute-bound** — a ResNet-20-style network on a batch of 64 CIFAR-shaped images. The
  forward/backward passes dominate, so a two-pass method should cost close to two base steps.
* **W2, optimizer-bound** — models whose forward/backward is cheap next to the number of
  parameters (``wide``) or the number of parameter tensors (``many-small``). Here the
  optimizer's own arithmetic, and any Python work per tensor, is what the step time shows.

Every workload is built from a fixed seed, so every contender trains the same weights on the
same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.experiments.models import ResNet20


@dataclass(frozen=True)
class Workload:
    """A model factory, one fixed batch and the loss that ties them together."""

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    build_batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


def resnet20_cifar() -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (0.27 M parameters in 65 tensors) for 3×32×32 inputs: the
    runner's own ``resnet20``, so the benchmark times the model users train."""
    return ResNet20((3, 32, 32), num_classes=10)


class ExpertBank(nn.Module):
    """``experts`` small linear maps, each its own weight and bias tensor, applied in one
    batched matmul, then a linear head: two parameter tensors per expert.

    The forward/backward is a handful of kernels whatever the number of experts, so the step
    time is dominated by the optimizer's cost per *tensor* — the shape of a mixture of many
    small experts, of per-head adapters, or of a deep network's many LayerNorm weights and
    biases, without their compute.
    """

    def __init__(self, experts: int, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(experts)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(experts))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, experts, width), one slice per expert: batch first, as every loop
        that slices examples off a batch (Sparse SAM's Fisher refresh) expects."""
        x = x.transpose(0, 1)
        weights = torch.stack(list(self.weights))
        biases = torch.stack(list(self.biases)).unsqueeze(1)
        hidden = torch.tanh(torch.baddbmm(biases, x, weights))
        return self.head(hidden.mean(0))


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return build


def _classification_batch(
    shape: tuple[int, ...], classes: int = 10
) -> Callable[[], tuple[Tensor, Tensor]]:
    def build() -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=generator)
        y = torch.randint(0, classes, (shape[0],), generator=generator)
        return x, y

    return build


def _expert_batch(experts: int, batch: int, width: int) -> Callable[[], tuple[Tensor, Tensor]]:
    def build() -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, experts, width, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        return x, y

    return build


WORKLOADS: dict[str, Workload] = {
    "W1-resnet20": Workload(
        name="W1-resnet20",
        description="ResNet-20 (0.27 M parameters, 65 tensors), batch 64 of 3×32×32: compute-bound",
        build_model=_seeded(resnet20_cifar),
        build_batch=_classification_batch((64, 3, 32, 32)),
        loss=F.cross_entropy,
    ),
    "W2-wide": Workload(
        name="W2-wide",
        description=(
            "MLP 1024→2048→2048→1024→10 (8.4 M parameters, 8 tensors), batch 4: "
            "optimizer-bound, large tensors"
        ),
        build_model=_seeded(
            lambda: nn.Sequential(
                nn.Linear(1024, 2048),
                nn.ReLU(),
                nn.Linear(2048, 2048),
                nn.ReLU(),
                nn.Linear(2048, 1024),
                nn.ReLU(),
                nn.Linear(1024, 10),
            )
        ),
        build_batch=_classification_batch((4, 1024)),
        loss=F.cross_entropy,
    ),
    "W2-many-small": Workload(
        name="W2-many-small",
        description=(
            "500 experts of 16×16 weight + bias and a head (0.14 M parameters, 1,002 tensors), "
            "batch 8: optimizer-bound, per-tensor overhead"
        ),
        build_model=_seeded(lambda: ExpertBank(experts=500, width=16)),
        build_batch=_expert_batch(experts=500, batch=8, width=16),
        loss=F.cross_entropy,
    ),
}
