"""Runs a flatminima method beside its authors' code and prints how far the weights drift apart.

The authors' code is not part of this repository: fetch it yourself and point ``--authors-dir``
at the folder that holds it (it is imported from there at run time). Both optimizers run in
float64 for 8 steps on the same small MLP and the same batches, with SGD (lr 0.1, momentum 0.9,
weight decay 5e-4); each step prints the largest absolute weight difference.

    python scripts/compare_with_authors.py --method esam --authors-dir /tmp/authors/Efficient_SAM

Authors' code:

* ESAM: dydjw9/Efficient_SAM @ 1e06840, ``utils/Esam.py`` under ``--authors-dir`` (as
  ``utils/Esam.py``).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import flatminima
from authors.common import (  # noqa: F401 - the helpers every comparison shares
    LR,
    MOMENTUM,
    STEPS,
    WEIGHT_DECAY,
    Batch,
    closure_for,
    fixed_batches,
    import_from,
    largest_difference,
    run_side_by_side,
    sgd,
    small_mlp,
)

# -- ESAM (dydjw9/Efficient_SAM) ----------------------------------------------------------------


class _SeededRandom:
    """Stands in for the ``random`` module inside their ``Esam.py``: ``random()`` draws from a
    seeded torch generator, one float64 uniform per call, the stream flatminima's ESAM draws
    from (one uniform per tensor, in parameter order)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def random(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


class _InputLog(nn.Module):
    """Their ESAM calls the model itself: this wrapper records what each call was given, so
    that the examples their second pass used can be compared with ours."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.model(x)


def _esam_case(
    esam_module: Any, *, rho: float, beta: float, gamma: float, seed: int, verbose: bool
) -> tuple[float, int, int | None]:
    """Both ESAMs on the same batches with the same draws. Returns the worst weight
    difference, the number of steps whose selected examples agree, and the step at which
    their code crashed (``None`` if it did not)."""
    ours_model, theirs_model = small_mlp(), small_mlp()
    ours = flatminima.ESAM(
        sgd(ours_model),
        rho=rho,
        beta=beta,
        gamma=gamma,
        generator=torch.Generator().manual_seed(seed),
    )
    esam_module.random = _SeededRandom(seed)
    logged = _InputLog(theirs_model)
    base = sgd(theirs_model)
    theirs = esam_module.ESAM(theirs_model.parameters(), base, rho=rho, beta=beta, gamma=gamma)
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    differences, agreeing, crashed = [], 0, None
    for step, (x, y) in enumerate(fixed_batches()):
        our_rows: list[torch.Tensor | None] = []

        def closure(evaluation, x=x, y=y, our_rows=our_rows):
            rows = evaluation.examples_for(len(y))
            our_rows.append(rows)
            inputs, targets = (x, y) if rows is None else (x[rows], y[rows])
            losses = F.cross_entropy(ours_model(inputs), targets, reduction="none")
            if evaluation.needs_gradient:
                losses.mean().backward()
            return losses

        ours.step(closure)
        logged.inputs.clear()
        theirs.paras = [x, y, loss_fct, logged, lambda loss: loss.backward()]
        try:
            theirs.step()
        except RuntimeError as error:  # every tensor switched off: nothing to differentiate
            crashed = step
            if verbose:
                print(f"    their step {step} raised: {str(error).splitlines()[0]}")
            break
        ours_inputs = x if our_rows[-1] is None else x[our_rows[-1]]
        their_inputs = logged.inputs[-1]
        agreeing += int(torch.equal(ours_inputs, their_inputs))
        differences.append(largest_difference(ours_model, theirs_model))
    if verbose and differences:
        print("    " + "  ".join(f"{d:.1e}" for d in differences))
    return max(differences, default=0.0), agreeing, crashed


def compare_esam(authors_dir: str) -> None:
    """dydjw9/Efficient_SAM ``utils/Esam.py`` against :class:`flatminima.ESAM`.

    Their ``random.random()`` is replaced by draws from a seeded torch generator, the stream
    ours draws from, so that both switch off the same tensors one step late; their model is
    wrapped to record the examples their last pass used. flatminima's ESAM departs from theirs
    only where theirs crashes (a draw that keeps no tensor; ⌊γ·B⌋ = 0) or selects nothing
    (every loss rise tied): neither happens in the fixed-seed cases, so those must agree to
    rounding; the seed sweep counts the crashes of their code and compares the other seeds.
    """
    esam_module = import_from(authors_dir, "utils.Esam")
    # Their `inputs[[mask]]` (a list holding a boolean mask) still selects by the mask here,
    # with a deprecation warning on every step; the comparison checks the rows it selected.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
    cases = [
        ("run.sh, wide ResNet: ρ = 0.1, β = 0.5, γ = 0.5", {"rho": 0.1, "beta": 0.5, "gamma": 0.5}),
        ("run.sh, ResNet-18: ρ = 0.05, β = 0.6, γ = 0.5", {"rho": 0.05, "beta": 0.6, "gamma": 0.5}),
        (
            "a quarter of the batch: ρ = 0.2, β = 0.7, γ = 0.25",
            {"rho": 0.2, "beta": 0.7, "gamma": 0.25},
        ),
        ("β = γ = 1 (SAM with ξ = 1e-7)", {"rho": 0.1, "beta": 1.0, "gamma": 1.0}),
    ]
    for title, hyperparameters in cases:
        print(f"  {title} (draw seed 0)")
        worst, agreeing, crashed = _esam_case(esam_module, seed=0, verbose=True, **hyperparameters)
        status = "ran" if crashed is None else f"their code crashed at step {crashed}"
        print(
            f"    worst over {STEPS} steps: {worst:.3e}; same examples in the last pass on "
            f"{agreeing} steps; {status}"
        )
    seeds = range(40)
    print(f"  seed sweep, ρ = 0.1, β = 0.5, γ = 0.5, draw seeds 0-{len(seeds) - 1}")
    results = [
        _esam_case(esam_module, rho=0.1, beta=0.5, gamma=0.5, seed=seed, verbose=False)
        for seed in seeds
    ]
    ran = [r for r in results if r[2] is None]
    print(
        f"    their code crashed on {len(results) - len(ran)} of {len(results)} seeds "
        f"(a draw switched every tensor off); on the {len(ran)} others the worst weight "
        f"difference is {max(r[0] for r in ran):.3e} and the examples agree on "
        f"{sum(r[1] for r in ran)} of {STEPS * len(ran)} steps"
    )


METHODS: dict[str, Callable[[str], None]] = {
    "esam": compare_esam,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--authors-dir", required=True, help="folder holding the authors' code")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{arguments.method}: flatminima vs the authors' code, float64, {STEPS} steps")
    METHODS[arguments.method](arguments.authors_dir)


if __name__ == "__main__":
    main()
