"""The loss Hessian without forming it: products, top eigenpairs, trace and spectral density.

Everything here rests on one primitive, the Hessian-vector product by double backward
(Pearlmutter, 1994): for the gradient g(w) = ∇L(w), Hv = ∇_w (g(w)ᵀv), which costs about two
backward passes and never stores the d×d matrix. On top of it:

* :func:`hessian_eigenpairs` / :func:`hessian_eigenvalues`: the top-k eigenpairs by Lanczos
  with full reorthogonalisation in float64 (default), or by power iteration with deflation;
* :func:`hessian_trace_estimate` / :func:`hessian_trace`: Hutchinson's estimator;
* :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad, 2017), the
  method PyHessian uses (Yao et al., 2020; Ghorbani, Krishnan & Xiao, 2019).

Conventions shared by every function (see also :mod:`flatminima.sharpness`):

* the loss is L(w) = (1/B) Σ_b loss_fn(model, batch_b), the unweighted mean over the batches,
  so H = (1/B) Σ_b ∇²loss_fn(model, batch_b);
* w is every parameter with ``requires_grad=True``, in ``model.parameters()`` order;
* the model is evaluated in **eval mode** by default: BatchNorm normalises with its running
  statistics, so H is the Hessian of the function the model computes at test time, and
  dropout is off (a train-mode forward with dropout would make every product random and the
  iterative methods meaningless). ``train_mode=True`` measures the train-mode loss instead
  (BatchNorm with batch statistics); the running statistics it updates are restored;
* weights, buffers, ``.grad`` and modes are left exactly as found, also on an exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flatminima.sharpness._common import (
    LossFn,
    as_batch_list,
    basis_device,
    flatten,
    gradients,
    make_generator,
    measuring,
    scalar_loss,
    trainable_parameters,
    unflatten,
)
from flatminima.validation import non_negative, positive_int

__all__ = [
    "HessianEigenpairs",
    "SpectralDensity",
    "TraceEstimate",
    "hessian_eigenpairs",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "hessian_vector_product",
    "spectral_density",
]

logger = logging.getLogger(__name__)

Matvec = Callable[[Tensor], Tensor]

# A Lanczos coefficient β below this fraction of the largest coefficient seen means the Krylov
# space is invariant (exact arithmetic would give β = 0). Float64 roundoff after full
# reorthogonalisation is ~1e-16 of the scale; a float32 operator never gets near 1e-10.
_BREAKDOWN = 1e-10


class _Hessian:
    """H = (1/B) Σ_b ∇²loss_b as an operator on flat float64 vectors.

    The products themselves run in the parameters' dtype (that is what the model computes);
    only the vectors handed to the eigensolvers are float64.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], params: list[nn.Parameter]
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = params
        self.dim = sum(p.numel() for p in params)
        self.device = basis_device(params)
        self.products = 0

    def batch_gradient(self, batch: Any) -> tuple[Tensor, ...]:
        """∇loss_b with its graph kept, ready to be differentiated again."""
        return gradients(
            scalar_loss(self.loss_fn, self.model, batch), self.params, create_graph=True
        )

    def product(self, grads: Sequence[Tensor], vector: Sequence[Tensor], *, retain: bool) -> Tensor:
        """∇(gᵀv) = H_b v for one batch's gradient graph, flat in float64.

        A gradient entry without a graph (the loss is linear in that parameter) contributes
        nothing to Hv, and autograd refuses it as an output, so it is left out.
        """
        pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        outputs, grad_outputs = zip(*pairs, strict=True)
        hv = torch.autograd.grad(
            outputs,
            self.params,
            grad_outputs=grad_outputs,
            retain_graph=retain,
            allow_unused=True,
            materialize_grads=True,
        )
        return flatten(hv, dtype=torch.float64, device=self.device)

    def __call__(self, v: Tensor) -> Tensor:
        """Hv for a flat float64 v: one forward and two backward passes per batch."""
        vector = unflatten(v, self.params)
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for batch in self.batches:
            total += self.product(self.batch_gradient(batch), vector, retain=False)
        self.products += 1
        return total / len(self.batches)


def _prepare(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any]) -> _Hessian:
    return _Hessian(model, loss_fn, as_batch_list(batches), trainable_parameters(model))


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    vector: Sequence[Tensor],
    *,
    train_mode: bool = False,
) -> list[Tensor]:
    """The Hessian of the mean batch loss times ``vector``, by double backward.

    Hv = (1/B) Σ_b ∇_w (∇_w loss_b(w)ᵀ v)   (Pearlmutter, 1994)

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches; the loss is the unweighted mean over them.
        vector: one tensor per trainable parameter, shaped like it.
        train_mode: measure the train-mode loss instead of the eval-mode one (module docstring).

    Returns:
        Hv as one tensor per trainable parameter, shaped, typed and placed like it.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> hessian_vector_product(model, loss_fn, [x], [torch.ones(1, 2)])[0]  # H = XᵀX/2
        tensor([[0.5000, 2.0000]])
    """
    operator = _prepare(model, loss_fn, batches)
    vector = list(vector)
    if len(vector) != len(operator.params) or any(
        v.shape != p.shape for v, p in zip(vector, operator.params, strict=False)
    ):
        raise ValueError(
            "vector must hold one tensor per trainable parameter, shaped like it: expected "
            f"{[tuple(p.shape) for p in operator.params]}, got {[tuple(v.shape) for v in vector]}"
        )
    with measuring(model, train_mode=train_mode):
        result = operator(flatten(vector, dtype=torch.float64, device=operator.device))
    return unflatten(result, operator.params)


# --------------------------------------------------------------------------------------------
# Lanczos and power iteration on a symmetric operator given by its products with flat vectors.


def _orthogonalize_(w: Tensor, basis: Tensor) -> None:
    """w ← (I − QᵀQ) w, twice: one pass loses orthogonality when w is nearly in span(Q)
    ("twice is enough", Kahan–Parlett), and losing it makes Lanczos report ghost copies of
    converged eigenvalues."""
    if basis.shape[0] == 0:
        return
    for _ in range(2):
        w -= basis.T @ (basis @ w)


def _random_unit(dim: int, generator: torch.Generator, device: torch.device) -> Tensor:
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    return v / torch.linalg.vector_norm(v)


def _rademacher(dim: int, generator: torch.Generator, device: torch.device) -> Tensor:
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    diagonal = torch.tensor(alphas, dtype=torch.float64)
    off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
    return torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)


@dataclass
class _LanczosRun:
    """Q (rows: the orthonormal basis), T's coefficients, and the last β (T's residual)."""

    basis: Tensor
    alphas: list[float]
    betas: list[float]
    residual_beta: float

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), T's eigenvectors, and the residual norms ‖Av − θv‖.

        For a Ritz pair (θ, Qᵀs) the residual is exactly |β_last|·|s_last| (Paige): no
        extra product is needed to know how converged each pair is.
        """
        values, vectors = torch.linalg.eigh(_tridiagonal(self.alphas, self.betas))
        residuals = abs(self.residual_beta) * vectors[-1].abs()
        return values, vectors, residuals


def _lanczos(
    matvec: Matvec,
    start: Tensor,
    max_iter: int,
    *,
    restart: torch.Generator | None,
    done: Callable[[_LanczosRun], bool] | None = None,
) -> _LanczosRun:
    """Lanczos with full reorthogonalisation; at most ``max_iter`` products.

    On breakdown (an invariant Krylov space: β ≈ 0) it either stops (``restart=None``: the
    quadrature of the start vector is then exact) or continues from a fresh random vector
    orthogonal to the basis, with coupling 0, so that eigenvalues the start vector's Krylov
    space cannot see (further copies of a repeated eigenvalue) are found too. It stops early
    when ``done`` says so, and always once the basis spans the whole space.
    """
    dim = start.numel()
    steps = min(max_iter, dim)
    basis = start.new_empty((steps, dim))
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    q = start / torch.linalg.vector_norm(start)
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w -= alpha * q
        if j > 0:
            w -= betas[-1] * basis[j - 1]
        _orthogonalize_(w, basis[: j + 1])
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        run = _LanczosRun(basis[: j + 1], alphas, betas, beta)
        if j + 1 == steps:
            return run
        if beta <= _BREAKDOWN * scale:
            if restart is None:
                run.residual_beta = 0.0
                return run
            logger.debug("Lanczos: invariant subspace after %d steps, restarting", j + 1)
            w = _random_unit(dim, restart, start.device)
            _orthogonalize_(w, basis[: j + 1])
            betas.append(0.0)
            # The zero coupling makes every current Ritz pair look converged; the next vector
            # has not been seen yet, so no stopping decision is taken here.
            q = w / torch.linalg.vector_norm(w)
            continue
        betas.append(beta)
        if done is not None and done(run):
            return run
        q = w / beta
    raise AssertionError("unreachable: the loop returns on its last step")


def _lanczos_top(
    matvec: Matvec,
    dim: int,
    k: int,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The k algebraically largest Ritz pairs: values (descending), vectors (k, dim), residuals."""

    def converged(run: _LanczosRun) -> bool:
        if tol == 0.0 or len(run.alphas) < k:
            return False
        values, _, residuals = run.ritz()
        # Relative to the largest |Ritz value| seen (an estimate of ‖H‖), not to the top-k
        # values themselves, which may be close to zero.
        top = torch.argsort(values, descending=True)[:k]
        return bool((residuals[top] <= tol * float(values.abs().max())).all())

    # With restarts the run only ends early through `converged`, which needs k Ritz pairs,
    # so it always holds at least k (the caller checked k ≤ min(max_iter, dim)).
    run = _lanczos(
        matvec, _random_unit(dim, generator, device), max_iter, restart=generator, done=converged
    )
    values, small_vectors, residuals = run.ritz()
    top = torch.argsort(values, descending=True)[:k]
    vectors = (run.basis.T @ small_vectors[:, top].to(run.basis.device)).T
    values, residuals = values[top], residuals[top]
    full_space = len(run.alphas) == dim
    return values, vectors, residuals, full_space or converged(run)


def _power_top(
    matvec: Matvec,
    dim: int,
    k: int,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """k eigenpairs of largest |λ| by power iteration, deflating by projection.

    Each new iterate is kept orthogonal to the eigenvectors already found, which for a
    symmetric operator is deflation H − Σ λ_i v_i v_iᵀ without forming it, and robust to the
    found vectors being slightly off.
    """
    found = torch.empty((0, dim), dtype=torch.float64, device=device)
    values, residuals = [], []
    all_converged = True
    for _ in range(k):
        v = _random_unit(dim, generator, device)
        _orthogonalize_(v, found)
        v /= torch.linalg.vector_norm(v)
        theta, residual, converged = 0.0, math.inf, False
        for _ in range(max_iter):
            w = matvec(v)
            _orthogonalize_(w, found)
            theta = float(v @ w)
            residual = float(torch.linalg.vector_norm(w - theta * v))
            norm = float(torch.linalg.vector_norm(w))
            if norm == 0.0 or (tol > 0.0 and residual <= tol * abs(theta)):
                converged = True
                break
            v = w / norm
        all_converged &= converged
        values.append(theta)
        residuals.append(residual)
        found = torch.cat([found, v[None]])
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), descending=True)
    return (
        torch.tensor(values, dtype=torch.float64)[order],
        found[order.to(device)],
        torch.tensor(residuals, dtype=torch.float64)[order],
        all_converged,
    )


@dataclass(frozen=True)
class HessianEigenpairs:
    """The top eigenpairs of the Hessian and how far the solver got.

    Attributes:
        eigenvalues: (k,) float64, descending.
        eigenvectors: k unit directions, each one tensor per trainable parameter, shaped like
            it (ready for :func:`flatminima.sharpness.landscape_1d`'s ``direction``).
        residuals: (k,) float64, ‖Hv − λv‖ for each pair (Lanczos: from the tridiagonal matrix;
            power iteration: measured on the last iterate).
        products: Hessian-vector products spent (each is one pass over all batches).
        converged: every pair met the tolerance (or Lanczos spanned the whole space).
    """

    eigenvalues: Tensor
    eigenvectors: list[list[Tensor]]
    residuals: Tensor
    products: int
    converged: bool


def hessian_eigenpairs(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    train_mode: bool = False,
) -> HessianEigenpairs:
    """The k largest Hessian eigenvalues and their eigenvectors.

    Hv_i = λ_i v_i,  λ_1 ≥ λ_2 ≥ … ≥ λ_k,  the Hessian of (1/B) Σ_b loss_fn(model, batch_b).

    ``method="lanczos"`` (default) returns the k *algebraically* largest eigenvalues: Lanczos
    (float64, full reorthogonalisation, random start drawn from ``seed``) builds T = QᵀHQ on
    a Krylov basis Q and returns T's top eigenpairs (Ritz pairs). It stops when every one of
    the k pairs has ‖Hv − θv‖ ≤ tol·max|θ| (max over all Ritz values θ, an estimate of ‖H‖),
    after ``max_iter`` products, or when Q spans the whole space (then the result is exact).
    On an invariant subspace it restarts from a new random vector, so repeated eigenvalues
    come out with their multiplicity when it runs to the end (``tol=0``). It keeps up to
    ``max_iter`` float64 vectors of the parameters' size.

    ``method="power"`` (PyHessian's approach) returns the k eigenvalues of largest
    *magnitude*, sorted descending: at a saddle a large negative eigenvalue can come before
    a small positive one, and two eigenvalues ±λ of equal magnitude stall it. Each pair gets
    up to ``max_iter`` products and stops when ‖Hv − θv‖ ≤ tol·|θ|.

    Because eigenvalue errors are of the order of residual²/gap, tol=1e-4 gives eigenvalues
    correct to many more digits than four on well-separated spectra; with a float32 model the
    products themselves limit the accuracy to about 1e-6 relative.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches (iterated once per product; a generator or loader is
            read into a list first).
        k: how many eigenpairs, 1 ≤ k ≤ number of trainable scalars.
        method: ``"lanczos"`` or ``"power"`` (see above).
        max_iter: the cap on Hessian-vector products (per eigenpair for power iteration), ≥ 1.
        tol: relative residual tolerance, ≥ 0; 0 runs to ``max_iter``.
        seed: seeds the random start vectors.
        train_mode: measure the train-mode loss (module docstring).

    Returns:
        A :class:`HessianEigenpairs`. A solver that stops at ``max_iter`` unconverged logs a
        warning and says so in ``converged``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> pairs = hessian_eigenpairs(model, loss_fn, [x], k=2)
        >>> pairs.eigenvalues  # H = XᵀX/2 = diag(0.5, 2)
        tensor([2.0000, 0.5000], dtype=torch.float64)
    """
    positive_int("k", k)
    positive_int("max_iter", max_iter)
    non_negative("tol", tol)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    operator = _prepare(model, loss_fn, batches)
    if k > operator.dim:
        raise ValueError(
            f"k must be in [1, {operator.dim}] (the number of trainable scalars), got {k}"
        )
    if method == "lanczos" and max_iter < k:
        raise ValueError(
            f"max_iter must be at least k for Lanczos to find k eigenvalues, "
            f"got max_iter={max_iter}, k={k}"
        )
    generator = make_generator(seed)
    solver = _lanczos_top if method == "lanczos" else _power_top
    with measuring(model, train_mode=train_mode):
        values, vectors, residuals, converged = solver(
            operator, operator.dim, k, max_iter, tol, generator, operator.device
        )
    if not converged:
        logger.warning(
            "hessian_eigenpairs (%s) stopped at max_iter=%d before reaching tol=%g; residuals %s",
            method,
            max_iter,
            tol,
            residuals.tolist(),
        )
    return HessianEigenpairs(
        eigenvalues=values,
        eigenvectors=[unflatten(v, operator.params) for v in vectors],
        residuals=residuals,
        products=operator.products,
        converged=converged,
    )


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    train_mode: bool = False,
) -> Tensor:
    """The k largest Hessian eigenvalues, descending, as a float64 tensor.

    λ_1 ≥ … ≥ λ_k of H = ∇²(1/B) Σ_b loss_fn(model, batch_b); the eigenvalues of
    :func:`hessian_eigenpairs` (which documents every argument): algebraically largest with
    ``method="lanczos"``, largest in magnitude with ``method="power"``.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches.
        k: how many eigenvalues, 1 ≤ k ≤ number of trainable scalars.
        method: ``"lanczos"`` or ``"power"``.
        max_iter: the cap on Hessian-vector products, ≥ 1.
        tol: relative residual tolerance, ≥ 0.
        seed: seeds the random start vectors.
        train_mode: measure the train-mode loss.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> [round(v, 4) for v in hessian_eigenvalues(model, loss_fn, [x], k=2).tolist()]
        [2.0, 0.5]
    """
    return hessian_eigenpairs(
        model,
        loss_fn,
        batches,
        k,
        method=method,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        train_mode=train_mode,
    ).eigenvalues


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of tr(H), its standard error and the per-probe samples.

    Attributes:
        value: the mean of the samples zᵀHz.
        standard_error: sample standard deviation / √num_probes (NaN with one probe).
        samples: (num_probes,) float64, one zᵀHz per probe.
    """

    value: float
    standard_error: float
    samples: Tensor


def hessian_trace_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_probes: int = 100,
    seed: int = 0,
    train_mode: bool = False,
) -> TraceEstimate:
    """Hutchinson's estimate of the Hessian trace, with its standard error.

    tr(H) = E_z[zᵀHz] ≈ (1/N) Σ_{n=1}^{N} z_nᵀ H z_n,  z_n i.i.d. Rademacher (±1 entries)

    (Hutchinson, 1990). Rademacher probes give the smallest variance of this family,
    Var(zᵀHz) = 2(‖H‖_F² − Σ_i H_ii²): the estimate is exact for a diagonal H. Each batch's
    gradient graph is built once and reused for all N probes, so the cost is one forward,
    one backward and N double-backward passes per batch.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches.
        num_probes: N ≥ 1; the standard error falls as 1/√N.
        seed: seeds the probes (the same probes are used for every batch, as the estimator
            of the mean Hessian requires).
        train_mode: measure the train-mode loss.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> hessian_trace_estimate(model, loss_fn, [x], num_probes=4).value  # diagonal: exact
        2.5
    """
    positive_int("num_probes", num_probes)
    operator = _prepare(model, loss_fn, batches)
    samples = torch.zeros(num_probes, dtype=torch.float64)
    with measuring(model, train_mode=train_mode):
        for batch in operator.batches:
            grads = operator.batch_gradient(batch)
            # Re-seeding per batch redraws the same N probes without keeping N vectors.
            generator = make_generator(seed)
            for n in range(num_probes):
                z = _rademacher(operator.dim, generator, operator.device)
                hz = operator.product(grads, unflatten(z, operator.params), retain=True)
                samples[n] += float(z @ hz)
            del grads  # frees this batch's graph before the next forward
    samples /= len(operator.batches)
    error = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else math.nan
    return TraceEstimate(value=float(samples.mean()), standard_error=error, samples=samples)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_probes: int = 100,
    seed: int = 0,
    train_mode: bool = False,
) -> float:
    """Hutchinson's estimate of the Hessian trace, as a float.

    tr(H) ≈ (1/N) Σ_n z_nᵀ H z_n with Rademacher z_n; the value of
    :func:`hessian_trace_estimate`, which also gives the standard error.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches.
        num_probes: N ≥ 1.
        seed: seeds the probes.
        train_mode: measure the train-mode loss.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> hessian_trace(model, loss_fn, [x], num_probes=4)
        2.5
    """
    return hessian_trace_estimate(
        model, loss_fn, batches, num_probes=num_probes, seed=seed, train_mode=train_mode
    ).value


@dataclass(frozen=True)
class SpectralDensity:
    """A spectral density as a weighted sum of point masses (Gauss quadrature nodes).

    φ(t) ≈ Σ_i weights_i · δ(t − nodes_i); :meth:`evaluate` smooths it with a Gaussian.

    Attributes:
        nodes: 1-D float64, the Ritz values of every probe's Lanczos run, concatenated.
        weights: 1-D float64, the matching quadrature weights divided by the number of
            probes; they sum to 1.
        dim: the number of trainable scalars d (d·φ counts eigenvalues per unit).
    """

    nodes: Tensor
    weights: Tensor
    dim: int

    def default_sigma(self) -> float:
        """1 % of the range of the nodes (or of their magnitude if they coincide)."""
        spread = float(self.nodes.max() - self.nodes.min())
        return 0.01 * (spread if spread > 0 else max(float(self.nodes.abs().max()), 1.0))

    def _sigma(self, sigma: float | None) -> float:
        if sigma is None:
            return self.default_sigma()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise ValueError(f"sigma must be a number in (0, inf), got {sigma!r}")
        if not (0 < sigma < math.inf):
            raise ValueError(f"sigma must be in (0, inf), got {sigma!r}")
        return float(sigma)

    def grid(self, num_points: int = 1000, *, sigma: float | None = None) -> Tensor:
        """Evenly spaced points covering the nodes with a margin of 5σ on each side.

        Args:
            num_points: how many points, ≥ 1.
            sigma: the kernel width the margin is measured in; default :meth:`default_sigma`.
        """
        positive_int("num_points", num_points)
        sigma = self._sigma(sigma)
        low, high = float(self.nodes.min()) - 5 * sigma, float(self.nodes.max()) + 5 * sigma
        return torch.linspace(low, high, num_points, dtype=torch.float64)

    def evaluate(self, points: Tensor, *, sigma: float | None = None) -> Tensor:
        """The smoothed density Σ_i weights_i · N(t; nodes_i, σ²) at ``points``.

        Args:
            points: where to evaluate (any shape).
            sigma: the Gaussian kernel width, > 0; default :meth:`default_sigma`.
        """
        sigma = self._sigma(sigma)
        t = points.to(torch.float64)[..., None]
        kernel = torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return kernel @ self.weights


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    num_iter: int = 50,
    num_probes: int = 1,
    seed: int = 0,
    train_mode: bool = False,
) -> SpectralDensity:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    φ(t) = (1/d) Σ_i δ(t − λ_i) ≈ (1/N) Σ_{n=1}^{N} Σ_{j=1}^{m} τ_{nj} δ(t − θ_{nj})

    For each probe v_n (Rademacher, normalised), m Lanczos steps give T_n = Qᵀ H Q; its
    eigenvalues θ_{nj} are the Gauss quadrature nodes and the squared first components of its
    eigenvectors τ_{nj} the weights of v_nᵀ f(H) v_n = Σ_j τ_{nj} f(θ_{nj}), whose expectation
    over v_n is (1/d) tr f(H) (Ubaru, Chen & Saad, 2017; Ghorbani et al., 2019). A probe whose
    Krylov space becomes invariant before m steps stops there: its quadrature is then exact.

    Args:
        model: the network; its trainable parameters are w.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        batches: an iterable of batches.
        num_iter: m ≥ 1, Lanczos steps (Hessian-vector products) per probe; the extreme
            eigenvalues converge first, the bulk needs more.
        num_probes: N ≥ 1 probe vectors.
        seed: seeds the probes.
        train_mode: measure the train-mode loss.

    Returns:
        A :class:`SpectralDensity`; plot it with
        :func:`flatminima.sharpness.plot_spectral_density`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, batch: 0.5 * m(batch).pow(2).mean()
        >>> density = spectral_density(model, loss_fn, [x], num_iter=2)
        >>> sorted(round(t, 6) for t in density.nodes.tolist())
        [0.5, 2.0]
    """
    positive_int("num_iter", num_iter)
    positive_int("num_probes", num_probes)
    operator = _prepare(model, loss_fn, batches)
    generator = make_generator(seed)
    nodes, weights = [], []
    with measuring(model, train_mode=train_mode):
        for _ in range(num_probes):
            start = _rademacher(operator.dim, generator, operator.device)
            run = _lanczos(operator, start, num_iter, restart=None)
            values, vectors, _ = run.ritz()
            nodes.append(values)
            weights.append(vectors[0].square() / num_probes)
    return SpectralDensity(nodes=torch.cat(nodes), weights=torch.cat(weights), dim=operator.dim)
