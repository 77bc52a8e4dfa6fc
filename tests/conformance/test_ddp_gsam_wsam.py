"""GSAM and WSAM under DistributedDataParallel: two processes on gloo, on this CPU.

Each process perturbs with its own gradient, as the authors' codes do; every gradient that
enters the update is averaged exactly once (GSAM: the decomposed update; WSAM: g and g̃, also
the decoupled sharpness term that bypasses the base optimizer; with clipping, g and g̃ before
they are clipped).
"""

from __future__ import annotations

import datetime
import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flatminima
from support import batches, tiny_mlp

WORLD_SIZE = 2
LR, RHO = 0.1, 0.1
CONFIGS = {
    "gsam": (flatminima.GSAM, {"rho": RHO, "alpha": 0.5}),
    "wsam-decoupled": (flatminima.WSAM, {"rho": RHO, "gamma": 0.8}),
    "wsam-coupled": (flatminima.WSAM, {"rho": RHO, "gamma": 0.8, "decouple": False}),
    "wsam-clipped": (flatminima.WSAM, {"rho": RHO, "gamma": 0.8, "max_norm": 0.05}),
    # Process 0's clean gradient overflows (its ε is then 0), process 1's does not: both must
    # still run the same collectives, and the step must not hang.
    "wsam-overflow-on-one-process": (flatminima.WSAM, {"rho": RHO, "gamma": 0.8}),
    "gsam-overflow-on-one-process": (flatminima.GSAM, {"rho": RHO, "alpha": 0.5}),
}
OVERFLOWING = {"wsam-overflow-on-one-process", "gsam-overflow-on-one-process"}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),  # a mismatched collective fails, not hangs
    )
    try:
        # Every configuration in one process group: spawning costs far more than a step.
        for config, (cls, hyperparameters) in CONFIGS.items():
            _one_config(rank, out_dir, config, cls, hyperparameters)
        dist.barrier()  # tear down in order (see test_ddp.py)
        gc.collect()
    finally:
        dist.destroy_process_group()


def _one_config(rank, out_dir, config, cls, hyperparameters) -> None:
    model = tiny_mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = {"count": 0}

    def counting_allreduce(state, bucket):
        calls["count"] += 1
        tensor = bucket.buffer().div_(WORLD_SIZE)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    optimizer = cls(torch.optim.SGD(ddp.parameters(), lr=LR), model=ddp, **hyperparameters)
    x, y = batches(WORLD_SIZE, seed=3)[rank]

    overflow = config in OVERFLOWING and rank == 0

    def closure_of(net):
        passes = []

        def closure():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            scaled = loss * float("inf") if overflow and not passes else loss
            passes.append(1)
            scaled.backward()
            return loss

        return closure

    # The same step without DDP on this process's batch alone.
    local_model = tiny_mlp()
    local = cls(torch.optim.SGD(local_model.parameters(), lr=LR), **hyperparameters)
    closure, local_closure = closure_of(ddp), closure_of(local_model)

    local.step(local_closure)
    optimizer.step(closure)
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "local_params": [p.detach().clone() for p in local_model.parameters()],
            "hook_calls": calls["count"],
        },
        os.path.join(out_dir, f"{config}-rank{rank}.pt"),
    )
    dist.barrier()
    optimizer = ddp = None  # the closure's reference too, while the group still exists
    gc.collect()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    directory = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        _worker,
        args=(str(directory / "init"), str(directory)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    return {
        config: [torch.load(directory / f"{config}-rank{r}.pt") for r in range(WORLD_SIZE)]
        for config in CONFIGS
    }


def _assert_mean_of_local_steps(results):
    """One plain SGD step from the same weights is linear in the gradient: the step with the
    averaged update is the mean of the per-process steps (a sum would double it)."""
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)
    for got, *locals_ in zip(
        results[0]["params"], *(r["local_params"] for r in results), strict=True
    ):
        assert torch.allclose(got, sum(locals_) / WORLD_SIZE, rtol=1e-12, atol=1e-14)


def test_gsam_decomposes_per_process_and_averages_the_update_once(results):
    assert [r["hook_calls"] for r in results["gsam"]] == [0, 0]  # no pass synchronised itself
    _assert_mean_of_local_steps(results["gsam"])


@pytest.mark.parametrize("config", ["wsam-decoupled", "wsam-coupled"])
def test_wsam_without_clipping_averages_the_update_and_the_sharpness(results, config):
    assert [r["hook_calls"] for r in results[config]] == [0, 0]
    _assert_mean_of_local_steps(results[config])


def _grads_at(model, weights, batch):
    names = [n for n, _ in model.named_parameters()]
    leaves = [w.clone().requires_grad_(True) for w in weights]
    out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (batch[0],))
    return list(torch.autograd.grad(torch.nn.functional.cross_entropy(out, batch[1]), leaves))


def _clip(vectors, max_norm):
    norm = float(torch.sqrt(sum((v * v).sum() for v in vectors)))
    return [v * min(1.0, max_norm / (norm + 1e-6)) for v in vectors]


def test_wsam_with_clipping_averages_g_and_g_tilde_before_clipping_them(results):
    clipped = results["wsam-clipped"]
    # The perturbed pass synchronised during its backward (one bucket); g was averaged by hand.
    assert [r["hook_calls"] for r in clipped] == [1, 1]
    model = tiny_mlp()
    weights = [p.detach().clone() for p in model.parameters()]
    clean, perturbed = [], []
    for batch in batches(WORLD_SIZE, seed=3):
        g = _grads_at(model, weights, batch)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        eps = [RHO * gi / (norm + 1e-12) for gi in g]  # each process's own ε
        clean.append(g)
        perturbed.append(
            _grads_at(model, [w + e for w, e in zip(weights, eps, strict=True)], batch)
        )
    mean_g = [sum(gs) / WORLD_SIZE for gs in zip(*clean, strict=True)]
    mean_g_tilde = [sum(gs) / WORLD_SIZE for gs in zip(*perturbed, strict=True)]
    g, g_tilde = _clip(mean_g, 0.05), _clip(mean_g_tilde, 0.05)
    alpha = 0.8 / 0.2
    expected = [
        w - LR * gi - LR * alpha * (gti - gi)
        for w, gi, gti in zip(weights, g, g_tilde, strict=True)
    ]
    for result in clipped:
        for got, want in zip(result["params"], expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", sorted(OVERFLOWING))
def test_an_overflow_on_one_process_neither_hangs_nor_spreads_nan(results, config):
    """Process 0's ε is 0 (its clean gradient is not finite), so its perturbed pass is a clean
    pass and its gradient stands in; the average with process 1's normal update is finite."""
    assert [r["hook_calls"] for r in results[config]] == [0, 0]
    assert all(torch.isfinite(p).all() for r in results[config] for p in r["params"])
    _assert_mean_of_local_steps(results[config])
