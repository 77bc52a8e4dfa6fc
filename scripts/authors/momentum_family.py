"""Runs a flatminima method beside its authors' code and prints how far the weights drift apart.

The authors' code is not part of this repository: fetch it yourself and point ``--authors-dir``
at the folder that holds it (it is imported from there at run time). Both optimizers run in
float64 for 8 steps on the same small MLP and the same batches, with SGD (lr 0.1, momentum 0.9,
weight decay 5e-4) unless a case says otherwise; each step prints the largest absolute weight
difference. Where the authors' code has a known bug, the cases run it both as released and with
the bug neutralised where it does not bite, and say which is which.

    python scripts/compare_with_authors.py --method looksam --authors-dir /tmp/authors/MSAM
    python scripts/compare_with_authors.py --method momentum-sam --authors-dir /tmp/authors/MSAM
    python scripts/compare_with_authors.py --method bilateral-sam --authors-dir /tmp/authors/BSAM

Authors' code: LookSAM and Momentum-SAM from MarlonBecker/MSAM (``optimizer/``, ``utility/``);
Bilateral SAM from ajiaaa/BSAM (``bsam.py``, ``utility/``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

import flatminima

STEPS = 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def small_mlp(seed: int = 0) -> nn.Module:
    """8 → 16 → 4, tanh, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def fixed_batches(count: int = STEPS, size: int = 32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def largest_difference(a: nn.Module | list[torch.Tensor], b: nn.Module) -> float:
    first = list(a.parameters()) if isinstance(a, nn.Module) else a
    return max(
        float((x.detach() - y.detach()).abs().max())
        for x, y in zip(first, b.parameters(), strict=True)
    )


def ours_step(optimizer: torch.optim.Optimizer, model: nn.Module, batch, loss_fn) -> None:
    x, y = batch

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


def report(title: str, differences: list[float]) -> float:
    print(f"  {title}")
    print("    step  largest |Δw|")
    for step, difference in enumerate(differences, start=1):
        print(f"    {step:4d}  {difference:.3e}")
    worst = max(differences)
    print(f"    worst over {len(differences)} steps: {worst:.3e}")
    return worst


def import_from(authors_dir: str, module: str):
    if authors_dir not in sys.path:
        sys.path.insert(0, authors_dir)
    return importlib.import_module(module)


# -- methods-b (issue 9): LookSAM, Momentum-SAM, Bilateral SAM ------------------------------------


def _msam_repository_loss(authors_dir: str) -> Callable:
    """The MSAM repository's loss (its ``smooth_crossentropy``, per example) with smoothing 0,
    averaged: what its LookSAM backpropagates. Used on both sides."""
    args = import_from(authors_dir, "utility.args")
    args.Args.data = argparse.Namespace(label_smoothing=0.0)
    loss = import_from(authors_dir, "utility.loss")
    return lambda prediction, target: loss.smooth_crossentropy(prediction, target).mean()


def compare_looksam(authors_dir: str) -> list[float]:
    """MarlonBecker/MSAM ``optimizer/looksam.py`` (global vectors, refresh at steps 0, k, 2k...)
    against flatminima.LookSAM; pytorch_optimizer's per-tensor LookSAM beside it when
    installed."""
    authors = import_from(authors_dir, "optimizer.looksam")
    loss_fn = _msam_repository_loss(authors_dir)
    worst = []
    for rho, k, alpha in ((0.1, 2, 0.7), (0.1, 5, 0.2), (0.1, 1, 0.7)):
        data = fixed_batches()
        theirs_model, ours_model = small_mlp(), small_mlp()
        # Their step calls model.module.setBatchNormTracking (a DDP-wrapped model of theirs);
        # the MLP has no BatchNorm, so a switch that does nothing stands in for it.
        theirs_model.module = SimpleNamespace(setBatchNormTracking=lambda on: None)
        theirs = authors.LookSAM(
            theirs_model.parameters(),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            rho=rho,
            alpha=alpha,
            k=k,
        )
        ours = flatminima.LookSAM(
            torch.optim.SGD(
                ours_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            ),
            rho=rho,
            k=k,
            alpha=alpha,
        )
        differences = []
        for x, y in data:
            theirs.step(theirs_model, x, y)
            theirs.zero_grad()
            ours_step(ours, ours_model, (x, y), loss_fn)
            differences.append(largest_difference(theirs_model, ours_model))
        worst.append(report(f"authors' LookSAM, rho={rho}, k={k}, alpha={alpha}", differences))
    try:
        import pytorch_optimizer
    except ImportError:
        print("  (pytorch_optimizer not installed: its per-tensor LookSAM is not compared)")
        return worst
    data = fixed_batches()
    peer_model, ours_model = small_mlp(), small_mlp()
    peer = pytorch_optimizer.LookSAM(
        peer_model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        k=2,
        alpha=0.7,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
    )
    ours = flatminima.LookSAM(
        torch.optim.SGD(
            ours_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        ),
        rho=0.1,
        k=2,
        alpha=0.7,
    )
    differences = []
    for x, y in data:

        def peer_closure(x=x, y=y):
            peer.zero_grad()
            loss = loss_fn(peer_model(x), y)
            loss.backward()
            return loss

        peer_closure()
        peer.step(peer_closure)
        ours_step(ours, ours_model, (x, y), loss_fn)
        differences.append(largest_difference(peer_model, ours_model))
    report(
        f"pytorch_optimizer {importlib.metadata.version('pytorch_optimizer')} LookSAM (per "
        "tensor, not the "
        "authors'), rho=0.1, k=2, alpha=0.7: expected to differ",
        differences,
    )
    return worst


def _unperturbed(optimizer, key: str, scale: Callable[[dict], float]) -> list[torch.Tensor]:
    """The authors' Momentum-SAM keeps w̃ = w − s·v in the model; w = w̃ + s·v, computed on
    copies so that their trajectory is not touched (their move_back/move_up would round)."""
    group = optimizer.param_groups[0]
    return [
        p.detach() + scale(group) * optimizer.state[p][key]
        if key in optimizer.state[p]
        else p.detach().clone()
        for p in group["params"]
    ]


def compare_momentum_sam(authors_dir: str) -> list[float]:
    """MarlonBecker/MSAM ``optimizer/msam.py`` (SGD) and ``optimizer/adamW_msam.py`` against
    flatminima.MomentumSAM on SGD and AdamW, comparing the *unperturbed* iterates: theirs keep
    the model at w̃ between steps, and their weight decay acts at w̃ (SGD) or after the update
    (AdamW), ours at w before it."""
    msam = import_from(authors_dir, "optimizer.msam")
    adamw_msam = import_from(authors_dir, "optimizer.adamW_msam")
    loss_fn = nn.functional.cross_entropy
    rho = 0.5
    worst = []
    # (weight decay, ours takes it in the loss instead of in SGD): in the loss, the closure
    # evaluates it at w̃ as their SGD does, which isolates the placement's effect.
    for weight_decay, decay_in_loss in ((0.0, False), (WEIGHT_DECAY, False), (WEIGHT_DECAY, True)):
        data = fixed_batches()
        theirs_model, ours_model = small_mlp(), small_mlp()
        theirs = msam.MSAM(
            theirs_model.parameters(),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=weight_decay,
            rho=rho,
        )
        ours = flatminima.MomentumSAM(
            torch.optim.SGD(
                ours_model.parameters(),
                lr=LR,
                momentum=MOMENTUM,
                weight_decay=0.0 if decay_in_loss else weight_decay,
            ),
            rho=rho,
        )

        def ours_loss(
            prediction, target, decay=weight_decay if decay_in_loss else 0.0, model=ours_model
        ):
            penalty = sum(p.square().sum() for p in model.parameters())
            return loss_fn(prediction, target) + 0.5 * decay * penalty

        differences = []
        for x, y in data:
            loss_fn(theirs_model(x), y).backward()  # at w̃, where their model sits
            theirs.step()
            theirs.zero_grad()
            ours_step(ours, ours_model, (x, y), ours_loss)
            w = _unperturbed(
                theirs, "momentum_buffer", lambda g: g["rho"] * g["inverse_norm_buffer"]
            )
            differences.append(largest_difference(w, ours_model))
        title = f"authors' MSAM (SGD), rho={rho}, weight_decay={weight_decay}"
        if decay_in_loss:
            title += ", ours with the decay in the loss, so at w̃ like theirs"
        elif weight_decay:
            title += " (their decay acts at w̃, ours at w: the difference is that placement)"
        worst.append(report(title, differences))
    for weight_decay in (0.0, 1e-2):
        data = fixed_batches()
        theirs_model, ours_model = small_mlp(), small_mlp()
        theirs = adamw_msam.AdamW_MSAM(
            theirs_model.parameters(), lr=1e-2, weight_decay=weight_decay, rho=rho
        )
        ours = flatminima.MomentumSAM(
            torch.optim.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=weight_decay),
            rho=rho,
        )
        differences = []
        for x, y in data:
            loss_fn(theirs_model(x), y).backward()
            theirs.step()
            theirs.zero_grad()
            ours_step(ours, ours_model, (x, y), loss_fn)
            w = _unperturbed(theirs, "exp_avg", lambda g: g["norm_factor"][0])
            differences.append(largest_difference(w, ours_model))
        title = f"authors' AdamW_MSAM, lr=1e-2, rho={rho}, weight_decay={weight_decay}"
        if weight_decay:
            title += " (their decay follows the Adam update, torch's AdamW's precedes it)"
        worst.append(report(title, differences))
    return worst


class _ConstantValue:
    """A ρ_min scheduler for their BSAM that always gives the same value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def step(self) -> float:
        return self.value


def compare_bilateral_sam(authors_dir: str) -> list[float]:
    """ajiaaa/BSAM ``bsam.py`` driven as its ``train_bsam.py`` does, against
    flatminima.BilateralSAM. Their restore ``p.data = old_p`` aliases the saved weights, so
    their descent starts from w − ρ_min·ĝ; the cases run it as released (ρ_min > 0: the bug
    bites), with ρ_min = 0 (it cannot), and with the alias broken by this driver (the saved
    weights handed back as a fresh copy before their descent)."""
    bsam = import_from(authors_dir, "bsam")
    scheduler = import_from(authors_dir, "utility.scheduler")
    loss_fn = nn.functional.cross_entropy
    cases = [
        ("as released (the alias bug bites)", 0.05, False, False),
        ("rho_min = 0 (the bug cannot bite)", 0.0, False, False),
        ("alias broken by the driver", 0.05, True, False),
        ("alias broken, cosine learning rate (rho_min follows it)", 0.05, True, True),
    ]
    worst = []
    for title, rho_min, break_alias, cosine in cases:
        rho = 0.1
        data = fixed_batches()
        theirs_model, ours_model = small_mlp(), small_mlp()
        theirs_base = torch.optim.SGD(
            theirs_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        ours_base = torch.optim.SGD(
            ours_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        if cosine:
            theirs_lr = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_base, T_max=STEPS)
            ours_lr = torch.optim.lr_scheduler.CosineAnnealingLR(ours_base, T_max=STEPS)
            # Their ProportionScheduler with lr_min = 0, reading the torch scheduler's lr.
            rho_scheduler = scheduler.ProportionScheduler(
                theirs_lr, max_lr=LR, min_lr=0.0, max_value=rho_min, min_value=0.0
            )
        else:
            theirs_lr = ours_lr = None
            rho_scheduler = _ConstantValue(rho_min)
        theirs = bsam.BSAM(
            theirs_model.parameters(),
            theirs_base,
            rho_max_sharp=rho,
            rho_min_sharp=rho_min,
            rho_scheduler=rho_scheduler,
            lr=LR,
        )
        ours = flatminima.BilateralSAM(ours_base, rho=rho, rho_min=rho_min)
        differences = []
        for x, y in data:
            saved = [p.detach().clone() for p in theirs_model.parameters()]
            loss_fn(theirs_model(x), y).backward()
            theirs.to_max_point(zero_grad=True)
            loss_fn(theirs_model(x), y).backward()
            theirs.to_min_point(zero_grad=True)
            loss_fn(theirs_model(x), y).backward()
            if break_alias:
                for p, w in zip(theirs_model.parameters(), saved, strict=True):
                    theirs.state[p]["old_p"] = w
            theirs.opt_max_min_step(epoch=0, zero_grad=True)
            ours_step(ours, ours_model, (x, y), loss_fn)
            if theirs_lr is not None:
                theirs_lr.step()
                ours_lr.step()
            theirs.update_rho_t()
            differences.append(largest_difference(theirs_model, ours_model))
        worst.append(report(f"authors' BSAM, rho={rho}, rho_min={rho_min}: {title}", differences))
    return worst


METHODS: dict[str, Callable[[str], list[float]]] = {
    "looksam": compare_looksam,
    "momentum-sam": compare_momentum_sam,
    "bilateral-sam": compare_bilateral_sam,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument(
        "--authors-dir", required=True, help="folder holding the authors' code, imported from"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    print(f"{args.method}: flatminima against the authors' code in {args.authors_dir}")
    METHODS[args.method](args.authors_dir)


if __name__ == "__main__":
    main()
