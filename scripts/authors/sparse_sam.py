"""Runs a flatminima optimizer beside its authors' code and prints how far apart they drift.

Both run in float64 for 8 steps on a small MLP (SGD lr 0.1, momentum 0.9, weight decay 5e-4,
the same batches); the script prints the largest weight difference after each step. The
authors' code is imported at run time from ``--authors-dir`` (a copy of their repository,
never part of this one)::

    python scripts/compare_with_authors.py --method sparse-sam \\
        --authors-dir /tmp/authors/Sparse-Sharpness-Aware-Minimization

Each method has its own function below and an entry in :data:`METHODS`. Where the
authors' code has a known bug, the method's function runs it with the bug neutralised and as
released, and prints both numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

import flatminima

STEPS = 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def small_mlp(seed: int = 0) -> nn.Module:
    """7 → 8 → 4 with tanh: N = 100 weights, so (1 − s)·N is an integer for s = 0.2 and 0.5."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def fixed_batches(
    count: int, size: int = 16, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 7, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def print_row(label: str, deviations: list[float]) -> None:
    print(f"{label:<58} " + " ".join(f"{d:8.1e}" for d in deviations))


# -- Sparse SAM (Mi-Peng/Sparse-Sharpness-Aware-Minimization, solver/sam.py) ------------------


class _Logger:
    """What their ``step`` logs to."""

    def log(self, message: str) -> None:
        pass


class _Examples(torch.utils.data.Dataset):
    """The batches as a dataset of single examples, in order (their ``train_data``)."""

    def __init__(self, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.items = [(x[i], y[i]) for x, y in data for i in range(len(y))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]


@contextlib.contextmanager
def _their_fisher_pass_on_cpu(captured: list[torch.Tensor]) -> Iterator[None]:
    """Their ``update_mask`` moves examples with ``.cuda()`` and draws them with a shuffled
    4-worker DataLoader: on CPU, ``.cuda()`` is the identity and the loader reads the examples
    in order, one process, so that both sides see the same examples. ``torch.topk``'s first
    argument (their concatenated Fisher score) is recorded."""
    real_cuda, real_loader, real_topk = torch.Tensor.cuda, torch.utils.data.DataLoader, torch.topk

    def in_order(dataset, **kwargs):
        return real_loader(dataset, batch_size=kwargs.get("batch_size", 1), shuffle=False)

    def recording_topk(values, k, *args, **kwargs):
        captured.append(values.detach().clone())
        return real_topk(values, k, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.utils.data.DataLoader = in_order  # type: ignore[misc, assignment]
    torch.topk = recording_topk  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(None):  # their progress prints
            yield
    finally:
        torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]
        torch.utils.data.DataLoader = real_loader  # type: ignore[misc]
        torch.topk = real_topk


def _their_step(optimizer, model, x, y, *, epoch: int, train_data=()) -> None:
    """Their ``train_one_epoch``: forward/backward outside, then ``step(closure, ...)``."""
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step(
        closure_for(model, x, y),
        model=model,
        epoch=epoch,
        batch_idx=0,
        train_data=train_data,
        logger=_Logger(),
    )


def _ours(model: nn.Module, **hyperparameters) -> flatminima.SparseSAM:
    return flatminima.SparseSAM(sgd(model), foreach=True, **hyperparameters)


def _set_our_mask(ours, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Gives our optimizer ``mask`` (bools shaped like ``param``) as its state holds it:
    bit-packed, with its shape."""
    ours.state[param][flatminima.methods.sparse_sam.MASK] = flatminima.kernels.pack_mask(mask)
    ours.state[param][flatminima.methods.sparse_sam.MASK_SHAPE] = tuple(mask.shape)


def compare_sparse_sam_fixed_mask(sam_module, sparsity: float = 0.5) -> None:
    """Both optimizers with the same random mask, no refresh: deviation per step."""
    data = fixed_batches(STEPS)
    for name in ("SSAMF", "SSAMD"):
        theirs_model, ours_model = small_mlp(), small_mlp()
        torch.manual_seed(3)
        if name == "SSAMF":
            theirs = sam_module.SSAMF(
                list(theirs_model.parameters()),
                sgd(theirs_model),
                rho=0.1,
                sparsity=sparsity,
                num_samples=16,
                update_freq=1000,
            )
        else:
            theirs = sam_module.SSAMD(
                list(theirs_model.parameters()),
                sgd(theirs_model),
                rho=0.1,
                sparsity=sparsity,
                drop_rate=0.5,
                drop_strategy="weight",
                growth_strategy="weight",
                update_freq=1000,
                T_start=0,
                T_end=STEPS,
            )
        ours = _ours(ours_model, rho=0.1, sparsity=sparsity, mask="dynamic", total_epochs=STEPS)
        generator = torch.Generator().manual_seed(5)
        for p, q in zip(theirs_model.parameters(), ours_model.parameters(), strict=True):
            mask = torch.rand(p.shape, generator=generator, dtype=torch.float64) < 1 - sparsity
            theirs.state[p]["mask"] = mask.to(p.dtype)
            _set_our_mask(ours, q, mask)
        deviations = []
        for x, y in data:
            _their_step(theirs, theirs_model, x, y, epoch=1)  # 1 % 1000 != 0: no update
            ours.step(closure_for(ours_model, x, y))
            deviations.append(largest_difference(theirs_model, ours_model))
        print_row(f"{name}, the same fixed mask (s = {sparsity})", deviations)


def compare_sparse_sam_fisher(sam_module) -> None:
    """SSAM-F as their trainer runs it: step 1 with the all-zeros mask, then the Fisher mask
    learnt from 16 single examples, then 7 steps with it; their refresh with the leftover
    gradient neutralised (p.grad zeroed first) and as released."""
    data = fixed_batches(STEPS)
    fisher_data = fixed_batches(1, seed=7)
    train_data = _Examples(fisher_data)
    for bug in (False, True):
        theirs_model, ours_model = small_mlp(), small_mlp()
        theirs = sam_module.SSAMF(
            list(theirs_model.parameters()),
            sgd(theirs_model),
            rho=0.1,
            sparsity=0.5,
            num_samples=16,
            update_freq=1000,  # epoch 0 refreshes after its step, epoch 1 never
        )
        ours = _ours(ours_model, rho=0.1, sparsity=0.5, num_samples=16)
        deviations, captured = [], []
        for step, (x, y) in enumerate(data):
            with _their_fisher_pass_on_cpu(captured):
                if step == 0 and bug:  # their step refreshes after itself, p.grad left over
                    _their_step(theirs, theirs_model, x, y, epoch=0, train_data=train_data)
                else:
                    _their_step(theirs, theirs_model, x, y, epoch=1)
                    if step == 0:
                        theirs.zero_grad()
                        theirs.update_mask(theirs_model, train_data)
            ours.step(closure_for(ours_model, x, y))
            if step == 0:
                params = list(ours_model.parameters())
                ours_score = torch.cat(
                    [
                        s.reshape(-1)
                        for s in ours._fisher_scores(
                            ours_model, F.cross_entropy, fisher_data, params
                        )
                    ]
                )
                ours.refresh_mask(ours_model, F.cross_entropy, fisher_data)
            deviations.append(largest_difference(theirs_model, ours_model))
        their_mask = torch.cat(
            [theirs.state[p]["mask"].reshape(-1) for p in theirs_model.parameters()]
        )
        our_mask = torch.cat([m.reshape(-1) for m in ours.masks()])
        relative = float(
            ((captured[0] - ours_score).abs() / ours_score.abs().clamp_min(1e-300)).max()
        )
        label = "as released (first sample + leftover p.grad)" if bug else "leftover p.grad zeroed"
        print_row(f"SSAMF, learnt Fisher mask, {label}", deviations)
        print(
            f"  Fisher score: largest relative difference {relative:.1e}; masks differ in "
            f"{int((their_mask.bool() != our_mask).sum())} of {our_mask.numel()} coordinates"
        )


def compare_sparse_sam_batchnorm(sam_module) -> None:
    """Their Fisher refresh runs its single examples in train mode and so moves BatchNorm's
    running statistics; ours runs in train mode too but puts the statistics back."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 4)
    ).double()
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    data = [
        (
            torch.randn(16, 1, 4, 4, generator=generator),
            torch.randint(0, 4, (16,), generator=generator),
        )
    ]
    theirs = sam_module.SSAMF(
        list(model.parameters()),
        sgd(model),
        rho=0.1,
        sparsity=0.5,
        num_samples=16,
        update_freq=1000,
    )
    ours = flatminima.SparseSAM(sgd(twin), rho=0.1, sparsity=0.5, num_samples=16, model=twin)
    before = model[1].running_mean.clone()
    with _their_fisher_pass_on_cpu([]):
        theirs.update_mask(model, _Examples(data))
    ours.refresh_mask(twin, F.cross_entropy, data)
    moved_theirs = float((model[1].running_mean - before).abs().max())
    moved_ours = float((twin[1].running_mean - before).abs().max())
    print(
        f"BatchNorm running mean moved by the Fisher refresh: theirs {moved_theirs:.1e} "
        f"({int(model[1].num_batches_tracked)} batches tracked), ours {moved_ours:.1e} "
        f"({int(twin[1].num_batches_tracked)})"
    )


def compare_sparse_sam_few_samples(sam_module) -> None:
    """Their progress print divides by num_samples // 10: fewer than 10 examples crash."""
    data = fixed_batches(1, seed=7)
    model, twin = small_mlp(), small_mlp()
    theirs = sam_module.SSAMF(
        list(model.parameters()),
        sgd(model),
        rho=0.1,
        sparsity=0.5,
        num_samples=5,
        update_freq=1000,
    )
    try:
        with _their_fisher_pass_on_cpu([]):
            theirs.update_mask(model, _Examples(data))
        outcome = "ran"
    except ZeroDivisionError as error:
        outcome = f"ZeroDivisionError ({error})"
    ours = flatminima.SparseSAM(sgd(twin), rho=0.1, sparsity=0.5, num_samples=5)
    ours.refresh_mask(twin, F.cross_entropy, data)
    print(f"num_samples = 5: theirs {outcome}; ours density {ours.mask_density():.2f}")


def compare_sparse_sam_dynamic_update(sam_module) -> None:
    """One SSAM-D update from the same mask, weights and gradient (weight death score,
    gradient growth score: no randomness), at w as ours does: at s = 0.5 their keep count is
    never capped and the masks should agree; at s = 0.2 (their default) it is, and their
    density falls."""
    x, y = fixed_batches(1)[0]
    for sparsity in (0.5, 0.2):
        theirs_model, ours_model = small_mlp(), small_mlp()
        torch.manual_seed(3)
        theirs = sam_module.SSAMD(
            list(theirs_model.parameters()),
            sgd(theirs_model),
            rho=0.1,
            sparsity=sparsity,
            drop_rate=0.5,
            drop_strategy="weight",
            growth_strategy="gradient",
            update_freq=1,
            T_start=0,
            T_end=STEPS,
        )
        ours = _ours(
            ours_model,
            rho=0.1,
            sparsity=sparsity,
            mask="dynamic",
            total_epochs=STEPS,
            drop_strategy="weight",
            growth_strategy="gradient",
        )
        for p, q in zip(theirs_model.parameters(), ours_model.parameters(), strict=True):
            _set_our_mask(ours, q, theirs.state[p]["mask"].bool())
        theirs.zero_grad()
        F.cross_entropy(theirs_model(x), y).backward()
        theirs.update_mask(0)
        ours.refresh_mask(ours_model, F.cross_entropy, [(x, y)], epoch=0)
        their_mask = torch.cat(
            [theirs.state[p]["mask"].reshape(-1) for p in theirs_model.parameters()]
        )
        our_mask = torch.cat([m.reshape(-1) for m in ours.masks()])
        print(
            f"SSAMD update at epoch 0, s = {sparsity}: density theirs "
            f"{float(their_mask.mean()):.2f}, ours {float(our_mask.double().mean()):.2f}; "
            f"masks differ in {int((their_mask.bool() != our_mask).sum())} of "
            f"{our_mask.numel()} coordinates"
        )


def compare_sparse_sam(authors_dir: str) -> None:
    from solver import sam as sam_module  # the authors' module, from --authors-dir

    print(f"largest weight difference after each of {STEPS} steps (float64)")
    compare_sparse_sam_fixed_mask(sam_module, sparsity=0.5)
    compare_sparse_sam_fixed_mask(sam_module, sparsity=0.2)
    compare_sparse_sam_fisher(sam_module)
    compare_sparse_sam_batchnorm(sam_module)
    compare_sparse_sam_few_samples(sam_module)
    compare_sparse_sam_dynamic_update(sam_module)


METHODS: dict[str, Callable[[str], None]] = {
    "sparse-sam": compare_sparse_sam,
}
"""Method (CLI name) → its comparison, given the directory of the authors' code."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--authors-dir", required=True, help="a copy of the authors' repository")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, args.authors_dir)
    METHODS[args.method](args.authors_dir)


if __name__ == "__main__":
    main()
