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
def test_fisher_quadratic_fast_path_equals_the_oracle(dtype, eta):
    grads = tensors(dtype, scale=10.0)
    fast = kernels.fisher_quadratic(grads, eta, foreach=True)
    oracle = kernels.fisher_quadratic(grads, eta, foreach=False)
    assert fast == pytest.approx(oracle, rel=TOLERANCE[dtype])
    exact = sum(float((g.double() ** 2 / (1 + eta * g.double() ** 2)).sum()) for g in grads)
    assert oracle == pytest.approx(exact, rel=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(("eta", "scale"), [(1.0, 0.3), (0.0, 2.0), (1e4, 1e-3), (1.0, 0.0)])
def test_fisher_scale_fast_path_equals_the_oracle(dtype, eta, scale):
    fast, oracle = tensors(dtype, seed=1, scale=10.0), tensors(dtype, seed=1, scale=10.0)
    kernels.fisher_scale_(fast, eta, scale, foreach=True)
    kernels.fisher_scale_(oracle, eta, scale, foreach=False)
    for a, b, original in zip(fast, oracle, tensors(dtype, seed=1, scale=10.0), strict=True):
        assert a.dtype == dtype and a.shape == original.shape
        wide = original.double()
        exact = scale * wide / (1 + eta * wide**2)
        # Below the dtype's smallest normal number, ε legitimately underflows.
        atol = torch.finfo(dtype).tiny
        torch.testing.assert_close(a.double(), exact, rtol=TOLERANCE[dtype], atol=atol)
        torch.testing.assert_close(b.double(), exact, rtol=TOLERANCE[dtype], atol=atol)


def test_fisher_scale_in_float16_does_not_overflow_the_square():
    """g² overflows float16 beyond |g| = 256; f is built in float32 on every path."""
    for foreach in (True, False):
        grads = [torch.full((LARGE,), 1000.0, dtype=torch.float16), torch.full((3,), 1000.0).half()]
        kernels.fisher_scale_(grads, 1.0, 1.0, foreach=foreach)
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
