"""``kernels.dot``: both paths agree bit for bit and match a float64 reference, also for mixed
dtypes, half precision and non-contiguous tensors."""

from __future__ import annotations

import pytest
import torch

from flatminima import kernels


def pairs(dtypes, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    a, b = [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        a.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
        b.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
    return a, b


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float64,),
        (torch.float32,),
        (torch.float16,),
        (torch.bfloat16,),
        (torch.float32, torch.float64),
    ],
    ids=["float64", "float32", "float16", "bfloat16", "mixed"],
)
def test_dot_paths_agree_and_match_a_float64_reference(dtypes):
    a, b = pairs(dtypes)
    fast = kernels.dot(a, b, foreach=True)
    loop = kernels.dot(a, b, foreach=False)
    assert fast.dtype == torch.float64 and fast.shape == ()
    assert torch.equal(fast, loop)
    reference = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
    tolerance = 1e-14 if dtypes == (torch.float64,) else 1e-5
    assert float(fast) == pytest.approx(reference, rel=tolerance, abs=tolerance)


def test_dot_of_non_contiguous_tensors_and_empty_lists():
    matrix = torch.randn(4, 6, dtype=torch.float64)
    other = torch.randn(6, 4, dtype=torch.float64)
    value = kernels.dot([matrix.T], [other], foreach=True)
    assert float(value) == pytest.approx(float((matrix.T * other).sum()), rel=1e-14)
    assert float(kernels.dot([], [], foreach=True)) == 0.0
    with pytest.raises(ValueError, match="same length"):
        kernels.dot([matrix], [], foreach=True)
