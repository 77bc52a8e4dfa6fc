"""The plot helpers write valid, non-trivial PNG files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sharpness_support import classification_batches, cross_entropy, mlp

from flatminima.sharpness import (
    Landscape1D,
    Landscape2D,
    landscape_1d,
    plot_landscape_1d,
    plot_spectral_density,
    plot_surface_2d,
    spectral_density,
    surface_2d,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes"


def test_plots_of_real_measurements(tmp_path: Path) -> None:
    model, batches = mlp(), classification_batches(1)
    line = landscape_1d(model, cross_entropy, batches, alphas=torch.linspace(-1, 1, 7))
    surface = surface_2d(
        model,
        cross_entropy,
        batches,
        alphas=torch.linspace(-1, 1, 5),
        betas=torch.linspace(-1, 1, 4),
    )
    density = spectral_density(model, cross_entropy, batches, num_iter=10)
    written = [
        plot_landscape_1d(line, tmp_path / "nested" / "line.png", title="slice"),
        plot_landscape_1d({"sgd": line, "sam": line}, tmp_path / "two.png", log_scale=True),
        plot_surface_2d(surface, tmp_path / "surface.png", levels=10, title="surface"),
        plot_spectral_density(density, str(tmp_path / "density.png"), title="spectrum"),
    ]
    for path in written:
        assert isinstance(path, Path) and path.exists()
        assert_png(path)


def test_plot_arguments_are_checked(tmp_path: Path) -> None:
    line = Landscape1D(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="landscapes"):
        plot_landscape_1d({}, tmp_path / "x.png")
    thin = Landscape2D(torch.zeros(3), torch.zeros(1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2×2"):
        plot_surface_2d(thin, tmp_path / "x.png")
    square = Landscape2D(torch.arange(2.0), torch.arange(2.0), torch.eye(2))
    with pytest.raises(ValueError, match="levels"):
        plot_surface_2d(square, tmp_path / "x.png", levels=0)
    density = spectral_density(mlp(), cross_entropy, classification_batches(1), num_iter=3)
    with pytest.raises(ValueError, match="num_points"):
        plot_spectral_density(density, tmp_path / "x.png", num_points=1)
    with pytest.raises(ValueError, match="sigma"):
        plot_spectral_density(density, tmp_path / "x.png", sigma=-1.0)
    assert not (tmp_path / "x.png").exists()
    assert line.axis_label == "α"
