"""Filter-normalised directions and 1-D / 2-D loss slices."""

from __future__ import annotations

import copy

import pytest
import torch
from sharpness_support import (
    QUADRATIC_BATCHES,
    Quadratic,
    classification_batches,
    cross_entropy,
    mlp,
    quadratic_loss,
    symmetric_with_spectrum,
)
from torch import nn

from flatminima.sharpness import (
    filter_normalized_direction,
    interpolate_1d,
    landscape_1d,
    surface_2d,
)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv2d = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 3, 2, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv2d(x)))  # (n, 4, 3, 3)
        h = torch.relu(self.conv1d(h.flatten(2)))  # (n, 3, 8)
        return self.head(h.mean(-1))


def eval_loss(model: nn.Module, batches) -> float:
    """The mean batch loss of an eval-mode copy, computed independently of the library."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return sum(float(cross_entropy(reference, b)) for b in batches) / len(batches)


def test_each_filter_has_the_norm_of_the_weights_filter() -> None:
    model = ConvNet()
    direction = filter_normalized_direction(model, seed=3)
    checked = 0
    for (name, p), d in zip(model.named_parameters(), direction, strict=True):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() < 2:
            assert torch.equal(d, torch.zeros_like(p)), f"{name} should be zero by default"
            continue
        # Linear rows, Conv1d/Conv2d output channels: the slices along dimension 0.
        torch.testing.assert_close(
            d.reshape(len(d), -1).norm(dim=1), p.detach().reshape(len(p), -1).norm(dim=1)
        )
        assert not torch.allclose(d, p)  # a random direction, not the weights themselves
        checked += 1
    assert checked == 3


def test_include_1d_gives_biases_and_norms_the_weights_magnitude() -> None:
    model = ConvNet()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.5, -2.0]))
    direction = filter_normalized_direction(model, seed=3, include_1d=True)
    for p, d in zip(model.parameters(), direction, strict=True):
        if p.dim() < 2:
            torch.testing.assert_close(d.abs(), p.detach().abs())
    signs = torch.cat(
        [d.sign() for p, d in zip(model.parameters(), direction, strict=True) if p.dim() < 2]
    )
    assert (signs > 0).any() and (signs < 0).any()  # random signs, not a copy of w


def test_directions_are_seeded() -> None:
    model = ConvNet()
    first = filter_normalized_direction(model, seed=1)
    again = filter_normalized_direction(model, seed=1)
    other = filter_normalized_direction(model, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_zero_filters_stay_zero() -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[1].zero_()
    (d, _) = filter_normalized_direction(model)
    assert torch.equal(d[1], torch.zeros(3)) and d[0].norm() > 0


def test_value_at_the_origin_is_the_loss() -> None:
    model = mlp(batchnorm=True).train()
    batches = classification_batches()
    with torch.no_grad():  # non-trivial running statistics: eval and train losses differ
        model[1].running_mean.uniform_(-1.0, 1.0)
    line = landscape_1d(model, cross_entropy, batches, alphas=[-0.5, 0.0, 0.5])
    assert line.losses[1].item() == eval_loss(model, batches)
    surface = surface_2d(model, cross_entropy, batches, alphas=[-1.0, 0.0], betas=[0.0, 1.0, 2.0])
    assert surface.losses.shape == (3, 2)
    assert surface.losses[0, 1].item() == eval_loss(model, batches)
    assert len(set(surface.losses.flatten().tolist())) == 6  # the plane really moves


def test_1d_slice_along_a_given_direction_on_a_quadratic() -> None:
    matrix = symmetric_with_spectrum([3.0, 1.0, -0.5, 0.2], seed=1)
    start = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64)
    model = Quadratic(matrix, start=start)
    d = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    alphas = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    line = landscape_1d(model, quadratic_loss, QUADRATIC_BATCHES, direction=[d], alphas=alphas)
    expected = torch.stack([0.5 * (start + a * d) @ matrix @ (start + a * d) for a in alphas])
    torch.testing.assert_close(line.losses, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(line.alphas, alphas)


def test_2d_surface_on_a_quadratic() -> None:
    matrix = symmetric_with_spectrum([3.0, 1.0, 0.5], seed=2)
    model = Quadratic(matrix)
    d1 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    d2 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    alphas, betas = [-1.0, 0.0, 0.5, 1.0], [-0.5, 0.0, 2.0]
    surface = surface_2d(
        model,
        quadratic_loss,
        QUADRATIC_BATCHES,
        directions=([d1], [d2]),
        alphas=alphas,
        betas=betas,
    )
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            e = a * d1 + b * d2
            assert surface.losses[i, j].item() == pytest.approx(
                float(0.5 * e @ matrix @ e), abs=1e-13
            )


def test_surface_first_direction_is_the_seeded_filter_normalized_one() -> None:
    model, batches = mlp(), classification_batches(1)
    alphas = [-1.0, -0.25, 0.5]
    surface = surface_2d(model, cross_entropy, batches, alphas=alphas, betas=[0.0, 0.3], seed=4)
    line = landscape_1d(model, cross_entropy, batches, alphas=alphas, seed=4)
    torch.testing.assert_close(surface.losses[0], line.losses, rtol=0, atol=0)
    explicit = landscape_1d(
        model,
        cross_entropy,
        batches,
        alphas=alphas,
        direction=filter_normalized_direction(model, seed=4),
    )
    torch.testing.assert_close(explicit.losses, line.losses, rtol=0, atol=0)


def test_interpolation_end_points_are_the_two_models_including_batchnorm_statistics() -> None:
    batches = classification_batches()
    source, target = mlp(seed=0, batchnorm=True), mlp(seed=1, batchnorm=True)
    with torch.no_grad():
        target[1].running_mean.uniform_(-1.0, 1.0)
        target[1].running_var.uniform_(0.5, 2.0)
    line = interpolate_1d(source, cross_entropy, batches, target, alphas=[0.0, 0.5, 1.0])
    assert line.losses[0].item() == eval_loss(source, batches)
    assert line.losses[2].item() == pytest.approx(eval_loss(target, batches), rel=1e-14)
    by_state = interpolate_1d(
        source, cross_entropy, batches, target.state_dict(), alphas=[0.0, 0.5, 1.0]
    )
    torch.testing.assert_close(by_state.losses, line.losses, rtol=0, atol=0)
    # The midpoint is the network with every float entry averaged.
    middle = copy.deepcopy(source)
    with torch.no_grad():
        for (_, a), (_, b) in zip(
            middle.state_dict().items(), target.state_dict().items(), strict=True
        ):
            if a.is_floating_point():
                a.copy_(0.5 * a + 0.5 * b)
    assert line.losses[1].item() == pytest.approx(eval_loss(middle, batches), rel=1e-12)


def test_interpolation_default_grid_spans_beyond_the_end_points() -> None:
    model = Quadratic(torch.eye(2, dtype=torch.float64))
    target = Quadratic(torch.eye(2, dtype=torch.float64), start=torch.ones(2, dtype=torch.float64))
    line = interpolate_1d(model, quadratic_loss, QUADRATIC_BATCHES, target)
    assert line.alphas[0] == -0.5 and line.alphas[-1] == 1.5 and len(line.alphas) == 21
    torch.testing.assert_close(line.losses, line.alphas**2)  # ½‖α·1‖² = α²


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: landscape_1d(m, cross_entropy, b, alphas=[]), "alphas"),
        (lambda m, b: landscape_1d(m, cross_entropy, b, alphas=[[0.0]]), "alphas"),
        (lambda m, b: landscape_1d(m, cross_entropy, b, alphas=[float("nan")]), "alphas"),
        (lambda m, b: landscape_1d(m, cross_entropy, b, direction=[torch.zeros(2)]), "direction"),
        (lambda m, b: surface_2d(m, cross_entropy, b, betas=[]), "betas"),
        (lambda m, b: surface_2d(m, cross_entropy, b, directions=([],)), "pair"),
        (lambda m, b: interpolate_1d(m, cross_entropy, b, nn.Linear(2, 2)), "target"),
        (lambda m, b: landscape_1d(m, cross_entropy, []), "batches"),
    ],
)
def test_bad_arguments_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(mlp(), classification_batches(1))
