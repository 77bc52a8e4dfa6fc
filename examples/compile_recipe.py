"""torch.compile: compile the model, not the step; every method trains with it.

python examples/compile_recipe.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import flatminima

if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))
    compiled = torch.compile(model, backend="aot_eager")  # the default backend on a GPU machine
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=generator)
    y = x[:, :5].argmax(dim=1)
    losses = []
    for _ in range(30):

        def closure():
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    print(f"compiled model trained with SAM, loss fell: {losses[-1] < losses[0]}")
