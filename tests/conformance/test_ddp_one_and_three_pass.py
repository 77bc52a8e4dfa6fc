"""LookSAM, Momentum-SAM and Bilateral SAM under real DistributedDataParallel (two gloo
processes on this CPU): which passes DDP synchronises, and that every process ends with the
same weights.

* Bilateral SAM and LookSAM: the update combines gradients of several passes, so no pass
  synchronises; the engine all-reduces the combined update once (DDP's hook never fires).
* Momentum-SAM: the one pass's gradient is the update; from its second step (the first with a
  momentum buffer) that pass is a perturbed pass that synchronises during backward.
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
LR = 0.1
BUILDERS = {
    "looksam": lambda base, **kw: flatminima.LookSAM(base, rho=0.1, k=2, alpha=0.7, **kw),
    "momentum-sam": lambda base, **kw: flatminima.MomentumSAM(base, rho=0.5, **kw),
    "bilateral-sam": lambda base, **kw: flatminima.BilateralSAM(base, rho=0.1, rho_min=0.05, **kw),
}
STEPS = 3


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = {}
        for method, build in BUILDERS.items():
            model = tiny_mlp()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            calls: list[int] = []

            def counting_allreduce(state, bucket, calls=calls):
                calls.append(1)
                tensor = bucket.buffer().div_(WORLD_SIZE)
                future = dist.all_reduce(tensor, async_op=True).get_future()
                return future.then(lambda f: f.value()[0])

            ddp.register_comm_hook(None, counting_allreduce)
            optimizer = build(torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9), model=ddp)
            local_model = tiny_mlp()
            local = build(torch.optim.SGD(local_model.parameters(), lr=LR, momentum=0.9))
            hooks_per_step = []
            for step in range(STEPS):
                x, y = batches(WORLD_SIZE, seed=3 + step)[rank]

                def closure(x=x, y=y, net=ddp):
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                    loss.backward()
                    return loss

                def local_closure(x=x, y=y, net=local_model):
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                    loss.backward()
                    return loss

                if step == 0:
                    local.step(local_closure)  # this process's own first step, for the mean
                before = len(calls)
                optimizer.step(closure)
                hooks_per_step.append(len(calls) - before)
                if step == 0:
                    first = [p.detach().clone() for p in model.parameters()]
                    local_first = [p.detach().clone() for p in local_model.parameters()]
            results[method] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "first": first,
                "local_first": local_first,
                "hooks": hooks_per_step,
            }
            dist.barrier()
            optimizer = ddp = None
            gc.collect()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_multi_pass_and_one_pass_methods_under_ddp(tmp_path):
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    expected_hooks = {
        "looksam": [0] * STEPS,
        "bilateral-sam": [0] * STEPS,
        "momentum-sam": [0] + [1] * (STEPS - 1),  # one bucket for this small model
    }
    for method, hooks in expected_hooks.items():
        results = [r[method] for r in ranks]
        assert [r["hooks"] for r in results] == [hooks] * WORLD_SIZE, method
        for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
            assert torch.equal(a, b), method
        # The first step's SGD update from the same weights is linear in the gradient: the
        # averaged update's step is the mean of the per-process steps.
        for got, *locals_ in zip(
            results[0]["first"], *(r["local_first"] for r in results), strict=True
        ):
            assert torch.allclose(got, sum(locals_) / WORLD_SIZE, rtol=1e-12, atol=1e-14), method
