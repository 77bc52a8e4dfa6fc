"""List-of-tensors arithmetic used by every method.

Each primitive has two paths that compute the same thing:

* a plain per-tensor loop, the readable oracle, and
* a ``torch._foreach_*`` path, the fast default, which launches one kernel per list instead of
  one per tensor.

Norms are accumulated in float32 at least (float64 for float64 tensors), per (device, dtype)
group, so that half-precision gradients neither overflow nor lose the small entries.

FSDP2's sharded tensors (DTensors) reach every primitive through a decorator from
:mod:`flatminima.sharded`: entry-wise ones run on the local shards, sums are all-reduced over
the shards, so a norm is the unsharded model's.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from flatminima import sharded

TensorList = Sequence[Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of ``dtype`` tensors is accumulated in: float32 or better."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_by_device_and_dtype(
    tensors: TensorList,
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in their original order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(index)
    return dict(groups)


_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")


def _one_device_and_dtype(tensors: TensorList) -> bool:
    """Whether every tensor shares the first one's device and dtype (the usual case).

    Checked before grouping because grouping builds a dictionary entry per tensor, Python work
    per parameter that a model with a thousand small tensors pays on every call. ``map`` with
    an ``attrgetter`` runs the CPU check without a Python frame per tensor.
    """
    first = tensors[0]
    if first.is_cpu:  # ``is_cpu`` is cheaper than building a ``device`` object per tensor
        return len(set(map(_dtype_of, tensors))) == 1 and all(map(_is_cpu, tensors))
    dtype, device = first.dtype, first.device
    return all(t.dtype is dtype and t.device == device for t in tensors)


def _groups(tensors: TensorList) -> list[tuple[torch.dtype, list[Tensor]]]:
    """The tensors split by (device, dtype), each group in its original order, groups in the
    order of their first member: what :func:`group_by_device_and_dtype` gives."""
    if _one_device_and_dtype(tensors):
        return [(tensors[0].dtype, list(tensors))]
    return [
        (dtype, [tensors[i] for i in indices])
        for (_, dtype), indices in group_by_device_and_dtype(tensors).items()
    ]


@sharded.summed_over_shards
def squared_norm(tensors: TensorList, *, foreach: bool) -> Tensor:
    """Σ‖t‖² over all tensors, as a 0-d float64 tensor on the first tensor's device.

    Summing in float64 costs nothing here (one scalar per group) and makes the result exact
    enough for float64 parameters.
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float64)
    result_device = tensors[0].device
    total = torch.zeros((), dtype=torch.float64, device=result_device)
    for dtype, members in _groups(tensors):
        acc = accumulation_dtype(dtype)
        if foreach:
            norms = torch._foreach_norm(members, 2, dtype=acc)
        else:
            norms = [torch.linalg.vector_norm(t, 2, dtype=acc) for t in members]
        group_norm = torch.linalg.vector_norm(torch.stack(norms), 2)
        total = total + group_norm.to(device=result_device, dtype=torch.float64).square()
    return total


def traced_factor(numerator: float, norm: float, norm_tensor: Tensor) -> float | Tensor:
    """numerator / norm, as a Python float in eager mode and as a 0-d tensor computed from the
    norm's tensor under ``torch.compile``: a Python float that changes every step (ρ/‖g‖)
    would be baked into the compiled graph as a constant and recompile it at every step."""
    if torch.compiler.is_compiling():
        return numerator / norm_tensor
    return numerator / norm


def norm_and_tensor(tensors: TensorList, *, foreach: bool) -> tuple[float, Tensor]:
    """:func:`global_norm` as a float (for the caller's guards) and as a 0-d float64 tensor
    (for arithmetic that must stay traced under ``torch.compile``)."""
    norm_tensor = squared_norm(tensors, foreach=foreach).sqrt()
    norm = float(norm_tensor)
    if not math.isfinite(norm):
        norm = _rescaled_global_norm(tensors)
        norm_tensor = torch.tensor(norm, dtype=torch.float64, device=norm_tensor.device)
    return norm, norm_tensor


def global_norm(tensors: TensorList, *, foreach: bool) -> float:
    """The Euclidean norm of all tensors seen as one vector, as a Python float.

    Returning a float makes the caller's zero / non-finite guard a plain ``if`` and costs one
    device synchronisation per call, which is negligible next to a forward/backward pass.
    A finite vector always has a finite norm: when the fast sum of squares overflows (float32
    and bfloat16 entries above ~1.8e19, float64 above ~1e154), the norm is taken again with
    each tensor scaled by its largest entry. Only a non-finite entry gives a non-finite norm.
    """
    norm = float(squared_norm(tensors, foreach=foreach).sqrt())
    if math.isfinite(norm):
        return norm
    return _rescaled_global_norm(tensors)


@sharded.on_shards_use(sharded.rescaled_global_norm)
def _rescaled_global_norm(tensors: TensorList) -> float:
    """‖t‖ as peak·‖t/peak‖, per tensor and over the tensors, in float64: the slow path for
    sums of squares that overflow (it allocates a scaled copy of one tensor at a time)."""
    peaks = [torch.linalg.vector_norm(t, math.inf, dtype=torch.float64) for t in tensors]
    norms: list[float] = []
    for t, peak_tensor in zip(tensors, peaks, strict=True):
        peak = float(peak_tensor)
        if not math.isfinite(peak):
            return peak  # an inf or NaN entry: the norm is honestly non-finite
        if peak == 0.0:
            continue
        norms.append(peak * float(torch.linalg.vector_norm(t.double() / peak)))
    if not norms:
        return 0.0
    largest = max(norms)
    return largest * math.sqrt(sum((n / largest) ** 2 for n in norms))


REDUCED_PRECISION = (torch.float16, torch.bfloat16)

_CPU_FAST_TENSOR_FACTOR = (torch.float32, torch.float64)


def _factor_for(factor: float, dtype: torch.dtype, device: torch.device) -> Tensor | float:
    """The operand that makes ``_foreach_mul_`` compute what the per-tensor ``mul_`` does.

    * Half precision: the per-tensor ``mul_`` keeps a Python factor in float32, but
      ``_foreach_mul_`` first rounds it to the tensors' dtype (1/3 becomes 0.33325 in float16);
      a 0-d float32 tensor makes the foreach path round once, as the loop does.
    * float32 / float64 on CPU: a Python factor is rounded to the dtype either way, but the
      CPU foreach fallback wraps and converts it again for every tensor, which costs more
      than the multiplication for small tensors (measured: 3.5 µs instead of 1.5 µs per
      float32 tensor). A 0-d tensor of the same dtype holds the same rounded value, so the
      result is bit for bit the same, converted once.
    """
    if dtype in REDUCED_PRECISION:
        return torch.tensor(factor, dtype=torch.float32, device=device)
    if device.type == "cpu" and dtype in _CPU_FAST_TENSOR_FACTOR:
        return torch.tensor(factor, dtype=dtype)
    return factor


@sharded.on_local_shards
def scale_(tensors: TensorList, factor: float | Tensor, *, foreach: bool) -> None:
    """t ← factor · t for every tensor (the foreach path rounds ``factor`` as the loop does).

    ``factor`` is a 0-d tensor under ``torch.compile`` (see :func:`traced_factor`)."""
    if not tensors:
        return
    if isinstance(factor, Tensor):
        for dtype, members in _groups(tensors):
            wide = torch.float32 if dtype in REDUCED_PRECISION else dtype
            torch._foreach_mul_(members, factor.to(wide))
        return
    if not foreach:
        for t in tensors:
            t.mul_(factor)
        return
    if _one_device_and_dtype(tensors):
        first = tensors[0]
        torch._foreach_mul_(list(tensors), _factor_for(factor, first.dtype, first.device))
        return
    for (device, dtype), indices in group_by_device_and_dtype(tensors).items():
        members = [tensors[i] for i in indices]
        torch._foreach_mul_(members, _factor_for(factor, dtype, device))


@sharded.on_local_shards
def add_(targets: TensorList, sources: TensorList, *, alpha: float = 1.0, foreach: bool) -> None:
    """target ← target + alpha · source, pairwise."""
    if not targets:
        return
    if foreach:
        torch._foreach_add_(list(targets), list(sources), alpha=alpha)
    else:
        for t, s in zip(targets, sources, strict=True):
            t.add_(s, alpha=alpha)


@sharded.on_local_shards
def add_scalar_(tensors: TensorList, value: float, *, foreach: bool) -> None:
    """t ← t + value for every tensor."""
    if not tensors:
        return
    if foreach:
        torch._foreach_add_(list(tensors), value)
    else:
        for t in tensors:
            t.add_(value)


@sharded.on_local_shards
def mul_(targets: TensorList, factors: TensorList, *, foreach: bool) -> None:
    """target ← target ⊙ factor, pairwise."""
    if not targets:
        return
    if foreach:
        torch._foreach_mul_(list(targets), list(factors))
    else:
        for t, f in zip(targets, factors, strict=True):
            t.mul_(f)


@sharded.on_local_shards
def div_(targets: TensorList, divisors: TensorList, *, foreach: bool) -> None:
    """target ← target ⊘ divisor, pairwise."""
    if not targets:
        return
    if foreach:
        torch._foreach_div_(list(targets), list(divisors))
    else:
        for t, d in zip(targets, divisors, strict=True):
            t.div_(d)


@sharded.on_local_shards
def copy_(targets: TensorList, sources: TensorList, *, foreach: bool) -> None:
    """target ← source, pairwise, bit for bit."""
    if not targets:
        return
    if foreach:
        torch._foreach_copy_(list(targets), list(sources))
    else:
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)


@sharded.on_local_shards
def abs_(tensors: TensorList, *, foreach: bool) -> None:
    """t ← |t| for every tensor."""
    if not tensors:
        return
    if foreach:
        torch._foreach_abs_(list(tensors))
    else:
        for t in tensors:
            t.abs_()


@sharded.on_local_shards
def sqrt_(tensors: TensorList, *, foreach: bool) -> None:
    """t ← √t for every tensor."""
    if not tensors:
        return
    if foreach:
        torch._foreach_sqrt_(list(tensors))
    else:
        for t in tensors:
            t.sqrt_()


@sharded.on_local_shards
def root_one_plus_scaled_square_(
    out: TensorList, tensors: TensorList, scale: float, *, foreach: bool
) -> None:
    """out ← √(1 + scale·t²) for every tensor: Fisher SAM's √f.

    float16 tensors are squared in float32, one at a time: in float16 t² overflows to inf for
    |t| > 256, which would make f infinite and silently drop that coordinate from the norm.
    The result itself fits float16 as long as |t|·√scale does.
    """
    half = [i for i, t in enumerate(tensors) if t.dtype == torch.float16]
    for i in half:
        wide = tensors[i].float()
        out[i].copy_(wide.mul_(wide).mul_(scale).add_(1.0).sqrt_())
    rest_out, rest = list(out), list(tensors)
    if half:
        skip = set(half)
        rest_out = [o for i, o in enumerate(out) if i not in skip]
        rest = [t for i, t in enumerate(tensors) if i not in skip]
    copy_(rest_out, rest, foreach=foreach)
    mul_(rest_out, rest, foreach=foreach)  # t²
    scale_(rest_out, scale, foreach=foreach)
    add_scalar_(rest_out, 1.0, foreach=foreach)  # 1 + scale·t²
    sqrt_(rest_out, foreach=foreach)


@sharded.on_local_shards
def zero_(tensors: TensorList, *, foreach: bool) -> None:
    """t ← 0 for every tensor (also clears inf and NaN, which multiplying by 0 would not)."""
    if not tensors:
        return
    if foreach:
        torch._foreach_zero_(list(tensors))
    else:
        for t in tensors:
            t.zero_()


@sharded.on_shards_use(sharded.normal_drawn_whole_)
def normal_(tensors: TensorList, *, generator: torch.Generator | None) -> None:
    """t ← samples of N(0, 1), tensor by tensor in list order from ``generator`` (the default
    generator when ``None``): the stream of ``t.normal_(generator=generator)`` per tensor."""
    for t in tensors:
        t.normal_(generator=generator)


def empty_like(tensors: TensorList) -> list[Tensor]:
    """Uninitialised buffers shaped like ``tensors`` (one extra parameter copy of memory)."""
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]


# -- fused sweeps for the memory-bound methods -----------------------------------------------
#
# On large tensors the optimizer's arithmetic is bound by memory traffic, not by flops: every
# foreach call reads and writes whole tensors. The metric methods need several elementwise
# steps per coordinate (Fisher SAM: g², 1 + ηg², g/f, a sum, a scale), so the fast path below
# walks each large tensor in cache-sized chunks and runs all of a chunk's steps while it sits
# in the cache; memory sees one read (and, where the result is written, one write) per sweep.
# Small tensors keep the foreach path: per-chunk calls would cost more than they save. Where
# it allocates temporaries, it runs in batches of bounded size, so that they stay a fraction
# of a parameter copy whatever the number of small tensors. The per-tensor loop
# (``foreach=False``) stays the readable oracle of the same formulas.

FUSED_MIN_NUMEL = 1 << 16
"""Tensors with at least this many elements take the chunked path (foreach below)."""

CHUNK_NUMEL = 1 << 17
"""Elements per chunk: 512 KiB of float32. Measured on W2-wide's tensors (2-core EPYC,
one thread): 2^17 to 2^18 elements per chunk ran Fisher SAM's sweep 3× faster than 2^15 (the
Python cost of each chunk's calls) and 10× faster than whole tensors (which leave the cache)."""


def _split_by_size(tensors: TensorList) -> tuple[list[int], list[int]]:
    """Indices of the large (chunked) and small (foreach) tensors; a non-contiguous tensor
    counts as small, since only a contiguous one can be walked through flat views."""
    large, small = [], []
    for i, t in enumerate(tensors):
        (large if t.numel() >= FUSED_MIN_NUMEL and t.is_contiguous() else small).append(i)
    return large, small


def _chunk_pairs(*tensors: Tensor) -> zip:
    """Matching flat chunks of same-shaped contiguous tensors."""
    return zip(*(t.view(-1).split(CHUNK_NUMEL) for t in tensors), strict=True)


def _work_buffer(reference: Tensor, count: int = 1) -> list[Tensor]:
    """Chunk-sized buffers in the accumulation dtype of ``reference``."""
    dtype = accumulation_dtype(reference.dtype)
    size = min(CHUNK_NUMEL, reference.numel())
    return [torch.empty(size, dtype=dtype, device=reference.device) for _ in range(count)]


@sharded.summed_over_shards
def fisher_precondition_(grads: TensorList, eta: float, *, foreach: bool) -> float | Tensor:
    """g ← u = g/(1 + η·g²) in place, and returns gᵀF⁻¹g = Σ g·u: Fisher SAM's F⁻¹g and its
    normaliser for the diagonal F = 1 + η·g², in one sweep over the gradients.

    Half-precision gradients are widened to float32 for the arithmetic (g² overflows float16
    beyond 256) and u is rounded back to their dtype. Each tensor's (each chunk's) share of
    the sum is taken with ``torch.dot`` (``sum`` of a product on the per-tensor path) in the
    accumulation dtype and the shares are added in float64. Under ``torch.compile`` every
    tensor takes the foreach path and the sum stays a 0-d tensor (traced, not a constant).
    """
    if torch.compiler.is_compiling():
        wide = [t.to(accumulation_dtype(t.dtype)) for t in grads]
        f = [torch.ones_like(w) for w in wide]
        torch._foreach_addcmul_(f, wide, wide, value=eta)
        u = torch._foreach_div(wide, f)
        products = torch._foreach_mul(wide, u)
        torch._foreach_copy_(list(grads), u)
        return torch.stack([p.sum(dtype=torch.float64) for p in products]).sum()
    total = 0.0
    if not foreach:
        for g in grads:
            wide = g.to(accumulation_dtype(g.dtype))
            f = torch.addcmul(torch.ones_like(wide), wide, wide, value=eta)
            u = wide.div(f)
            total += float((wide * u).sum())
            g.copy_(u)
        return total
    large, small = _split_by_size(grads)
    for i in large:
        g = grads[i]
        f_buffer, u_buffer = _work_buffer(g, 2)
        one = torch.ones((), dtype=f_buffer.dtype, device=g.device)
        for (chunk,) in _chunk_pairs(g):
            wide = chunk if chunk.dtype == f_buffer.dtype else chunk.to(f_buffer.dtype)
            size = chunk.numel()
            f = torch.addcmul(one, wide, wide, value=eta, out=f_buffer[:size])
            u = torch.div(wide, f, out=u_buffer[:size])
            total += float(torch.dot(wide, u))
            chunk.copy_(u)
    # Small tensors: foreach in batches of bounded size, because of the temporaries. A batch
    # holds two lists of them of its own size at once (f and u, then u and the products;
    # three in half precision, with the widened copy); one list over every small tensor held
    # three copies of them all (3 P on ResNet-20, whose tensors are all small). A batch holds
    # at most 1/8 of the small tensors' elements, so on a model of many small tensors the
    # temporaries stay near P/4, well under the backup's 1 P, and at most FUSED_MIN_NUMEL,
    # as the chunked path's two buffers are bounded; a tensor above the bound is a batch of
    # its own. Every operation is elementwise and the shares are added in the same order as
    # with one list, so the batching changes no bit of u or of the sum.
    index_groups = _index_groups(grads, small)
    sizes = [[grads[i].numel() for i in index_group] for index_group in index_groups]
    bound = min(FUSED_MIN_NUMEL, max(1, sum(map(sum, sizes)) // 8))
    for index_group, group_sizes in zip(index_groups, sizes, strict=True):
        for batch in _batches(index_group, group_sizes, bound):
            total = _fisher_precondition_batch_([grads[i] for i in batch], eta, total)
    return total


def _fisher_precondition_batch_(members: list[Tensor], eta: float, total: float) -> float:
    """:func:`fisher_precondition_`'s foreach path on one batch of same-dtype tensors: g ← u
    in place, and ``total`` plus their shares of gᵀF⁻¹g, added one tensor at a time. Its
    temporaries are freed when it returns, before the next batch allocates its own."""
    wide = [t.to(accumulation_dtype(t.dtype)) for t in members]
    f = [torch.ones_like(w) for w in wide]
    torch._foreach_addcmul_(f, wide, wide, value=eta)
    u = torch._foreach_div(wide, f)
    del f  # freed before the products are allocated
    for product in torch._foreach_mul(wide, u):
        total += float(product.sum())
    torch._foreach_copy_(members, u)
    return total


def _batches(indices: list[int], sizes: list[int], max_numel: int) -> Iterator[list[int]]:
    """``indices`` cut, in order, into runs whose tensors (of ``sizes`` elements, one size per
    index) hold at most ``max_numel`` elements together; a tensor larger than that forms a
    run of its own."""
    batch: list[int] = []
    held = 0
    for i, numel in zip(indices, sizes, strict=True):
        if batch and held + numel > max_numel:
            yield batch
            batch, held = [], 0
        batch.append(i)
        held += numel
    if batch:
        yield batch


def _index_groups(tensors: TensorList, indices: list[int]) -> list[list[int]]:
    """``indices`` split by (device, dtype) of their tensors, each group in their order."""
    if not indices:
        return []
    if _one_device_and_dtype([tensors[i] for i in indices]):  # the usual case, checked fast
        return [list(indices)]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i in indices:
        groups[(tensors[i].device, tensors[i].dtype)].append(i)
    return list(groups.values())


@sharded.on_local_shards
def friendly_direction_(
    grads: TensorList, emas: TensorList, sigma: float, lmbda: float, *, foreach: bool
) -> None:
    """Friendly SAM's direction and EMA in one sweep: d = g − σ·m (the EMA from *before*
    this step), then m ← λ·m + (1 − λ)·g with the raw g; d is left in ``grads``."""
    if not foreach:
        for g, m in zip(grads, emas, strict=True):
            previous = m.clone()
            m.mul_(lmbda).add_(g, alpha=1.0 - lmbda)
            g.add_(previous, alpha=-sigma)
        return
    large, small = _split_by_size(grads)
    if torch.compiler.is_compiling():  # chunk loops would unroll into huge graphs
        large, small = [], sorted(large + small)
    for i in large:
        g, m = grads[i], emas[i]
        previous_buffer = torch.empty(min(CHUNK_NUMEL, g.numel()), dtype=m.dtype, device=m.device)
        for chunk_g, chunk_m in _chunk_pairs(g, m):
            # d into the buffer, the EMA by lerp (m + (1 − λ)(g − m), the same EMA up to
            # rounding), d back into g: three calls on a chunk in cache instead of four.
            direction = torch.add(
                chunk_g, chunk_m, alpha=-sigma, out=previous_buffer[: chunk_g.numel()]
            )
            chunk_m.lerp_(chunk_g, 1.0 - lmbda)
            chunk_g.copy_(direction)
    if small:
        small_grads = [grads[i] for i in small]
        small_emas = [emas[i] for i in small]
        previous = [m.clone() for m in small_emas]
        scale_(small_emas, lmbda, foreach=True)
        add_(small_emas, small_grads, alpha=1.0 - lmbda, foreach=True)
        add_(small_grads, previous, alpha=-sigma, foreach=True)


def _friendly_direction_deferred_(
    grads: TensorList, emas: TensorList, next_emas: TensorList, sigma: float, lmbda: float
) -> None:
    """:func:`friendly_direction_`'s foreach path with the EMA's next value written to
    ``next_emas`` and ``emas`` left as they are: d = g − σ·m into ``grads``, λ·m + (1 − λ)·g
    into ``next_emas``, element for element the same arithmetic (large contiguous tensors by
    ``lerp``, the others by a scale and an add). The caller commits the EMA once it knows the
    gradient was finite (:func:`_swap_storages_`), so no copy of the old EMA is needed: two
    calls on a chunk in cache instead of three, and no separate finiteness sweep before.
    Private: plain (unsharded) tensors in eager mode only, so it has no sharded form; Friendly
    SAM's fast path, its one caller, checks that."""
    large, small = _split_by_size(grads)
    for i in large:
        g, m, following = grads[i], emas[i], next_emas[i]
        if not (m.is_contiguous() and following.is_contiguous()):
            small.append(i)
            continue
        for chunk_g, chunk_m, chunk_next in _chunk_pairs(g, m, following):
            torch.lerp(chunk_m, chunk_g, 1.0 - lmbda, out=chunk_next)
            chunk_g.add_(chunk_m, alpha=-sigma)
    if small:
        small.sort()
        small_grads = [grads[i] for i in small]
        small_emas = [emas[i] for i in small]
        small_next = [next_emas[i] for i in small]
        copy_(small_next, small_emas, foreach=True)
        scale_(small_next, lmbda, foreach=True)
        add_(small_next, small_grads, alpha=1.0 - lmbda, foreach=True)
        add_(small_grads, small_emas, alpha=-sigma, foreach=True)


def _swap_storages_(first: TensorList, second: TensorList) -> None:
    """Exchanges the memory behind each pair of same-dtype plain tensors (each keeps its
    identity: the optimizer state and the backup's list refer to the same objects), copying
    nothing. Private, as :func:`_friendly_direction_deferred_`."""
    with torch.no_grad():
        for a, b in zip(first, second, strict=True):
            storage, offset, size, stride = (
                a.untyped_storage(),
                a.storage_offset(),
                a.size(),
                a.stride(),
            )
            a.set_(b.untyped_storage(), b.storage_offset(), b.size(), b.stride())
            b.set_(storage, offset, size, stride)


@sharded.summed_over_shards
def dot(first: TensorList, second: TensorList, *, foreach: bool) -> Tensor:
    """Σᵢ ⟨firstᵢ, secondᵢ⟩ over all pairs, as a 0-d float64 tensor on the first tensor's device.

    Accumulated as :func:`squared_norm` is: per tensor in float32 at least (float64 for float64
    tensors), summed over tensors in float64. Half-precision pairs are widened one tensor at a
    time, so only one temporary of one tensor's size exists at once. Both paths run one
    ``torch.dot`` per tensor pair, which reads the two tensors once and allocates nothing:
    torch has no ``_foreach`` dot product (``_foreach_mul`` would allocate a whole copy of the
    gradients; ``_foreach_mm`` on 1×n·n×1 views is slower on CPU and follows the float32 matmul
    precision, TF32 on a GPU if the user allowed it). The foreach path stacks the per-tensor
    results of a (device, dtype) group and sums them in one reduction; the loop adds them one
    at a time. The two may differ in the last bit of the sum.
    """
    if len(first) != len(second):
        raise ValueError(f"dot needs lists of equal length, got {len(first)} and {len(second)}")
    if len(first) == 0:
        return torch.zeros((), dtype=torch.float64)
    result_device = first[0].device
    total = torch.zeros((), dtype=torch.float64, device=result_device)
    for (_, dtype), indices in group_by_device_and_dtype(first).items():
        acc = accumulation_dtype(dtype)
        products = [_flat_dot(first[i], second[i], acc) for i in indices]
        if foreach:
            group_total = torch.stack(products).sum(dtype=torch.float64)
            total = total + group_total.to(device=result_device)
        else:
            for product in products:
                total = total + product.to(device=result_device, dtype=torch.float64)
    return total


def _flat_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """⟨a, b⟩ of two same-shaped tensors, computed in ``acc`` (a 0-d tensor of dtype ``acc``)."""
    if a.shape != b.shape:
        raise ValueError(
            f"dot needs tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return torch.dot(a.to(acc).reshape(-1), b.to(acc).reshape(-1))


@sharded.on_local_shards
def add_squares_(targets: TensorList, sources: TensorList, *, foreach: bool) -> None:
    """target ← target + source ⊙ source, pairwise (Sparse SAM's empirical Fisher Σ g²)."""
    if not targets:
        return
    if foreach:
        torch._foreach_addcmul_(list(targets), list(sources), list(sources))
    else:
        for t, s in zip(targets, sources, strict=True):
            t.addcmul_(s, s)


# -- bit-packed masks (Sparse SAM) ------------------------------------------------------------
#
# A mask of N coordinates is stored as ⌈N/8⌉ uint8 bytes, coordinate i in bit i mod 8 of byte
# ⌊i/8⌋ (flat, row-major order): 1/32 of a float32 copy instead of the 1/4 of a bool tensor.
# It is unpacked only where it is applied, one tensor (one chunk of a large tensor) at a time.

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def _bit_weights(device: torch.device) -> Tensor:
    return torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=device)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as ⌈N/8⌉ uint8 bytes (flat, row-major; the last byte padded with 0)."""
    flat = mask.reshape(-1)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    bits = flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)
    return bits.sum(dim=1, dtype=torch.uint8)  # distinct powers of two: the sum is the OR


def unpack_mask(packed: Tensor, numel: int, *, start: int = 0) -> Tensor:
    """Coordinates ``start`` .. ``start + numel`` of a packed mask, as a flat bool tensor
    (``start`` a multiple of 8)."""
    first, last = start // 8, (start + numel + 7) // 8
    bytes_ = packed[first:last]
    bits = bytes_.unsqueeze(1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.view(-1)[:numel]


def _apply_packed_mask_on_local_shards(
    tensors: TensorList, packed: TensorList, *, foreach: bool
) -> None:
    """DTensors: each packed mask is the mask of this process's shard."""
    apply_packed_mask_.__wrapped__(  # type: ignore[attr-defined]
        [t.to_local() for t in tensors], packed, foreach=foreach
    )


@sharded.on_shards_use(_apply_packed_mask_on_local_shards)
def apply_packed_mask_(tensors: TensorList, packed: TensorList, *, foreach: bool) -> None:
    """t ← t ⊙ m for every tensor, m given packed (:func:`pack_mask`): the same
    multiplication by a bool tensor as :func:`mul_` (so NaN·0 stays NaN, as there), with the
    mask unpacked one tensor at a time (a large contiguous tensor chunk by chunk), so that at
    most one tensor's (one chunk's) bools exist at once. On DTensors each packed mask is that
    of the local shard."""
    if not tensors:
        return
    if torch.compiler.is_compiling():  # chunk loops would unroll into huge graphs
        torch._foreach_mul_(
            list(tensors),
            [unpack_mask(m, t.numel()).view(t.shape) for t, m in zip(tensors, packed, strict=True)],
        )
        return
    large, small = _split_by_size(tensors) if foreach else ([], list(range(len(tensors))))
    for i in large:
        for index, (chunk,) in enumerate(_chunk_pairs(tensors[i])):
            chunk.mul_(unpack_mask(packed[i], chunk.numel(), start=index * CHUNK_NUMEL))
    if not foreach:
        for t, m in zip(tensors, packed, strict=True):
            t.mul_(unpack_mask(m, t.numel()).view(t.shape))
        return
    # Small tensors: foreach over batches of at most CHUNK_NUMEL coordinates, so that the
    # unpacked bools of one batch are all that exists at once.
    for batch in _batches(small, [tensors[i].numel() for i in small], CHUNK_NUMEL):
        torch._foreach_mul_(
            [tensors[j] for j in batch],
            [unpack_mask(packed[j], tensors[j].numel()).view(tensors[j].shape) for j in batch],
        )


@sharded.on_local_shards
def add_scaled_(
    targets: TensorList, sources: TensorList, factor: float | Tensor, *, foreach: bool
) -> None:
    """target ← target + factor·source, pairwise: :func:`add_` with ``alpha=factor`` for a
    Python float (the same bits), and the product first for a 0-d tensor, the form a factor
    that changes every step takes under ``torch.compile`` (see :func:`traced_factor`), where
    a Python float would be baked into the graph and recompile it at every step."""
    if not targets:
        return
    if not isinstance(factor, Tensor):
        add_(targets, sources, alpha=factor, foreach=foreach)
        return
    for dtype, members in _groups(sources):
        wide = torch.float32 if dtype in REDUCED_PRECISION else dtype
        scaled = torch._foreach_mul(members, factor.to(wide))
        indices = [i for i, s in enumerate(sources) if s.dtype == dtype]
        torch._foreach_add_([targets[i] for i in indices], scaled)
