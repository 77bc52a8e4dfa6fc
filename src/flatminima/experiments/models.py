"""Small models for the experiment datasets, written here (no torchvision dependency).

==========  ========================  ====================================================
name        inputs                    model
==========  ========================  ====================================================
``mlp``     any shape (flattened)     two hidden ReLU layers of 256 units
``cnn1d``   sequences (C, L)          three strided 1-D convolutions, for MNIST-1D
``cnn``     images (C, H, W)          two conv + max-pool blocks and a 128-unit layer
``resnet20`` images (C, H, W)         ResNet-20 (He et al. 2016, §4.2) with BatchNorm
==========  ========================  ====================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    """A multilayer perceptron on the flattened input."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN1D(nn.Module):
    """Three stride-2 1-D convolutions and a linear classifier (the MNIST-1D paper's shape)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        in_channels, length = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, in_channels, length)).shape[1]
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Two 3×3 convolution + 2×2 max-pool blocks (32, 64 channels) and a 128-unit layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20: a 16-channel stem, three stages of three basic blocks (16, 32, 64 channels,
    stride 2 between stages), global average pooling and a linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        in_channels = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        channels = 16
        for stage_channels, first_stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                blocks.append(
                    BasicBlock(channels, stage_channels, first_stride if index == 0 else 1)
                )
                channels = stage_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and which inputs it accepts."""

    build: Callable[[tuple[int, ...], int], nn.Module]
    input_ndim: int | None
    """Dimensions of one input example (2: channels × length, 3: channels × height × width);
    ``None`` for a model that takes any shape."""


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, None),  # two hidden layers of 256
    "cnn1d": ModelSpec(CNN1D, 2),  # sequences such as MNIST-1D
    "cnn": ModelSpec(SmallCNN, 3),  # a small 2-D CNN for images
    "resnet20": ModelSpec(ResNet20, 3),  # with BatchNorm, for images
}
INPUT_KIND = {2: "1-D sequences", 3: "images"}


def check_model(name: str, input_shape: tuple[int, ...] | None = None) -> None:
    """``ValueError`` for an unknown model or one that cannot take inputs of ``input_shape``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    spec = MODELS[name]
    if input_shape is not None and spec.input_ndim not in (None, len(input_shape)):
        accepted = [
            model for model, other in MODELS.items() if other.input_ndim in (None, len(input_shape))
        ]
        raise ValueError(
            f"model {name!r} takes {INPUT_KIND[spec.input_ndim]}, not inputs of shape "
            f"{tuple(input_shape)}; accepted for this dataset: {', '.join(accepted)}"
        )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model (seed PyTorch first for a reproducible initialisation)."""
    check_model(name, input_shape)
    return MODELS[name].build(tuple(input_shape), num_classes)
