"""The three ways to drive a flatminima step, on scikit-learn's digits (runs in seconds).

1. ``step(closure)``: the closure runs forward + backward; the optimizer calls it as often as
   the method needs.
2. ``first_step()`` / ``second_step()``: for two-pass methods in loops that cannot hand over a
   closure (Lightning manual optimization, custom AMP loops).
3. ``evaluations()``: any method, any number of passes (Tilted SAM needs 2·num_samples).

All three give the same weights for the same data and seed.

    python examples/manual_forms.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import flatminima


def digits_batches(batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def train_with_closure(method: type, batches, **hyperparameters) -> nn.Module:
    model = fresh_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = method(base, model=model, **hyperparameters)
    for x, y in batches:

        def closure(x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


def train_with_two_steps(batches) -> nn.Module:
    model = fresh_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = flatminima.SAM(base, rho=0.05, model=model)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # pass 1 at w
        optimizer.first_step()  # w -> w + eps, gradients zeroed
        nn.functional.cross_entropy(model(x), y).backward()  # pass 2 at w + eps
        optimizer.second_step()  # back to w by copy; the base optimizer steps
    return model


def train_with_evaluations(method: type, batches, **hyperparameters) -> nn.Module:
    model = fresh_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = method(base, model=model, **hyperparameters)
    for x, y in batches:
        with optimizer.evaluations() as evaluations:  # restores the weights if anything raises
            for evaluation in evaluations:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                evaluation.report(loss)  # Tilted SAM weighs its passes by their losses
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def main() -> None:
    torch.set_num_threads(1)
    batches = digits_batches()
    closure_sam = train_with_closure(flatminima.SAM, batches, rho=0.05)
    print(
        "SAM, first_step/second_step == step(closure):",
        same_weights(train_with_two_steps(batches), closure_sam),
    )
    print(
        "SAM, evaluations() == step(closure):",
        same_weights(train_with_evaluations(flatminima.SAM, batches, rho=0.05), closure_sam),
    )
    # Tilted SAM's noise comes from the default generator, which fresh_model() seeds.
    tilted = {"rho": 0.05, "num_samples": 3, "radius": 0.1}
    closure_tilted = train_with_closure(flatminima.TiltedSAM, batches, **tilted)
    manual_tilted = train_with_evaluations(flatminima.TiltedSAM, batches, **tilted)
    print(
        "Tilted SAM, evaluations() == step(closure):", same_weights(manual_tilted, closure_tilted)
    )


if __name__ == "__main__":
    main()
