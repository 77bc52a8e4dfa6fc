"""Runs a flatminima method beside its authors' code and prints how far the weights drift apart.

The authors' code is not part of this repository: fetch it yourself and point ``--authors-dir``
at the folder that holds it (it is imported from there at run time). Both optimizers run in
float64 for 8 steps on the same small MLP and the same batches, with SGD (lr 0.1, momentum 0.9,
weight decay 5e-4); each step prints the largest absolute weight difference. Where the
authors' code has a known problem, a case runs it as released and again with the problem
neutralised, and says which is which.

    python scripts/compare_with_authors.py --method gsam --authors-dir /tmp/authors/GSAM
    python scripts/compare_with_authors.py --method wsam --authors-dir /tmp/authors/dlrover

Authors' code:

* GSAM: juntang-zhuang/GSAM @ a770275 (the first author's PyTorch port), the package ``gsam/``
  (``gsam.py``, ``scheduler.py``, ``util.py``, ``__init__.py``) under ``--authors-dir``.
* WSAM: intelligent-machine-learning/dlrover @ 4584843, ``atorch/atorch/optimizers/wsam.py`` and
  ``utils.py``, as ``atorch/optimizers/`` under ``--authors-dir`` (with empty ``__init__.py``
  files for ``atorch`` and ``atorch/optimizers``: the real ones import all of atorch).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
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

# -- GSAM (juntang-zhuang/GSAM) -------------------------------------------------------------


def compare_gsam(authors_dir: str) -> None:
    gsam = import_from(authors_dir, "gsam")
    port = gsam.GSAM

    class PortWithoutStabilisers(port):
        """The port with ξ removed from its decomposition and the weights restored by copy:
        what is left to compare is the algorithm itself."""

        def perturb_weights(self, rho=0.0):
            self._saved = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
            super().perturb_weights(rho=rho)

        def unperturb(self):
            with torch.no_grad():
                for p, saved in self._saved.items():
                    p.copy_(saved)

        @torch.no_grad()
        def gradient_decompose(self, alpha=0.0):
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            inner = sum(float((self.state[p]["old_g"] * p.grad).sum()) for p in params)
            squared = sum(float((p.grad * p.grad).sum()) for p in params)
            for p in params:
                vertical = self.state[p]["old_g"] - inner / squared * p.grad
                p.grad.add_(vertical, alpha=-alpha)

    def theirs(cls, alpha, adaptive, make_schedulers, neutralise_first_tick=False):
        def build(model):
            base = sgd(model)
            lr_scheduler, rho_scheduler = make_schedulers(base)
            optimizer = cls(
                params=model.parameters(),
                base_optimizer=base,
                model=model,
                gsam_alpha=alpha,
                rho_scheduler=rho_scheduler,
                adaptive=adaptive,
            )
            if neutralise_first_tick:
                rho_scheduler.t = 0  # undo the tick of GSAM.__init__ (its ρ is value(0) still)

            def step(batch):
                optimizer.set_closure(F.cross_entropy, *batch)
                optimizer.step()
                lr_scheduler.step()
                optimizer.update_rho_t()

            return step

        return build

    def ours(alpha, adaptive, make_lr_scheduler, **schedule):
        def build(model):
            optimizer = flatminima.GSAM(
                sgd(model), alpha=alpha, adaptive=adaptive, model=model, **schedule
            )
            lr_scheduler = make_lr_scheduler(optimizer.base_optimizer)

            def step(batch):
                optimizer.step(closure_for(model, batch))
                lr_scheduler.step()

            return step

        return build

    def constant(rho):
        def make(base):
            lr = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
            return lr, gsam.ProportionScheduler(lr, LR, 0.0, rho, rho)

        return make

    def cosine(rho_max, rho_min):  # README Method 1.2: ProportionScheduler over a torch scheduler
        def make(base):
            lr = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=STEPS, eta_min=0.0)
            return lr, gsam.ProportionScheduler(lr, LR, 0.0, rho_max, rho_min)

        return make

    def linear(rho_max, rho_min):  # README Method 1.1: one LinearScheduler for lr, one for ρ
        def make(base):
            lr = gsam.LinearScheduler(T_max=STEPS, max_value=LR, min_value=0.0, optimizer=base)
            return lr, gsam.LinearScheduler(T_max=STEPS, max_value=rho_max, min_value=rho_min)

        return make

    def no_schedule(base):
        return torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)

    def our_cosine(base):
        return torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=STEPS, eta_min=0.0)

    def our_linear(base):
        return gsam.LinearScheduler(T_max=STEPS, max_value=LR, min_value=0.0, optimizer=base)

    print("GSAM against juntang-zhuang/GSAM (gsam/gsam.py), 8 steps, float64")
    for alpha, adaptive, rho in ((0.4, False, 0.1), (0.4, True, 1.0), (0.0, False, 0.1)):
        label = f"ρ = {rho} fixed, α = {alpha}, adaptive = {adaptive}"
        for name, cls in (
            ("as released", port),
            ("ξ removed, restore by copy", PortWithoutStabilisers),
        ):
            run_side_by_side(
                f"{label}; port {name}",
                ours(alpha, adaptive, no_schedule, rho=rho),
                theirs(cls, alpha, adaptive, constant(rho)),
            )
    schedule = {"rho": 0.2, "rho_min": 0.05}
    run_side_by_side(
        "ρ_t ∝ lr: ProportionScheduler over CosineAnnealingLR (README 1.2), ρ 0.2 → 0.05, α = 0.4",
        ours(0.4, False, our_cosine, **schedule),
        theirs(port, 0.4, False, cosine(0.2, 0.05)),
    )
    run_side_by_side(
        "the same, port with ξ removed and restore by copy",
        ours(0.4, False, our_cosine, **schedule),
        theirs(PortWithoutStabilisers, 0.4, False, cosine(0.2, 0.05)),
    )
    run_side_by_side(
        "ρ_t ∝ lr: LinearScheduler for lr and for ρ (README 1.1), as released: ρ one step ahead",
        ours(0.4, False, our_linear, **schedule),
        theirs(port, 0.4, False, linear(0.2, 0.05)),
    )
    run_side_by_side(
        "the same with the ρ scheduler's tick in GSAM.__init__ undone",
        ours(0.4, False, our_linear, **schedule),
        theirs(port, 0.4, False, linear(0.2, 0.05), neutralise_first_tick=True),
    )
    run_side_by_side(
        "the same with the tick undone, ξ removed and restore by copy",
        ours(0.4, False, our_linear, **schedule),
        theirs(PortWithoutStabilisers, 0.4, False, linear(0.2, 0.05), neutralise_first_tick=True),
    )


# -- WSAM (intelligent-machine-learning/dlrover, atorch) ---------------------------------------


def compare_wsam(authors_dir: str) -> None:
    weighted_sam = import_from(authors_dir, "atorch.optimizers.wsam").WeightedSAM

    def theirs(**options):
        def build(model):
            optimizer = weighted_sam(model, sgd(model), **options)

            def step(batch):
                optimizer.zero_grad()  # the training driver's zero_grad before step(closure)
                optimizer.step(closure_for(model, batch))

            return step

        return build

    def ours(**options):
        def build(model):
            optimizer = flatminima.WSAM(sgd(model), model=model, **options)
            return lambda batch: optimizer.step(closure_for(model, batch))

        return build

    print("WSAM against dlrover's atorch WeightedSAM (atorch/optimizers/wsam.py), 8 steps, float64")
    cases = [
        {"rho": 0.1, "gamma": 0.9},
        {"rho": 0.1, "gamma": 0.7, "decouple": False},
        {"rho": 0.1, "gamma": 0.9, "max_norm": 0.1},
        {"rho": 0.1, "gamma": 0.6, "decouple": False, "max_norm": 0.1},
        {"rho": 0.5, "gamma": 0.9, "adaptive": True},
        {"rho": 0.1, "gamma": 0.5, "decouple": False},
    ]
    for options in cases:
        title = ", ".join(f"{k} = {v}" for k, v in options.items())
        run_side_by_side(title, ours(**options), theirs(**options))
    model = small_mlp()
    closure_for(model, fixed_batches()[0])()
    norm = float(torch.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters())))
    print(f"  (‖g‖ at the first step: {norm:.3f}, so max_norm = 0.1 clips)")
    print(
        "  (the authors' code restores w by subtracting ε, ours by copy: differences of a few "
        "1e-16 per step are that rounding)"
    )


METHODS: dict[str, Callable[[str], None]] = {
    "gsam": compare_gsam,
    "wsam": compare_wsam,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--authors-dir", required=True, help="the folder holding the authors' code")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    METHODS[args.method](args.authors_dir)


if __name__ == "__main__":
    main()
