"""Measure flatness: Hessian spectra, m-sharpness and loss landscapes of any PyTorch model.

Every measurement takes the same three things:

* ``model``: an ``nn.Module``; the coordinates w are its parameters with
  ``requires_grad=True``;
* ``loss_fn(model, batch)``: returns a scalar loss tensor for one batch;
* ``batches``: an iterable of batches (a list, a ``DataLoader``...). The loss measured is the
  unweighted mean (1/B) Σ_b loss_fn(model, batch_b). A list is iterated as many times as a
  method needs; any other iterable is read into a list once, so a shuffling loader cannot
  change the loss between two iterations. A single batch is passed as ``[batch]`` (a tuple
  ``(x, y)`` would be read as two batches).

and follows the same rules:

* **eval mode by default.** BatchNorm normalises with its running statistics and dropout is
  off, so the measured loss is the function the model computes at test time and every
  evaluation is deterministic. ``train_mode=True`` measures the train-mode loss instead
  (BatchNorm with per-batch statistics; avoid it with dropout, which makes the loss random).
* **the model is left exactly as found**: parameters, buffers (BatchNorm running
  statistics) and every module's mode are restored by copy, bit for bit, when the
  measurement returns *or raises*; ``.grad`` is never written (gradients are taken with
  ``torch.autograd.grad``).
* **random draws are seeded** (``seed=``) from a CPU generator: same seed, same result, on
  any device.

Start with :func:`measure_sharpness`, which returns every scalar at a small budget.
"""

from flatminima.sharpness.hessian import (
    HessianEigenpairs,
    SpectralDensity,
    TraceEstimate,
    hessian_eigenpairs,
    hessian_eigenvalues,
    hessian_trace,
    hessian_trace_estimate,
    hessian_vector_product,
    spectral_density,
)
from flatminima.sharpness.landscape import (
    Landscape1D,
    Landscape2D,
    filter_normalized_direction,
    interpolate_1d,
    landscape_1d,
    surface_2d,
)
from flatminima.sharpness.measure import measure_sharpness
from flatminima.sharpness.msharpness import average_sharpness, split_batch, worst_case_sharpness
from flatminima.sharpness.plots import plot_landscape_1d, plot_spectral_density, plot_surface_2d

__all__ = [
    "HessianEigenpairs",
    "Landscape1D",
    "Landscape2D",
    "SpectralDensity",
    "TraceEstimate",
    "average_sharpness",
    "filter_normalized_direction",
    "hessian_eigenpairs",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "hessian_vector_product",
    "interpolate_1d",
    "landscape_1d",
    "measure_sharpness",
    "plot_landscape_1d",
    "plot_spectral_density",
    "plot_surface_2d",
    "spectral_density",
    "split_batch",
    "surface_2d",
    "worst_case_sharpness",
]
