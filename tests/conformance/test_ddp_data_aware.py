"""ESAM and micro-batch SAM under DistributedDataParallel: two gloo processes on this CPU.

Each process selects (ESAM) or splits (mSAM) its own batch and perturbs with its own
gradients; nothing is all-reduced during the passes (the last pass runs on part of the batch,
so DDP's hook never fires) and the engine averages the update once. One SGD step without
momentum is linear in the gradient, so the DDP weights must be the mean of what each process
computes alone. ESAM's tensors switched off for the clean pass (``requires_grad=False``) must
not trouble DDP.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flatminima
from support import batches, closure_for, tiny_mlp

WORLD_SIZE = 2
STEPS = 3


def _build(method: str, params, rank: int, model=None):
    base = torch.optim.SGD(params, lr=0.1)
    if method == "esam":
        generator = torch.Generator().manual_seed(rank)
        return flatminima.ESAM(base, rho=0.1, beta=0.5, gamma=0.5, model=model, generator=generator)
    return flatminima.MicroBatchSAM(base, rho=0.1, micro_batches=3, model=model)


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
        optimizer = _build(method, ddp.parameters(), rank, model=ddp)
        data = batches(WORLD_SIZE * STEPS, seed=3)[rank::WORLD_SIZE]
        steps = []
        for batch in data:
            # What this process alone would do from the same weights, on its own batch.
            local_model = tiny_mlp()
            local_model.load_state_dict(model.state_dict())
            local = _build(method, local_model.parameters(), rank)
            if method == "esam":
                local.load_state_dict(optimizer.state_dict())  # the same subset this step
            local.step(closure_for(local_model, batch, per_example=True))
            optimizer.step(closure_for(ddp, batch, per_example=True))
            steps.append(
                {
                    "params": [p.detach().clone() for p in model.parameters()],
                    "local_params": [p.detach().clone() for p in local_model.parameters()],
                }
            )
        torch.save(
            {"steps": steps, "hook_calls": calls["count"]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()
        optimizer = ddp = None
        gc.collect()
    finally:
        dist.destroy_process_group()


# Spawning two processes is slow on a busy machine: ESAM (whose switched-off tensors are the
# risk) runs by default, mSAM in the slow run.
@pytest.mark.parametrize("method", ["esam", pytest.param("msam", marks=pytest.mark.slow)])
def test_data_aware_methods_under_ddp_average_the_per_process_updates(tmp_path, method):
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path), method),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert [r["hook_calls"] for r in results] == [0, 0]  # only the engine's all-reduce
    for step in range(STEPS):
        ours = [r["steps"][step] for r in results]
        for a, b in zip(ours[0]["params"], ours[1]["params"], strict=True):
            assert torch.equal(a, b)
        # From the same weights, the averaged gradient's step is the mean of the local steps.
        for got, *locals_ in zip(
            ours[0]["params"], *(o["local_params"] for o in ours), strict=True
        ):
            assert torch.allclose(got, sum(locals_) / WORLD_SIZE, rtol=1e-12, atol=1e-14)
