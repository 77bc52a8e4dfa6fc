"""FSDP2 for real: two processes on the gloo backend on this CPU, the model ``fully_shard``ed.

Under FSDP2 parameters and gradients are DTensors and every pass's gradient is reduce-scattered,
so each process holds its shard of the gradient averaged over the processes: ε must be the one
the unsharded model gets from the whole batch (PITFALLS P4: a norm per shard is wrong). One
spawn of two processes runs everything here, for every method record:

* trajectories: several steps of a sharded model, each process on its half of every batch,
  against the unsharded model on the whole batch: the parameters must agree to float rounding
  after every step (a per-shard norm, or per-process loss weights, would be off at the first);
* communication: every pass of every method is one FSDP pass (its gathers and reduce-scatters),
  and the library adds one-element all-reduces only (norms, dot products, losses);
* BatchNorm with ``model=`` an FSDP module: running statistics updated by exactly one pass;
* checkpoints: a ``state_dict()`` of DTensors resumes bit for bit;
* every kernel on DTensors (uneven shards, an empty shard, a source laid out differently,
  the overflow-safe norm) against the same kernel on the whole tensors;
* refusals: FSDP1, DTensors mixed with plain tensors, pending (Partial) reductions.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flatminima import kernels
from records import RECORDS, MethodRecord
from support import make_base, per_example_pass

if not dist.is_available():  # pragma: no cover - every supported build has it
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

WORLD_SIZE = 2
STEPS = 4
BATCH = 16
TRAJECTORY_TOLERANCE = 1e-12
"""float64 parameters of size ~1: only the order of the sums (per shard, then across) differs."""


# -- the model and the data ---------------------------------------------------------------------


def _model(*, batchnorm: bool = False) -> nn.Module:
    """4 → 5 → 1 → 3 in float64, a classifier: 5 and 3 rows split unevenly over two processes,
    and the middle layer's single row leaves process 1 an empty shard of its weight and bias."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 3)]
    return nn.Sequential(*layers).double()


def _shard(model: nn.Module, mesh: Any = None) -> nn.Module:
    """``fully_shard`` on every Linear, then on the root (its own parameter group); on ``mesh``
    when given (a 2-D mesh is hybrid sharding: replicated along its first dimension)."""
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def _closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, per_example: bool = False
) -> Callable[..., torch.Tensor]:
    """Forward and backward of the mean loss (the halves' mean is the whole's); with
    ``per_example`` it takes the evaluation and returns per-example losses (ESAM's form)."""
    if per_example:
        return lambda evaluation: per_example_pass(
            lambda rows: nn.functional.cross_entropy(
                model(x if rows is None else x[rows]),
                y if rows is None else y[rows],
                reduction="none",
            ),
            len(y),
            evaluation,
        )

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _full(param: torch.Tensor) -> torch.Tensor:
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()


# -- what each process runs ---------------------------------------------------------------------

MESHES = {"fsdp": (WORLD_SIZE,), "hsdp 2x1": (WORLD_SIZE, 1), "hsdp 1x2": (1, WORLD_SIZE)}
"""Device meshes by name: plain FSDP, and hybrid sharding replicated over both processes (each
holds whole tensors, norms must not be summed over the replicas) or sharded over both (the
shards along the mesh's second dimension)."""

Setting = tuple[str, Any, str, str]

SETTINGS: tuple[Setting, ...] = (
    ("sgd", None, "closure", "fsdp"),
    ("adamw", False, "evaluations", "fsdp"),
    ("sgd", True, "manual", "fsdp"),
    ("sgd", None, "closure", "hsdp 2x1"),
    ("sgd", None, "closure", "hsdp 1x2"),
)
"""(base optimizer, foreach, form, mesh): SGD with momentum and weight decay and AdamW; the
default (foreach) and the per-tensor path; ``step(closure)``, ``evaluations()`` and, for
methods whose record allows it, ``first_step()`` / ``second_step()``; FSDP and HSDP."""


def _settings(record: MethodRecord) -> list[Setting]:
    return [s for s in SETTINGS if s[2] != "manual" or record.manual_two_pass]


def _sharded_step(
    optimizer: Any, form: str, closure: Callable[..., torch.Tensor], per_example: bool
) -> None:
    if form == "closure":
        optimizer.step(closure)
    elif form == "evaluations":
        with optimizer.evaluations() as evaluations:
            for evaluation in evaluations:
                evaluation.report(closure(evaluation) if per_example else closure())
    else:
        optimizer.zero_grad(set_to_none=True)
        closure()
        optimizer.first_step()
        closure()
        optimizer.second_step()


def _trajectory(
    record: MethodRecord, configuration: str, setting: Setting, meshes: dict[str, Any], rank: int
) -> dict[str, Any]:
    """The largest |sharded − unsharded| parameter entry over the steps, and how far the
    unsharded run moved from the initial weights (so that agreement is not trivial)."""
    hyperparameters = record.configurations[configuration]
    base, foreach, form, mesh = setting
    whole = _model()
    initial = [p.detach().clone() for p in whole.parameters()]
    reference = record.cls(
        make_base(base, whole.parameters()), **hyperparameters, **record.extras(), foreach=foreach
    )
    sharded = _shard(_model(), meshes[mesh])
    optimizer = record.cls(
        make_base(base, sharded.parameters()),
        **hyperparameters,
        **record.extras(),
        model=sharded,
        foreach=foreach,
    )
    per_example = record.needs_per_example_closure
    if record.prepare is not None:  # the same (whole) batches on every process: the same mask
        record.prepare(reference, whole, _batches())
        record.prepare(optimizer, sharded, _batches())
    largest = 0.0
    collectives: dict[str, list[int]] = {}
    for x, y in _batches():
        half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        reference.step(_closure(whole, x, y, per_example=per_example))
        with _collectives_recorded(collectives):
            closure = _closure(sharded, x[half], y[half], per_example=per_example)
            _sharded_step(optimizer, form, closure, per_example)
        for got, want in zip(sharded.parameters(), whole.parameters(), strict=True):
            largest = max(largest, float((_full(got) - want.detach()).abs().max()))
    moved = max(
        float((p.detach() - p0).abs().max())
        for p, p0 in zip(whole.parameters(), initial, strict=True)
    )
    return {
        "difference": largest,
        "moved": moved,
        "passes": sum(record.passes(hyperparameters, step) for step in range(STEPS)),
        **{name: len(sizes) for name, sizes in collectives.items()},
        "largest_all_reduce": max(collectives.get("all_reduce", []), default=0),
    }


def _collectives_of_one_sgd_step(rank: int) -> dict[str, int]:
    """FSDP2's collectives in one plain SGD step (one forward and backward) of the model."""
    model = _shard(_model())
    base = make_base("sgd", model.parameters())
    x, y = _batches()[0]
    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    collectives: dict[str, list[int]] = {}
    with _collectives_recorded(collectives):
        _closure(model, x[half], y[half])()
        base.step()
    return {name: len(sizes) for name, sizes in collectives.items()}


RECORDED = ("all_reduce", "all_gather_single", "reduce_scatter_single")
"""The collectives counted: the library's own (``all_reduce``) and FSDP2's per-pass ones (its
parameter all-gathers and gradient reduce-scatters in torch 2.13)."""


@contextlib.contextmanager
def _collectives_recorded(record: dict[str, list[int]]) -> Iterator[None]:
    """Appends the number of elements of every recorded collective inside to ``record``."""
    originals = {name: getattr(dist, name) for name in RECORDED}

    def recording(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            record.setdefault(name, []).append(max(t.numel() for t in tensors))
            return originals[name](*args, **kwargs)

        return call

    for name in RECORDED:
        setattr(dist, name, recording(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _resumed(record: MethodRecord, rank: int) -> float:
    """Two steps, ``state_dict()`` (DTensors in it), a fresh optimizer on a copy of the sharded
    weights loads it, two more steps on both: the largest difference (0 when bit for bit)."""

    def build(model: nn.Module) -> Any:
        base = make_base("sgd", model.parameters())
        return record.cls(base, **record.typical, **record.extras(), model=model)

    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    batches = _batches()
    model = _shard(_model())
    optimizer = build(model)
    per_example = record.needs_per_example_closure
    if record.prepare is not None:
        record.prepare(optimizer, model, batches)
    for x, y in batches[:2]:
        optimizer.step(_closure(model, x[half], y[half], per_example=per_example))
    saved = copy.deepcopy(optimizer.state_dict())
    twin = _shard(_model())
    with torch.no_grad():
        for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs)
    resumed = build(twin)
    resumed.load_state_dict(saved)
    for x, y in batches[2:]:
        optimizer.step(_closure(model, x[half], y[half], per_example=per_example))
        resumed.step(_closure(twin, x[half], y[half], per_example=per_example))
    return max(
        float((_full(a) - _full(b)).abs().max())
        for a, b in zip(twin.parameters(), model.parameters(), strict=True)
    )


def _batchnorm(record: MethodRecord, rank: int) -> dict[str, Any]:
    """One step with ``model=`` the sharded model: BatchNorm's buffers after it, against those
    right after the step's first pass (which may update them; the others may not)."""
    model = _shard(_model(batchnorm=True))
    optimizer = record.cls(
        make_base("sgd", model.parameters()), **record.typical, **record.extras(), model=model
    )
    x, y = _batches()[0]
    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    per_example = record.needs_per_example_closure
    closure = _closure(model, x[half], y[half], per_example=per_example)
    after_first_pass = None
    with optimizer.evaluations() as evaluations:
        for evaluation in evaluations:
            evaluation.report(closure(evaluation) if per_example else closure())
            if after_first_pass is None:
                after_first_pass = {n: b.clone() for n, b in model.named_buffers()}
    assert after_first_pass is not None
    norm = model[1]
    return {
        "batches_tracked": int(norm.num_batches_tracked),
        "difference": max(
            float((b.double() - after_first_pass[n].double()).abs().max())
            for n, b in model.named_buffers()
        ),
    }


MASK_SETTINGS: dict[str, dict[str, Any]] = {
    # Weights rounded to halves: many equal scores, so ties straddle the k-th largest.
    "fisher, ties at zero": {"mask": "fisher", "sparsity": 0.1, "num_samples": 6},
    "dynamic, weight scores with ties": {
        "mask": "dynamic",
        "sparsity": 0.45,
        "total_epochs": 4,
        "drop_strategy": "weight",
        "growth_strategy": "weight",
    },
    "dynamic, gradient and random": {"mask": "dynamic", "sparsity": 0.3, "total_epochs": 4},
}
"""Sparse SAM's masks learnt on shards against the unsharded model's, bit for bit."""


def _gathered_mask(optimizer: Any, params: list[torch.Tensor]) -> torch.Tensor:
    """The whole model's mask from every process's shards (flat, in parameter order)."""
    pieces = []
    for p, local in zip(params, optimizer.masks(), strict=True):
        if isinstance(p, DTensor):
            whole = DTensor.from_local(
                local.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
            pieces.append(whole.bool().reshape(-1))
        else:
            pieces.append(local.reshape(-1))
    return torch.cat(pieces)


def _sparse_masks(meshes: dict[str, Any]) -> dict[str, Any]:
    """Per setting and mesh: whether the sharded mask equals the unsharded one after each of
    three refreshes (epochs 0-2, the first with half-valued weights for ties), and both
    densities after the last."""
    import flatminima

    out: dict[str, Any] = {}
    for name, settings in MASK_SETTINGS.items():
        for mesh_name in ("fsdp", "hsdp 2x1", "hsdp 1x2"):
            models = [_model(), _shard(_model(), meshes[mesh_name])]
            for model in models:
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_((p * 2).round() / 2)
            optimizers = [
                flatminima.SparseSAM(
                    make_base("sgd", model.parameters()),
                    rho=0.1,
                    generator=torch.Generator().manual_seed(3),
                    model=model,
                    **settings,
                )
                for model in models
            ]
            equal = []
            for epoch in range(3):
                for optimizer, model in zip(optimizers, models, strict=True):
                    optimizer.refresh_mask(
                        model, nn.functional.cross_entropy, _batches(), epoch=epoch
                    )
                whole, sharded = (
                    _gathered_mask(o, list(m.parameters()))
                    for o, m in zip(optimizers, models, strict=True)
                )
                equal.append(bool(torch.equal(whole, sharded)))
                x, y = _batches()[epoch]  # a step in between, on the whole batch everywhere
                for optimizer, model in zip(optimizers, models, strict=True):
                    optimizer.step(_closure(model, x, y))
            out[f"{name} / {mesh_name}"] = {
                "equal": equal,
                "densities": [o.mask_density() for o in optimizers],
                "size": sum(p.numel() for p in models[0].parameters()),
                "live": int(whole.sum()),
            }
    # Every process must pass the same batches: different ones are refused.
    model = _shard(_model())
    optimizer = flatminima.SparseSAM(make_base("sgd", model.parameters()), num_samples=4)
    rank = dist.get_rank()
    try:
        optimizer.refresh_mask(model, nn.functional.cross_entropy, _batches()[rank : rank + 1])
        out["different batches"] = "no error"
    except ValueError as error:
        out["different batches"] = str(error)
    return out


# Every public function of kernels.py, called on lists of tensors: (call, exact). ``call``
# gets the lists and ``foreach`` and returns what the kernel returns. The lists' contents after
# the call must equal the unsharded ones bit for bit (entry-wise work on the same entries);
# the returned value too when ``exact``, else to rounding (sums in another order).
KERNEL_CASES: dict[str, tuple[Callable[[list[list[torch.Tensor]], bool], Any], bool]] = {
    "squared_norm": (lambda ls, f: kernels.squared_norm(ls[0], foreach=f), False),
    "global_norm": (lambda ls, f: kernels.global_norm(ls[0], foreach=f), False),
    "scale_": (lambda ls, f: kernels.scale_(ls[0], 1.0 / 3.0, foreach=f), True),
    "add_": (lambda ls, f: kernels.add_(ls[0], ls[1], alpha=-0.7, foreach=f), True),
    "add_scalar_": (lambda ls, f: kernels.add_scalar_(ls[0], 0.25, foreach=f), True),
    "mul_": (lambda ls, f: kernels.mul_(ls[0], ls[1], foreach=f), True),
    "div_": (lambda ls, f: kernels.div_(ls[0], ls[2], foreach=f), True),
    "copy_": (lambda ls, f: kernels.copy_(ls[0], ls[1], foreach=f), True),
    "abs_": (lambda ls, f: kernels.abs_(ls[0], foreach=f), True),
    "sqrt_": (lambda ls, f: kernels.sqrt_(ls[2], foreach=f), True),
    "root_one_plus_scaled_square_": (
        lambda ls, f: kernels.root_one_plus_scaled_square_(ls[0], ls[1], 0.5, foreach=f),
        True,
    ),
    "zero_": (lambda ls, f: kernels.zero_(ls[0], foreach=f), True),
    "normal_": (
        lambda ls, f: kernels.normal_(ls[0], generator=torch.Generator().manual_seed(7)),
        True,
    ),
    "empty_like": (lambda ls, f: [tuple(t.shape) for t in kernels.empty_like(ls[0])], True),
    "add_squares_": (lambda ls, f: kernels.add_squares_(ls[0], ls[1], foreach=f), True),
    "dot": (lambda ls, f: kernels.dot(ls[0], ls[1], foreach=f), False),
    "norm_and_tensor": (lambda ls, f: list(kernels.norm_and_tensor(ls[0], foreach=f)), False),
    "fisher_precondition_": (
        lambda ls, f: kernels.fisher_precondition_(ls[0], 0.5, foreach=f),
        False,
    ),
    "friendly_direction_": (
        lambda ls, f: kernels.friendly_direction_(ls[0], ls[1], 0.8, 0.6, foreach=f),
        True,
    ),
    "add_scaled_": (lambda ls, f: kernels.add_scaled_(ls[0], ls[1], -0.7, foreach=f), True),
    # Each packed mask is the local tensor's (a shard's mask on DTensors): here its positives.
    "apply_packed_mask_": (
        lambda ls, f: kernels.apply_packed_mask_(
            ls[0], [kernels.pack_mask(_local(t) > 0) for t in ls[0]], foreach=f
        ),
        True,
    ),
}

NOT_KERNELS = {
    "accumulation_dtype",
    "group_by_device_and_dtype",
    "traced_factor",
    "pack_mask",
    "unpack_mask",
}
"""Public helpers of kernels.py that take no tensor lists (nothing to shard): the packing
helpers take one tensor, the one a process holds."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


SHAPES = [(5, 3), (1,), (4,), (2, 2), (3,), (600, 300)]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float16, torch.float32]
"""Uneven shards, an empty one (process 1's part of the 1-element tensor), three dtypes, and a
tensor large enough, whole and per shard, for the kernels' chunked paths."""


def _whole_lists() -> list[list[torch.Tensor]]:
    """Three lists of the same shapes; the third positive (a divisor, a square root's input)."""
    generator = torch.Generator().manual_seed(5)
    lists = [
        [torch.randn(s, generator=generator).to(d) for s, d in zip(SHAPES, DTYPES, strict=True)]
        for _ in range(3)
    ]
    lists[2] = [t.abs() + 0.5 for t in lists[2]]
    return lists


def _compare(got: Any, want: Any, exact: bool) -> float:
    """max |got − want| (inf on any mismatch when ``exact``)."""
    if isinstance(got, list):
        return max(_compare(g, w, exact) for g, w in zip(got, want, strict=True))
    if isinstance(got, tuple) or got is None:
        return 0.0 if got == want else math.inf
    got_value = _full(got) if isinstance(got, torch.Tensor) else torch.tensor(got)
    want_value = want.detach() if isinstance(want, torch.Tensor) else torch.tensor(want)
    if exact:
        return 0.0 if torch.equal(got_value, want_value) else math.inf
    scale = max(1.0, float(want_value.double().abs().max()))
    return float((got_value.double() - want_value.double()).abs().max()) / scale


def _kernels(mesh: Any) -> dict[str, float]:
    """Every kernel on DTensors against the whole tensors; ``name[foreach]`` → difference."""
    out: dict[str, float] = {}
    layouts: dict[str, list[Callable[[torch.Tensor], list[Any]]]] = {
        "shards": [lambda t: [Shard(0)]] * 3,
        # the sources replicated or sharded along their last dimension: redistributed first
        "mixed layouts": [
            lambda t: [Shard(0)],
            lambda t: [Replicate()],
            lambda t: [Shard(t.dim() - 1)],
        ],
    }
    for layout, placements in layouts.items():
        for name, (call, exact) in KERNEL_CASES.items():
            for foreach in (True, False):
                whole = _whole_lists()
                sharded = [
                    [distribute_tensor(t.clone(), mesh, place(t), src_data_rank=None) for t in ts]
                    for ts, place in zip(whole, placements, strict=True)
                ]
                want = call(whole, foreach)
                got = call(sharded, foreach)
                difference = _compare(got, want, exact)
                for got_list, want_list in zip(sharded, whole, strict=True):
                    difference = max(difference, _compare(got_list, want_list, exact=True))
                out[f"{layout}: {name}[foreach={foreach}]"] = difference
    # The overflow-safe norm: float32 entries whose squares overflow, on shards.
    huge = [torch.full(s, 3e30, dtype=torch.float32) for s in SHAPES]
    huge[0][1, 2] = -7e31
    want_norm = kernels.global_norm(huge, foreach=True)
    got_norm = kernels.global_norm(
        [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in huge], foreach=True
    )
    out["overflowing global_norm"] = abs(got_norm - want_norm) / want_norm
    # A NaN or inf entry, on process 1's shard only: non-finite on every process, as unsharded.
    for bad in (math.nan, math.inf):
        huge[0][4, 0] = bad
        got_norm = kernels.global_norm(
            [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in huge],
            foreach=True,
        )
        out[f"global_norm with {bad}"] = 0.0 if not math.isfinite(got_norm) else math.inf
    return out


def _refusals(mesh: Any) -> dict[str, str]:
    """The messages for lists the kernels must refuse."""
    messages = {}
    shard = distribute_tensor(torch.ones(4), mesh, [Shard(0)], src_data_rank=None)
    partial = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    for name, tensors in (("mixed", [shard, torch.ones(3)]), ("partial", [partial])):
        try:
            kernels.global_norm(tensors, foreach=True)
            messages[name] = "no error"
        except (TypeError, ValueError) as error:
            messages[name] = str(error)
    # At construction: FSDP1's flattened shards, and groups mixing DTensors with plain tensors.
    fsdp1 = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), use_orig_params=True)
    mixed = [
        {"params": list(_model().parameters())},
        {"params": list(_shard(_model()).parameters())},
    ]
    for name, params in (("fsdp1", fsdp1.parameters()), ("mixed groups", mixed)):
        try:
            RECORDS[0].cls(torch.optim.SGD(params, lr=0.1), **RECORDS[0].typical)
            messages[name] = "no error"
        except (TypeError, ValueError) as error:
            messages[name] = str(error)
    return messages


SHARDED = [record for record in RECORDS if record.runs_sharded]
"""The methods that take sharded parameters; the others must refuse them."""


def _refusal_of(record: MethodRecord) -> str:
    """The message of the error a method that cannot shard raises on a sharded model."""
    model = _shard(_model())
    try:
        record.cls(make_base("sgd", model.parameters()), **record.typical, **record.extras())
    except TypeError as error:
        return str(error)
    return "no error"


def _guarded(compute: Callable[[], Any]) -> Any:
    """The result, or the traceback as a string: one failing case fails its own test only."""
    try:
        return compute()
    except Exception:
        return traceback.format_exc()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),  # a hang becomes an error, not a stuck run
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        meshes = {
            name: init_device_mesh("cpu", shape, mesh_dim_names=("dp", "shard")[-len(shape) :])
            for name, shape in MESHES.items()
        }
        mesh = meshes["fsdp"]
        results: dict[str, Any] = {"trajectories": {}, "batchnorm": {}, "resumed": {}}
        results["refused"] = {r.id: _refusal_of(r) for r in RECORDS if not r.runs_sharded}
        for record in SHARDED:
            for configuration in record.configurations:
                for setting in _settings(record):
                    key = f"{record.id}/{configuration}/{'/'.join(map(str, setting))}"
                    results["trajectories"][key] = _guarded(
                        lambda r=record, c=configuration, s=setting: _trajectory(
                            r, c, s, meshes, rank
                        )
                    )
            results["batchnorm"][record.id] = _guarded(lambda r=record: _batchnorm(r, rank))
            results["resumed"][record.id] = _guarded(lambda r=record: _resumed(r, rank))
        results["sgd_step"] = _collectives_of_one_sgd_step(rank)
        results["kernels"] = _guarded(lambda: _kernels(mesh))
        results["sparse_masks"] = _guarded(lambda: _sparse_masks(meshes))
        results["refusals"] = _guarded(lambda: _refusals(mesh))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    """One spawn of two processes for the whole module."""
    directory = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(
        _worker,
        args=(str(directory / "init"), str(directory)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD_SIZE)]


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("record", SHARDED, ids=lambda record: record.id)
def test_sharded_trajectory_equals_the_unsharded_whole_batch_one(results, record):
    """A method that picks rows of the batch (ESAM's examples, micro-batch SAM's micro-batches)
    picks them among each process's own rows: its sharded run is not the whole-batch run, and
    is only checked to run, move and communicate as the others do."""
    picks_rows = record.needs_per_example_closure
    for rank, result in enumerate(results):
        runs = {k: v for k, v in result["trajectories"].items() if k.startswith(f"{record.id}/")}
        assert len(runs) == len(record.configurations) * len(_settings(record))
        for key, run in runs.items():
            assert isinstance(run, dict), f"rank {rank}, {key}:\n{run}"
            assert run["moved"] > 1e-3, f"{key}: the weights barely moved, nothing was tested"
            assert math.isfinite(run["difference"]), (key, run)
            if not picks_rows:
                assert run["difference"] <= TRAJECTORY_TOLERANCE, (
                    f"rank {rank}, {key}: sharded and unsharded differ by {run['difference']:.3g}"
                )
            if not key.endswith("/fsdp"):
                continue  # HSDP all-reduces gradients over its replicas itself
            # What the library adds to FSDP's own communication: scalars (norms, losses).
            assert run.get("all_reduce", 0) > 0, f"{key}: no global norm was taken"
            assert run["largest_all_reduce"] == 1, f"{key}: {run}"
            if picks_rows:
                continue  # its passes on part of the batch, and its probes, cost less
            # Every pass, the ascent's included, is one FSDP pass: gathers and reduce-scatters.
            for name in ("all_gather_single", "reduce_scatter_single"):
                assert run[name] == run["passes"] * result["sgd_step"][name], (key, run)


@pytest.mark.parametrize("record", SHARDED, ids=lambda record: record.id)
def test_batchnorm_statistics_updated_once_under_fsdp(results, record):
    for rank, result in enumerate(results):
        run = result["batchnorm"][record.id]
        assert isinstance(run, dict), f"rank {rank}:\n{run}"
        assert run["batches_tracked"] == 1
        assert run["difference"] == 0.0, run


@pytest.mark.parametrize("record", SHARDED, ids=lambda record: record.id)
def test_state_dict_round_trip_continues_bitwise_under_fsdp(results, record):
    for rank, result in enumerate(results):
        difference = result["resumed"][record.id]
        assert difference == 0.0, f"rank {rank}:\n{difference}"


@pytest.mark.parametrize(
    "record", [r for r in RECORDS if not r.runs_sharded], ids=lambda record: record.id
)
def test_a_method_that_cannot_shard_refuses_sharded_parameters(results, record):
    for result in results:
        assert "does not support FSDP2-sharded parameters yet" in result["refused"][record.id]


def test_sparse_sam_masks_on_shards_are_the_unsharded_masks(results):
    """The global top-k (Fisher and SSAM-D's drop and regrow, ties included) and the random
    draws give every process its part of exactly the unsharded model's mask."""
    from flatminima.methods.sparse_sam import live_count

    for rank, result in enumerate(results):
        masks = result["sparse_masks"]
        assert isinstance(masks, dict), f"rank {rank}:\n{masks}"
        assert "must be the same on every process" in masks.pop("different batches")
        assert len(masks) == 3 * len(MASK_SETTINGS)
        for key, run in masks.items():
            assert all(run["equal"]), (rank, key, run)
            expected = live_count(run["size"], MASK_SETTINGS[key.split(" / ")[0]]["sparsity"])
            assert run["live"] == expected, (key, run)
            assert run["densities"] == [expected / run["size"]] * 2, (key, run)


def test_every_kernel_gives_the_unsharded_result_on_dtensors(results):
    for rank, result in enumerate(results):
        differences = result["kernels"]
        assert isinstance(differences, dict), f"rank {rank}:\n{differences}"
        # Entry-wise kernels are compared bit for bit (any difference is inf), sums relatively
        # (float32 sums of 180,000 terms in another order: ~1e-6).
        bad = {name: d for name, d in differences.items() if not d <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def test_mixed_partial_and_fsdp1_parameters_are_refused(results):
    for result in results:
        messages = result["refusals"]
        assert "mixed with plain tensors" in messages["mixed"]
        assert "fully_shard to the root module" in messages["mixed"]
        assert "Partial placement" in messages["partial"]
        assert "does not support FullyShardedDataParallel (FSDP1)" in messages["fsdp1"]
        assert "mixed with plain tensors in its param groups" in messages["mixed groups"]


def test_every_public_kernel_has_a_sharded_case():
    """A kernel added later must get a case above (and, if it needs one, a decorator from
    flatminima.sharded), or this test names it."""
    public = {
        name
        for name, function in inspect.getmembers(kernels, inspect.isfunction)
        if function.__module__ == kernels.__name__ and not name.startswith("_")
    }
    assert public - NOT_KERNELS == set(KERNEL_CASES)
