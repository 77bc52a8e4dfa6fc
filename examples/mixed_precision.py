"""fp16 with a GradScaler, any method, plain PyTorch (runs on CPU in seconds).

Attach the scaler once; then every pass of every step is unscaled by the step itself, and an
overflow on any pass skips the step (weights restored) and backs the scale off at
``scaler.update()``. Prints whether the fp16 run tracks an fp32 run of the same steps.

    python examples/mixed_precision.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import flatminima
from flatminima import amp


def train(fp16: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.05), rho=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    amp.use_grad_scaler(optimizer, scaler)  # once

    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(32, 20, generator=generator)
        y = torch.randint(0, 5, (32,), generator=generator)

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        scaler.step(optimizer, closure)  # or optimizer.step(closure): the same step
        scaler.update()
    return model


if __name__ == "__main__":
    mixed, full = train(fp16=True), train(fp16=False)
    gap = max(
        float((a - b).detach().abs().max())
        for a, b in zip(mixed.parameters(), full.parameters(), strict=True)
    )
    print(f"fp16 tracks fp32 (largest weight difference {gap:.1e} < 1e-2): {gap < 1e-2}")
