"""Gradient accumulation with a sharpness-aware step: a closure over the micro-batches.

Every micro-batch is evaluated at every point the method visits (w, then w + ε), so the step
is the full batch's step. A backward *before* ``step(closure)`` (the usual accumulation loop)
is refused with a one-line error instead of being silently dropped.

    python examples/gradient_accumulation.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import flatminima


def fresh() -> tuple[nn.Module, flatminima.SAM]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).double()
    return model, flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)


generator = torch.Generator().manual_seed(1)
x = torch.randn(64, 20, generator=generator, dtype=torch.float64)
y = torch.randint(0, 5, (64,), generator=generator)

if __name__ == "__main__":
    model, optimizer = fresh()
    micro_batches = list(zip(x.split(16), y.split(16), strict=True))

    def closure():
        total = 0.0
        for xs, ys in micro_batches:
            loss = F.cross_entropy(model(xs), ys) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total

    optimizer.step(closure)

    full_model, full_optimizer = fresh()

    def full_batch():
        loss = F.cross_entropy(full_model(x), y)
        loss.backward()
        return loss

    full_optimizer.step(full_batch)
    same = all(
        torch.allclose(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(model.parameters(), full_model.parameters(), strict=True)
    )
    print(f"four micro-batches give the full-batch step: {same}")

    F.cross_entropy(model(x[:16]), y[:16]).backward()  # the usual loop's first micro-batch
    try:
        optimizer.step(lambda: F.cross_entropy(model(x[16:32]), y[16:32]))
        print("accumulated gradients refused: False")
    except RuntimeError as error:
        print(f"accumulated gradients refused: {'gradient accumulation' in str(error)}")
