"""The kernels on sharded parameters: FSDP2's DTensors (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter, gradient and optimizer-state tensor is a DTensor: each process
holds one shard (``to_local()``) of a tensor whose global shape is the model's. The kernels in
``kernels.py`` reach DTensors through the three decorators below, so that every method works
on a sharded model unchanged:

* :func:`on_local_shards`, for kernels that act entry by entry (scale, add, copy, √...): they
  run on the local shards, which are ordinary tensors, so the ``torch._foreach_*`` path is kept
  (DTensor has no sharding rule for ``_foreach_copy_``) and the result is bit for bit what the
  unsharded model gets in those entries. A source laid out differently from its target is
  redistributed to the target's layout first.
* :func:`summed_over_shards`, for kernels that return a sum over every entry (a squared norm,
  a dot product): the kernel sums its local shards and the partial sums are all-reduced over
  the mesh dimensions the tensors are sharded along: one scalar collective per call. This is
  what makes ε global, the same as the unsharded model's to float rounding (PITFALLS P4: a
  norm per shard gives every process a different ε). DTensor's own ``vector_norm`` would not
  do: ``float()`` of its pending (partial) result is the *local* value, silently.
* :func:`on_shards_use`, for kernels that cannot be split entry by entry (the overflow-safe
  norm, random draws): a replacement written for shards runs instead.

For methods that rank coordinates over the whole model (Sparse SAM's top-k mask),
:class:`CoordinateLayout` places each local shard among the whole model's coordinates and
sums or gathers a few integers over the shards; :func:`same_on_every_process` refuses data
that should be the same on every process and is not.

Plain tensors take the kernels' own path: each decorator costs one ``isinstance`` check there.
A list that mixes DTensors and plain tensors (a model with parameters outside ``fully_shard``)
is refused: the plain tensors' gradients are not synchronised, so no ε over them is global.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # a build without torch.distributed has no DTensors: the decorators change nothing
    DTensor = None  # type: ignore[assignment,misc]

Kernel = TypeVar("Kernel", bound=Callable[..., Any])


def is_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` are DTensors (judged by the first: lists are never mixed)."""
    return DTensor is not None and len(tensors) > 0 and isinstance(tensors[0], DTensor)


FSDP1_MARK = "_fsdp_flattened"
"""The attribute FullyShardedDataParallel (FSDP1) sets on every parameter it flattens, with
``use_orig_params`` or without (``torch.distributed.fsdp._common_utils``); FSDP2 sets none."""


def check_parameters(params: Iterable[Any], owner: str) -> None:
    """Refuses parameters whose ε could only be per shard, silently (PITFALLS P4): FSDP1's
    flattened shards, which are plain tensors, and DTensors mixed with plain tensors (a model
    with parameters outside ``fully_shard``). Runs when the param groups change."""
    kinds = set()
    for p in params:
        if not isinstance(p, Tensor):
            continue
        if getattr(p, FSDP1_MARK, False):
            raise ValueError(
                f"{owner} does not support FullyShardedDataParallel (FSDP1): its flattened "
                "shards are plain tensors, so every norm would be one shard's; shard the model "
                "with torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        kinds.add(DTensor is not None and isinstance(p, DTensor))
    if len(kinds) > 1:
        raise TypeError(_MIXED.format(owner=owner, where="its param groups"))


def refuse_sharded(params: Iterable[Any], owner: str, reason: str) -> None:
    """Refuses DTensor parameters for a method whose step cannot be split by shard yet (every
    method can today; kept for a method added later, which the FSDP suite then checks)."""
    if DTensor is not None and any(isinstance(p, DTensor) for p in params):
        raise TypeError(f"{owner} does not support FSDP2-sharded parameters yet: {reason}")


# -- decorators for kernels.py ---------------------------------------------------------------


def on_local_shards(kernel: Kernel) -> Kernel:
    """Runs an entry-by-entry kernel on the local shards of DTensor arguments.

    Every positional argument that is a list of tensors is replaced by the local shards of its
    tensors, laid out like the first list's (the kernel's targets).
    """
    if DTensor is None:
        return kernel

    @functools.wraps(kernel)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        first = args[0]
        if not (first and isinstance(first[0], DTensor)):  # plain tensors: one check
            return kernel(*args, **kwargs)
        local, moved = _local_arguments(args)
        result = kernel(*local, **kwargs)
        _write_back(moved)
        return result

    return dispatch  # type: ignore[return-value]


def summed_over_shards(kernel: Kernel) -> Kernel:
    """Makes a kernel that returns a sum over every entry of its tensors (a 0-d tensor or a
    Python float) global over the shards: local sums, then one all-reduce per mesh dimension
    that shards them."""
    if DTensor is None:
        return kernel

    @functools.wraps(kernel)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        first = args[0]
        if not (first and isinstance(first[0], DTensor)):  # plain tensors: one check
            return kernel(*args, **kwargs)
        local, moved = _local_arguments(args)
        total = None
        for (mesh, dims), indices in _by_reduction(first).items():
            members = [[a[i] for i in indices] if _is_tensor_list(a) else a for a in local]
            partial = kernel(*members, **kwargs)
            if isinstance(partial, Tensor):
                _all_reduce_(partial, mesh, dims, dist.ReduceOp.SUM)
            else:  # a float: reduced as a float64 tensor where the shards live
                reduced = torch.tensor(partial, dtype=torch.float64, device=local[0][0].device)
                _all_reduce_(reduced, mesh, dims, dist.ReduceOp.SUM)
                partial = float(reduced)
            total = partial if total is None else total + partial
        _write_back(moved)
        return total

    return dispatch  # type: ignore[return-value]


def on_shards_use(replacement: Callable[..., Any]) -> Callable[[Kernel], Kernel]:
    """Runs ``replacement`` (same arguments) instead of the kernel when its first argument holds
    DTensors: for kernels whose shard-wise version is a different computation."""

    def decorate(kernel: Kernel) -> Kernel:
        if DTensor is None:
            return kernel

        @functools.wraps(kernel)
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            first = args[0]
            if not (first and isinstance(first[0], DTensor)):
                return kernel(*args, **kwargs)
            _check_layouts(args[0])
            return replacement(*args, **kwargs)

        return dispatch  # type: ignore[return-value]

    return decorate


# -- replacements --------------------------------------------------------------------------------


def rescaled_global_norm(tensors: Sequence[Tensor]) -> float:
    """‖t‖ over all the tensors as peak·‖t/peak‖ in float64, peak the largest |entry| over every
    shard: the overflow-safe norm (see ``kernels.global_norm``) with two scalar all-reduces.

    One peak for all the tensors, where the unsharded path scales each tensor by its own:
    (t/peak)² ≤ 1, so nothing overflows, and entries that underflow are below 1e-154·peak,
    far under float64's resolution of the sum. A non-finite entry gives inf (NaN does not
    survive a max-reduction reliably; the caller only asks whether the norm is finite).
    """
    peak = _global_over_shards(tensors, _local_peak, dist.ReduceOp.MAX)
    if not math.isfinite(peak) or peak == 0.0:
        return peak
    scaled = _global_over_shards(
        tensors, lambda t: torch.sum(torch.square(t.double() / peak)), dist.ReduceOp.SUM
    )
    return peak * math.sqrt(scaled)


def normal_drawn_whole_(tensors: Sequence[Tensor], *, generator: torch.Generator | None) -> None:
    """Standard normal samples, each tensor drawn whole from ``generator`` and cut to this
    process's shard: the same numbers as the unsharded model's, on every process (the
    generator must be seeded alike on all of them). Costs one full-size temporary of one
    parameter at a time."""
    for t in tensors:
        local = t.to_local()
        whole = torch.empty(t.shape, dtype=t.dtype, device=local.device)
        whole.normal_(generator=generator)
        # src_data_rank=None: every process cuts its shard from its own copy, no communication.
        local.copy_(
            distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None).to_local()
        )


def mean_over_processes(value: float, tensors: Sequence[Tensor]) -> float:
    """``value`` averaged over every process of the tensors' device mesh when they are
    DTensors (unchanged otherwise): for a pass's loss, which each FSDP process computes on its
    own examples, where a method weighs gradients by it (Tilted SAM) and every shard of the
    update must be weighed alike."""
    if not is_sharded(tensors):
        return value
    first = tensors[0]
    mesh = first.device_mesh
    total = torch.tensor(value, dtype=torch.float64, device=first.to_local().device)
    _all_reduce_(total, mesh, tuple(range(mesh.ndim)), dist.ReduceOp.SUM)
    return float(total) / mesh.size()


# -- the mechanics ----------------------------------------------------------------------------


_MIXED = (
    "{owner} got DTensors (FSDP2-sharded parameters) mixed with plain tensors in {where}; "
    "apply fully_shard to the root module too, so that every parameter is sharded and its "
    "gradient synchronised"
)


def _is_tensor_list(argument: Any) -> bool:
    return (
        isinstance(argument, (list, tuple))
        and len(argument) > 0
        and isinstance(argument[0], Tensor)
    )


def _check_layouts(tensors: Sequence[Tensor]) -> None:
    """Refuses plain tensors among DTensors and DTensors with a pending reduction."""
    for t in tensors:
        if not isinstance(t, DTensor):
            raise TypeError(
                _MIXED.format(owner="flatminima", where=f"a list (shape {tuple(t.shape)})")
            )
        if any(p.is_partial() for p in t.placements):
            raise ValueError(
                f"a DTensor of shape {tuple(t.shape)} has a Partial placement (a pending "
                "reduction); flatminima needs gradients and parameters that are Shard or "
                "Replicate: redistribute it first"
            )


Moved = list[tuple[Tensor, Tensor, Tensor]]
"""(source DTensor, its entries in the target's layout, the target): arguments redistributed
for a kernel, to be written back in case the kernel changed them."""


def _local_arguments(args: Sequence[Any]) -> tuple[list[Any], Moved]:
    """The arguments with every tensor list replaced by its local shards, each laid out like
    the tensor at the same index of the first list, and the tensors that had to be moved into
    that layout (a kernel may update a source in place: Friendly SAM's EMA)."""
    targets = args[0]
    _check_layouts(targets)
    converted: list[Any] = [[t.to_local() for t in targets]]
    moved: Moved = []
    for argument in args[1:]:
        if not _is_tensor_list(argument):
            converted.append(argument)
            continue
        _check_layouts(argument)
        locals_ = []
        for source, target in zip(argument, targets, strict=True):
            if _same_layout(source, target):
                locals_.append(source.to_local())  # a view: in-place changes reach the source
            else:
                local = source.redistribute(target.device_mesh, target.placements).to_local()
                moved.append((source, local, target))
                locals_.append(local)
        converted.append(locals_)
    return converted, moved


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same mesh and placements (the mesh object is shared in practice: identity first)."""
    return (a.device_mesh is b.device_mesh or a.device_mesh == b.device_mesh) and (
        a.placements == b.placements
    )


def _write_back(moved: Moved) -> None:
    """Copies redistributed arguments back into their own layout (rare: FSDP2 lays a
    parameter's gradient and state out like the parameter)."""
    for source, local, target in moved:
        laid_out = DTensor.from_local(
            local, target.device_mesh, target.placements, shape=target.shape, stride=target.stride()
        )
        source.copy_(laid_out)


def _by_reduction(tensors: Sequence[Tensor]) -> dict[tuple[Any, ...], list[int]]:
    """Indices of ``tensors`` grouped by (mesh, the mesh dimensions that shard them)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, t in enumerate(tensors):
        dims = tuple(d for d, placement in enumerate(t.placements) if placement.is_shard())
        groups.setdefault((t.device_mesh, dims), []).append(index)
    return groups


def _all_reduce_(value: Tensor, mesh: Any, dims: tuple[int, ...], op: Any) -> None:
    """All-reduces ``value`` in place over the mesh dimensions ``dims``, one after the other
    (a sum over two dimensions is a sum over their product)."""
    for dim in dims:
        dist.all_reduce(value, op=op, group=mesh.get_group(dim))


def _local_peak(local: Tensor) -> Tensor:
    """max |entry| of a shard in float64 (0 for an empty shard; inf for NaN)."""
    if local.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=local.device)
    peak = torch.linalg.vector_norm(local, math.inf, dtype=torch.float64)
    return torch.nan_to_num(peak, nan=math.inf, posinf=math.inf)


def _global_over_shards(
    tensors: Sequence[Tensor], local_value: Callable[[Tensor], Tensor], op: Any
) -> float:
    """``op`` (SUM or MAX) of ``local_value`` over every tensor's every shard, as a float."""
    result = None
    for (mesh, dims), indices in _by_reduction(tensors).items():
        values = torch.stack([local_value(tensors[i].to_local()) for i in indices])
        combined = values.sum() if op == dist.ReduceOp.SUM else values.max()
        _all_reduce_(combined, mesh, dims, op)
        value = float(combined)
        if result is None:
            result = value
        else:
            result = result + value if op == dist.ReduceOp.SUM else max(result, value)
    return 0.0 if result is None else result


# -- whole-model coordinates on shards (Sparse SAM's global top-k) --------------------------------


class CoordinateLayout:
    """Where this process's coordinates sit among the whole model's.

    The whole model's coordinates are numbered as in the concatenation of its flattened
    tensors, in list order; :attr:`starts` gives the number of each local tensor's first
    coordinate (a shard ``Shard(0)`` along one mesh dimension holds a contiguous run of
    rows, so a contiguous run of coordinates). :meth:`total` and :meth:`gathered` run over
    the processes that hold different shards (one scalar or one short vector each); replicas
    along other mesh dimensions hold the same coordinates and are not counted twice. For plain
    tensors both are local and :attr:`starts` the running offsets.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.sharded = is_sharded(tensors)
        self.locals: list[Tensor] = []
        self.starts: list[int] = []
        self.group: Any = None
        offset = 0
        groups = set()
        for t in tensors:
            if self.sharded:
                _check_layouts([t])
                local, start, group = _local_run(t)
                groups.add(group)
            else:
                local, start = t, 0
            self.locals.append(local)
            self.starts.append(offset + start)
            offset += t.numel()
        self.size = offset
        if len(groups) > 1:
            raise ValueError(
                "flatminima needs every parameter sharded over the same processes (one device "
                "mesh, one sharded dimension) to rank coordinates over the whole model"
            )
        self.group = groups.pop() if groups else None

    def total(self, value: int) -> int:
        """``value`` summed over the shards' processes."""
        if self.group is None:
            return value
        reduced = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(reduced, group=self.group)
        return int(reduced)

    def gathered(self, values: Sequence[int]) -> list[list[int]]:
        """``values`` of every shard's process, in the group's rank order."""
        if self.group is None:
            return [list(values)]
        mine = torch.tensor(list(values), dtype=torch.int64, device=self._device())
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, mine, group=self.group)
        return [t.tolist() for t in every]

    def _device(self) -> torch.device:
        return self.locals[0].device if self.locals else torch.device("cpu")


def _local_run(t: Tensor) -> tuple[Tensor, int, Any]:
    """This process's shard of ``t``, the whole-tensor number of its first coordinate, and the
    process group along the sharded mesh dimension (``None`` when every placement is
    Replicate). Only ``Shard(0)`` along at most one mesh dimension is known (FSDP2 and HSDP)."""
    mesh, local = t.device_mesh, t.to_local()
    shard_dims = [d for d, placement in enumerate(t.placements) if placement.is_shard()]
    known = all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements)
    if not known or len(shard_dims) > 1:
        raise ValueError(
            f"a DTensor of shape {tuple(t.shape)} has placements {t.placements}; ranking "
            "coordinates over the whole model supports Shard(0) along one mesh dimension "
            "(FSDP2, HSDP) and Replicate"
        )
    if not shard_dims or t.dim() == 0:
        return local, 0, None
    dim = shard_dims[0]
    rows, ways = t.shape[0], mesh.size(dim)
    per_rank = -(-rows // ways)  # torch.chunk's split: ⌈rows/ways⌉ rows per shard
    first_row = min(mesh.get_coordinate()[dim] * per_rank, rows)
    row_size = t.numel() // rows if rows else 0
    if local.numel() != (min(first_row + per_rank, rows) - first_row) * row_size:
        raise ValueError(
            f"a DTensor of shape {tuple(t.shape)} is not split as torch.chunk splits its rows; "
            "flatminima cannot place its shard among the model's coordinates"
        )
    return local, first_row * row_size, mesh.get_group(dim)


def same_on_every_process(value: float, tensors: Sequence[Tensor], what: str) -> None:
    """Refuses a ``value`` (a digest of data) that differs between the processes of the
    tensors' device mesh (all its dimensions): for passes that must see the same examples on
    every process. Nothing for plain tensors."""
    if not is_sharded(tensors):
        return
    mesh = tensors[0].device_mesh
    pair = torch.tensor([value, -value], dtype=torch.float64, device=tensors[0].to_local().device)
    _all_reduce_(pair, mesh, tuple(range(mesh.ndim)), dist.ReduceOp.MAX)
    if float(pair[0]) != -float(pair[1]):
        raise ValueError(f"{what} must be the same on every process under FSDP2, and differ")
