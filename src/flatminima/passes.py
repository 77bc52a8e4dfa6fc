"""What surrounds one forward/backward pass: BatchNorm statistics and DDP synchronisation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel


def modules_with_running_statistics(model: nn.Module) -> list[nn.Module]:
    """BatchNorm-like modules (BatchNorm*, SyncBatchNorm, InstanceNorm with stats) that track
    running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@contextmanager
def frozen_running_statistics(model: nn.Module) -> Iterator[None]:
    """Leaves running mean, variance *and* ``num_batches_tracked`` as they were before.

    The pass inside still normalises with its own batch statistics (train mode), as in the
    authors' codes; only the buffers are put back, by copy. Setting BatchNorm's momentum to 0,
    as the popular ports do, still increments ``num_batches_tracked`` and is wrong for layers
    with ``momentum=None`` (PITFALLS P14). BatchNorm buffers are tiny, so the copy is free.
    """
    saved = []
    for module in modules_with_running_statistics(model):
        for buffer in module.buffers(recurse=False):
            saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextmanager
def pass_context(
    model: nn.Module | None, *, freeze_statistics: bool, synchronise: bool
) -> Iterator[None]:
    """The context one pass runs in.

    ``synchronise=False`` enters ``model.no_sync()`` when ``model`` is DistributedDataParallel:
    the engine holds this context across the whole pass, so the forward *and* the backward run
    inside it, as DDP requires (PITFALLS P18).

    An FSDP2 module (``fully_shard``) gets nothing here: every pass reduce-scatters its
    gradient, so the ascent gradient, and ε, are global. Its ``set_requires_gradient_sync(False)``
    is no ``no_sync``: it keeps the unsharded gradient aside and leaves ``p.grad`` empty.
    """
    with ExitStack() as stack:
        if model is not None and freeze_statistics:
            stack.enter_context(frozen_running_statistics(model))
        if isinstance(model, DistributedDataParallel) and not synchronise:
            stack.enter_context(model.no_sync())
        yield


def all_reduce_mean_(model: nn.Module | None, params: list[torch.Tensor]) -> None:
    """Averages the parameters' gradients over DDP's processes, one all-reduce per dtype
    (divided by the world size, PITFALLS P4b). Does nothing unless ``model`` is
    DistributedDataParallel. A parameter without a gradient contributes zeros, so that every
    process sends a buffer of the same size whatever branches it used."""
    if not isinstance(model, DistributedDataParallel) or not params:
        return
    import torch.distributed as dist

    from flatminima.kernels import group_by_device_and_dtype

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    group = model.process_group
    world_size = dist.get_world_size(group)
    for indices in group_by_device_and_dtype(grads).values():
        members = [grads[i] for i in indices]
        flat = torch.cat([g.reshape(-1) for g in members])  # one collective per dtype
        dist.all_reduce(flat, group=group)
        flat.div_(world_size)
        offset = 0
        for g in members:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
