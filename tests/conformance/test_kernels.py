"""The list kernels: the fast path (foreach, and cache-sized chunks on large tensors) computes
what the per-tensor oracle computes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.memory import AllocationTracker

from flatminima import kernels
from flatminima.experiments.models import ResNet20

# One tensor large enough for the chunked path (several chunks and a ragged last one), a
# non-contiguous one (foreach path) and small ones (foreach path).
LARGE = 3 * kernels.CHUNK_NUMEL + 123
assert LARGE >= kernels.FUSED_MIN_NUMEL


def tensors(dtype, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    large = torch.randn(LARGE, generator=generator, dtype=torch.float64).to(dtype) * scale
    transposed = torch.randn(300, 260, generator=generator, dtype=torch.float64).to(dtype).t()
    small = [torch.randn(7, 3, generator=generator, dtype=torch.float64).to(dtype) * scale]
    return [large, transposed * scale, *small]


def clone(ts):
    return [t.clone() for t in ts]


TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("eta", [0.0, 1.0, 1e4])
def test_fisher_precondition_fast_path_equals_the_oracle_and_the_formula(dtype, eta):
    fast, oracle, original = (tensors(dtype, seed=1, scale=10.0) for _ in range(3))
    quadratic_fast = kernels.fisher_precondition_(fast, eta, foreach=True)
    quadratic_oracle = kernels.fisher_precondition_(oracle, eta, foreach=False)
    exact_quadratic = sum(
        float((g.double() ** 2 / (1 + eta * g.double() ** 2)).sum()) for g in original
    )
    # float32 sums of ~10^5 terms (torch.dot per chunk) drift by a few 1e-5: the radius of ε
    # is then off by as much, which no training can tell.
    summed = max(TOLERANCE[dtype], 1e-4 if dtype == torch.float32 else 0.0)
    assert quadratic_fast == pytest.approx(exact_quadratic, rel=summed)
    assert quadratic_oracle == pytest.approx(exact_quadratic, rel=summed)
    for a, b, g in zip(fast, oracle, original, strict=True):
        assert a.dtype == dtype and a.shape == g.shape
        wide = g.double()
        exact = wide / (1 + eta * wide**2)
        atol = torch.finfo(dtype).tiny  # below the smallest normal number, u may underflow
        torch.testing.assert_close(a.double(), exact, rtol=TOLERANCE[dtype], atol=atol)
        torch.testing.assert_close(b.double(), exact, rtol=TOLERANCE[dtype], atol=atol)
        assert torch.equal(a, b)  # elementwise, the chunked path is the oracle's arithmetic


def test_fisher_precondition_in_float16_does_not_overflow_the_square():
    """g² overflows float16 beyond |g| = 256; f is built in float32 on every path."""
    for foreach in (True, False):
        grads = [torch.full((LARGE,), 1000.0).half(), torch.full((3,), 1000.0).half()]
        quadratic = kernels.fisher_precondition_(grads, 1.0, foreach=foreach)
        assert quadratic == pytest.approx((LARGE + 3) * 1e6 / (1 + 1e6), rel=1e-3)
        for g in grads:
            assert torch.allclose(g.float(), torch.full_like(g.float(), 1e-3), rtol=1e-3)


def resnet20_like(dtype, seed=0, scale=1.0):
    """Gradients shaped like ResNet-20's 65 parameters (0.27 M entries, the largest 36 864):
    every one below FUSED_MIN_NUMEL, so all take the small tensors' batched foreach path."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in ResNet20((3, 32, 32), num_classes=10).parameters()]
    grads = [
        (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        for shape in shapes
    ]
    assert max(g.numel() for g in grads) < kernels.FUSED_MIN_NUMEL
    return grads


def fisher_reference_(grads, eta):
    """§4.2 tensor by tensor, in list order: f = 1 + η·g⊙g, u = g/f, g ← u, and Σ g·u summed
    per tensor, then over the tensors in float64. Half precision is widened to float32 first.
    f is computed by ``addcmul``, one rounding for η·g·g + 1 as the kernel does (``1 + eta *
    g * g`` in three operations rounds differently in the last bit)."""
    total = 0.0
    for g in grads:
        wide = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        f = torch.addcmul(torch.ones_like(wide), wide, wide, value=eta)
        u = wide / f
        total += float((wide * u).sum())
        g.copy_(u)
    return total


def random_small_tensors(dtype, seed):
    """Many small tensors of random shapes, some transposed (non-contiguous), a few empty."""
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(200):
        dims = torch.randint(0, 4, (), generator=generator).item()
        shape = [int(torch.randint(0, 40, (), generator=generator)) for _ in range(dims)]
        g = (torch.randn(shape, generator=generator, dtype=torch.float64) * 10.0).to(dtype)
        grads.append(g.t() if g.dim() == 2 and len(grads) % 3 == 0 else g)
    return grads


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.37])
@pytest.mark.parametrize("shapes", ["resnet20", "random"])
def test_fisher_precondition_in_batches_is_the_per_tensor_formula_bit_for_bit(dtype, eta, shapes):
    """The small tensors go through foreach in bounded batches (several here): every entry of
    u and the sum are bit for bit the per-tensor formula's, as they were with one foreach
    list over all the tensors."""
    grads = (
        resnet20_like(dtype, scale=3.0)
        if shapes == "resnet20"
        else random_small_tensors(dtype, seed=4)
    )
    expected = [g.clone(memory_format=torch.preserve_format) for g in grads]
    expected_total = fisher_reference_(expected, eta)
    total = kernels.fisher_precondition_(grads, eta, foreach=True)
    assert total == expected_total
    for g, e in zip(grads, expected, strict=True):
        assert g.dtype == e.dtype and g.stride() == e.stride()
        assert torch.equal(g, e)


@pytest.mark.parametrize(
    ("dtype", "lists"),
    [(torch.float32, 2), (torch.float64, 2), (torch.float16, 3), (torch.bfloat16, 3)],
)
def test_fisher_precondition_temporaries_stay_a_fraction_of_a_copy_on_small_tensors(dtype, lists):
    """Peak memory the kernel allocates (every ATen allocation, tracked exactly by the
    benchmarks' tracker), in copies of the gradients: with one foreach list over every small
    tensor it held three float32 copies (f, u and the products; 3 P on ResNet-20, the whole
    model, and 8 P in half precision); in batches it holds two lists of one batch's size
    (three with half precision's widened copy), a batch being at most 1/8 of the elements or
    one tensor."""
    grads = resnet20_like(dtype)
    size = sum(g.numel() * g.element_size() for g in grads)
    wide_bytes = 8 if dtype == torch.float64 else 4
    largest_batch = max(sum(g.numel() for g in grads) / 8, max(g.numel() for g in grads))
    tracker = AllocationTracker()
    with tracker:
        kernels.fisher_precondition_(grads, 1.0, foreach=True)
    held = tracker.peak_held / size
    assert held <= lists * largest_batch * wide_bytes / size + 0.001
    assert held < 0.9  # well under the one copy the engine's backup takes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_friendly_direction_fast_path_equals_the_oracle(dtype):
    grads_fast, grads_oracle = tensors(dtype, seed=2), tensors(dtype, seed=2)
    emas_fast, emas_oracle = tensors(dtype, seed=3), tensors(dtype, seed=3)
    raw, previous = tensors(dtype, seed=2), tensors(dtype, seed=3)
    kernels.friendly_direction_(grads_fast, emas_fast, 0.7, 0.6, foreach=True)
    kernels.friendly_direction_(grads_oracle, emas_oracle, 0.7, 0.6, foreach=False)
    for d, m, d_o, m_o, g, m_old in zip(
        grads_fast, emas_fast, grads_oracle, emas_oracle, raw, previous, strict=True
    ):
        torch.testing.assert_close(d, g - 0.7 * m_old, rtol=TOLERANCE[dtype], atol=1e-6)
        torch.testing.assert_close(m, 0.6 * m_old + 0.4 * g, rtol=TOLERANCE[dtype], atol=1e-6)
        torch.testing.assert_close(d, d_o, rtol=TOLERANCE[dtype], atol=1e-6)
        torch.testing.assert_close(m, m_o, rtol=TOLERANCE[dtype], atol=1e-6)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 1000, LARGE])
def test_a_packed_mask_unpacks_to_itself_in_one_bit_per_coordinate(numel):
    generator = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=generator) < 0.5
    packed = kernels.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(kernels.unpack_mask(packed, numel), mask)
    for start in range(0, numel, 8 * 37):  # any run of coordinates from a byte boundary
        stop = min(numel, start + 101)
        assert torch.equal(kernels.unpack_mask(packed, stop - start, start=start), mask[start:stop])
    # bit i mod 8 of byte i // 8, the lowest first
    assert kernels.pack_mask(torch.tensor([True] + [False] * 7 + [False, True])).tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_a_packed_mask_multiplies_bit_for_bit_as_the_bool_mask(dtype, foreach):
    """The same multiplication by a bool tensor as mul_ (NaN·0 stays NaN, −x·0 is −0), on the
    chunked path (a large tensor), a non-contiguous tensor and small ones."""
    targets = tensors(dtype, seed=3)
    targets[2][0, 0] = float("nan")
    generator = torch.Generator().manual_seed(4)
    masks = [torch.rand(t.shape, generator=generator) < 0.3 for t in targets]
    expected = clone(targets)
    kernels.mul_(expected, masks, foreach=False)
    got = clone(targets)
    kernels.apply_packed_mask_(got, [kernels.pack_mask(m) for m in masks], foreach=foreach)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(g), torch.signbit(e))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_add_scaled_is_add_with_alpha_for_a_float_and_close_for_a_tensor(dtype):
    targets, sources = tensors(dtype, seed=5), tensors(dtype, seed=6)
    expected = clone(targets)
    kernels.add_(expected, sources, alpha=-0.37, foreach=True)
    for foreach in (True, False):
        got = clone(targets)
        kernels.add_scaled_(got, sources, -0.37, foreach=foreach)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    got = clone(targets)
    kernels.add_scaled_(got, sources, torch.tensor(-0.37, dtype=torch.float64), foreach=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
