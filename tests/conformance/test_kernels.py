"""The list kernels: the fast path (foreach, and cache-sized chunks on large tensors) computes
what the per-tensor oracle computes."""

from __future__ import annotations

import pytest
import torch

from flatminima import kernels

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
