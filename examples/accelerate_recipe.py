"""Hugging Face accelerate: ``prepare()`` that keeps the flatminima API, with
``accumulate()`` windows evaluated at every point (CPU, seconds).

    python examples/accelerate_recipe.py
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F

import flatminima
from flatminima.integrations.accelerate import prepare

if __name__ == "__main__":
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=4
    )  # mixed_precision="fp16" on a GPU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = flatminima.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 20, generator=generator)
    y = x[:, :5].argmax(dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model, optimizer, loader = prepare(accelerator, model, optimizer, loader)

    losses = []
    for _ in range(3):
        for xs, ys in loader:
            with accelerator.accumulate(model):

                def closure(xs=xs, ys=ys):
                    loss = F.cross_entropy(model(xs), ys)
                    accelerator.backward(loss)
                    return loss

                loss = optimizer.step(closure)  # None until the window's last micro-batch
                if loss is not None:
                    losses.append(float(loss))
    print(f"{len(losses)} SAM steps of 4 micro-batches each, loss fell: {losses[-1] < losses[0]}")
