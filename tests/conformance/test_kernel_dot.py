"""kernels.dot: its foreach path and its per-tensor loop agree, and both are accurate."""

from __future__ import annotations

import pytest
import torch

from flatminima import kernels


def pairs(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 2, 4), (1,), (64, 33)]
    first = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    second = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    return first, second


def exact(first, second) -> float:
    return sum(float((a.double() * b.double()).sum()) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float64, 1e-14), (torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)],
)
def test_dot_paths_agree_with_each_other_and_with_the_float64_sum(dtype, tolerance):
    first, second = pairs(dtype)
    results = [kernels.dot(first, second, foreach=foreach) for foreach in (True, False)]
    for result in results:
        assert result.dtype == torch.float64 and result.dim() == 0
        # Half precision is widened to float32 per tensor: the inputs' rounding is the only error.
        assert float(result) == pytest.approx(exact(first, second), rel=tolerance)
    assert float(results[0]) == pytest.approx(
        float(results[1]), rel=1e-15 if dtype == torch.float64 else 1e-7
    )


def test_dot_of_mixed_dtypes_groups_them_and_does_not_overflow_in_half_precision():
    first, second = pairs(torch.float64)
    first[1], second[1] = (first[1] * 300).half(), (second[1] * 300).half()  # products > 65504
    first[2], second[2] = first[2].float(), second[2].float()
    for foreach in (True, False):
        result = float(kernels.dot(first, second, foreach=foreach))
        assert result == pytest.approx(exact(first, second), rel=1e-6)


def test_dot_of_a_vector_with_itself_is_its_squared_norm():
    first, _ = pairs(torch.float64)
    for foreach in (True, False):
        squared = kernels.squared_norm(first, foreach=foreach)
        assert float(kernels.dot(first, first, foreach=foreach)) == pytest.approx(
            float(squared), rel=1e-14
        )


def test_dot_of_empty_lists_is_zero_and_mismatches_are_refused():
    assert float(kernels.dot([], [], foreach=True)) == 0.0
    with pytest.raises(ValueError, match="equal length"):
        kernels.dot([torch.ones(2)], [], foreach=True)
    with pytest.raises(ValueError, match="equal shape"):
        kernels.dot([torch.ones(2)], [torch.ones(3)], foreach=False)


def test_dot_of_non_contiguous_tensors():
    matrix = torch.randn(4, 6, dtype=torch.float64)
    other = torch.randn(6, 4, dtype=torch.float64)
    for foreach in (True, False):
        value = kernels.dot([matrix.T], [other], foreach=foreach)
        assert float(value) == pytest.approx(float((matrix.T * other).sum()), rel=1e-14)
