"""DistributedDataParallel for real: two processes on the gloo backend on this CPU.

Checks that the ascent pass runs under ``no_sync`` (forward and backward, PITFALLS P18): each
process perturbs with its own gradient (SAM's m-sharpness), the step all-reduces once, the
gradients are averaged (not summed, P4b), and every process ends with the same weights.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flatminima
from support import batches, tiny_mlp

WORLD_SIZE = 2
RHO, LR = 0.1, 0.1


def _worker(rank: int, init_file: str, out_dir: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = tiny_mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = {"count": 0}

        def counting_allreduce(state, bucket):
            calls["count"] += 1
            tensor = bucket.buffer().div_(WORLD_SIZE)
            return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        base = torch.optim.SGD(ddp.parameters(), lr=LR)
        if method == "sam":
            optimizer = flatminima.SAM(base, rho=RHO, model=ddp)
        else:
            optimizer = flatminima.TiltedSAM(
                base,
                rho=RHO,
                num_samples=2,
                radius=0.05,
                model=ddp,
                generator=torch.Generator().manual_seed(rank),
            )
        x, y = batches(WORLD_SIZE, seed=3)[rank]

        def closure():
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        # The same step without DDP, on this process's batch alone: what this process would
        # contribute; the DDP result must be the mean of these over processes (P4b).
        local_model = tiny_mlp()
        local_base = torch.optim.SGD(local_model.parameters(), lr=LR)
        if method == "sam":
            local = flatminima.SAM(local_base, rho=RHO)
        else:
            local = flatminima.TiltedSAM(
                local_base,
                rho=RHO,
                num_samples=2,
                radius=0.05,
                generator=torch.Generator().manual_seed(rank),
            )

        def local_closure():
            loss = torch.nn.functional.cross_entropy(local_model(x), y)
            loss.backward()
            return loss

        local.step(local_closure)
        optimizer.step(closure)
        torch.save(
            {
                "params": [p.detach().clone() for p in model.parameters()],
                "local_params": [p.detach().clone() for p in local_model.parameters()],
                "hook_calls": calls["count"],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Tear down in order, while the process group still exists: both processes finish
        # before either closes its connections (not in `finally`: after a failure in one
        # process the other would wait here forever), and DDP's reducer, whose C++ threads
        # otherwise outlive the group and abort the process at exit ("terminate called
        # without an active exception", SIGABRT in about one run in six), goes first.
        dist.barrier()
        optimizer = ddp = None  # the closure's reference too
        gc.collect()
    finally:
        dist.destroy_process_group()


def _run(tmp_path, method: str) -> list[dict]:
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path), method),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _expected_sam_weights() -> list[torch.Tensor]:
    """Each process's own ε, the perturbed gradients averaged, one SGD step."""
    model = tiny_mlp()
    weights = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    perturbed_grads = []
    for x, y in batches(WORLD_SIZE, seed=3):

        def grads_at(ws, x=x, y=y):
            leaves = [w.clone().requires_grad_(True) for w in ws]
            out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
            return torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), leaves)

        g = grads_at(weights)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        perturbed_grads.append(
            grads_at([w + RHO * gi / (norm + 1e-12) for w, gi in zip(weights, g, strict=True)])
        )
    mean = [sum(gs) / WORLD_SIZE for gs in zip(*perturbed_grads, strict=True)]
    return [w - LR * g for w, g in zip(weights, mean, strict=True)]


def test_sam_under_ddp_perturbs_per_process_and_all_reduces_once(tmp_path):
    results = _run(tmp_path, "sam")
    # One backward synchronised (the perturbed pass), one bucket for this small model.
    assert [r["hook_calls"] for r in results] == [1, 1]
    expected = _expected_sam_weights()
    for result in results:
        for got, want in zip(result["params"], expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_tilted_sam_under_ddp_all_reduces_the_combined_gradient_once(tmp_path):
    results = _run(tmp_path, "tilted")
    # Every pass ran under no_sync: DDP's hook never fired; the engine all-reduced itself.
    assert [r["hook_calls"] for r in results] == [0, 0]
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)
    # One SGD step from the same weights is linear in the gradient: the averaged gradient's
    # step is the mean of the per-process steps (a sum would double it).
    for got, *locals_ in zip(
        results[0]["params"], *(r["local_params"] for r in results), strict=True
    ):
        assert torch.allclose(got, sum(locals_) / WORLD_SIZE, rtol=1e-12, atol=1e-14)
