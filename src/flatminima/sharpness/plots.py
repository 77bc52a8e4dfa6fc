"""PNG plots of landscapes and spectra: one function per picture, each writing one file.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``), never
``pyplot``: no display is needed, no global figure state is touched, and nothing leaks
between calls. matplotlib is imported on first use, so importing
:mod:`flatminima.sharpness` does not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from flatminima.sharpness.hessian import SpectralDensity
from flatminima.sharpness.landscape import Landscape1D, Landscape2D
from flatminima.validation import positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_landscape_1d", "plot_spectral_density", "plot_surface_2d"]

PathLike = str | os.PathLike[str]


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(5.0, 3.8), dpi=120, layout="constrained")


def _save(figure: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # savefig picks the Agg canvas from the .png extension: no backend is selected globally.
    figure.savefig(path, format="png")
    return path


def plot_landscape_1d(
    landscapes: Landscape1D | Mapping[str, Landscape1D],
    path: PathLike,
    *,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Writes a PNG line plot of one or several 1-D loss slices.

    loss(α) against α, one line per slice (a mapping gives each a legend label, e.g. one
    per optimizer, to compare flatness side by side).

    Args:
        landscapes: a :class:`Landscape1D`, or labels mapped to several of them.
        path: the PNG file to write (parent folders are created).
        title: the figure title.
        log_scale: a logarithmic loss axis (for slices spanning decades).

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> line = Landscape1D(torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5) ** 2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_landscape_1d(line, f"{tmp}/line.png").stat().st_size > 1000
        True
    """
    items = {"": landscapes} if isinstance(landscapes, Landscape1D) else dict(landscapes)
    if not items:
        raise ValueError("landscapes must hold at least one Landscape1D, got an empty mapping")
    figure = _figure()
    axes = figure.add_subplot()
    for label, line in items.items():
        axes.plot(line.alphas.numpy(), line.losses.numpy(), marker=".", label=label or None)
    axes.set_xlabel(next(iter(items.values())).axis_label)
    axes.set_ylabel("loss")
    if log_scale:
        axes.set_yscale("log")
    if len(items) > 1:
        axes.legend()
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_surface_2d(
    surface: Landscape2D,
    path: PathLike,
    *,
    levels: int = 20,
    title: str | None = None,
) -> Path:
    """Writes a PNG contour plot of a 2-D loss surface.

    Filled contours of L(w + α·d₁ + β·d₂) over (α, β), the origin (the weights) marked.

    Args:
        surface: a :class:`Landscape2D`.
        path: the PNG file to write (parent folders are created).
        levels: number of contour levels, ≥ 1.
        title: the figure title.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> a = torch.linspace(-1, 1, 9)
        >>> surface = Landscape2D(a, a, a[None, :] ** 2 + 2 * a[:, None] ** 2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_surface_2d(surface, f"{tmp}/surface.png").stat().st_size > 1000
        True
    """
    positive_int("levels", levels)
    if surface.losses.numel() < 4 or min(surface.losses.shape) < 2:
        shape = tuple(surface.losses.shape)
        raise ValueError(f"surface must be at least a 2×2 grid to draw contours, got {shape}")
    figure = _figure()
    axes = figure.add_subplot()
    filled = axes.contourf(
        surface.alphas.numpy(), surface.betas.numpy(), surface.losses.numpy(), levels=levels
    )
    axes.contour(
        surface.alphas.numpy(),
        surface.betas.numpy(),
        surface.losses.numpy(),
        levels=filled.levels,
        colors="black",
        linewidths=0.4,
    )
    figure.colorbar(filled, ax=axes, label="loss")
    axes.plot([0.0], [0.0], marker="x", color="white")
    axes.set_xlabel("α (direction 1)")
    axes.set_ylabel("β (direction 2)")
    if title:
        axes.set_title(title)
    return _save(figure, path)


def plot_spectral_density(
    density: SpectralDensity,
    path: PathLike,
    *,
    sigma: float | None = None,
    num_points: int = 1000,
    title: str | None = None,
) -> Path:
    """Writes a PNG plot of a Hessian eigenvalue density, on a logarithmic density axis.

    φ_σ(t) = Σ_i weights_i · N(t; nodes_i, σ²), the stochastic Lanczos quadrature estimate
    smoothed by a Gaussian of width σ. The log axis shows both the bulk near zero and the few
    outliers that set λ_max.

    Args:
        density: a :class:`SpectralDensity` from :func:`flatminima.sharpness.spectral_density`.
        path: the PNG file to write (parent folders are created).
        sigma: the smoothing width, > 0; default :meth:`SpectralDensity.default_sigma`.
        num_points: evaluation points, ≥ 2.
        title: the figure title.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> nodes, weights = torch.tensor([0.0, 1.0, 5.0]), torch.tensor([0.8, 0.15, 0.05])
        >>> density = SpectralDensity(nodes.double(), weights.double(), dim=3)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_spectral_density(density, f"{tmp}/density.png").stat().st_size > 1000
        True
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    grid = density.grid(num_points, sigma=sigma)
    values = density.evaluate(grid, sigma=sigma)
    figure = _figure()
    axes = figure.add_subplot()
    # Six decades below the peak show every outlier; the Gaussian tails between nodes would
    # otherwise stretch the axis down to underflow.
    floor = max(float(values.max()) * 1e-6, 1e-300)
    axes.semilogy(grid.numpy(), values.clamp_min(floor).numpy())
    axes.set_ylim(bottom=floor)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    return _save(figure, path)
