"""Deliberately plain reference implementations, transcribed from the equations.

One parameter at a time, sums written out, no foreach, no engine, no shared helpers with the
library, and SGD with momentum and weight decay written out too. They exist to be obviously
right; the real optimizers must follow them step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

GradFn = Callable[[list[Tensor]], tuple[float, list[Tensor]]]
"""Weights → (loss, gradients) on the current batch."""

XI = 1e-12


def norm(vectors: list[Tensor]) -> float:
    total = 0.0
    for v in vectors:
        total += float((v * v).sum())
    return math.sqrt(total)


class ReferenceSGD:
    """buf ← μ·buf + (g + wd·w) (buf ← g + wd·w on the first step); w ← w − lr·buf."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[Tensor] | None = None

    def step(self, weights: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        steps = [g + self.weight_decay * w for w, g in zip(weights, grads, strict=True)]
        if self.buffers is None:
            self.buffers = [s.clone() for s in steps]
        else:
            self.buffers = [self.momentum * b + s for b, s in zip(self.buffers, steps, strict=True)]
        return [w - self.lr * b for w, b in zip(weights, self.buffers, strict=True)]


def sam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho):
    """ε = ρ g/(‖g‖+ξ); descend with ∇L(w+ε)."""
    _, g = grad_fn(weights)
    n = norm(g)
    eps = [rho * gi / (n + XI) for gi in g]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)


def asam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho, eta):
    """T = |w|+η; ε = ρ T²g/(‖Tg‖+1e-16)."""
    _, g = grad_fn(weights)
    t = [w.abs() + eta for w in weights]
    n = norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    eps = [rho * ti * ti * gi / (n + 1e-16) for ti, gi in zip(t, g, strict=True)]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)


def fisher_sam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho, eta):
    """f = 1+ηg²; u = g/f; ε = γ u/(√(Σ g·u)+ξ)."""
    _, g = grad_fn(weights)
    u = [gi / (1 + eta * gi * gi) for gi in g]
    denominator = math.sqrt(sum(float((gi * ui).sum()) for gi, ui in zip(g, u, strict=True)))
    eps = [rho * ui / (denominator + XI) for ui in u]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)


def monge_sam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho):
    """δ = ρ·G⁻¹g/(√(gᵀG⁻¹g) + ξ) with the Monge metric G = I + ggᵀ, G⁻¹g found by solving
    the dense linear system on the flattened gradient (no closed form: the library uses one)."""
    _, g = grad_fn(weights)
    flat = torch.cat([gi.reshape(-1) for gi in g])
    metric = torch.eye(len(flat), dtype=flat.dtype) + torch.outer(flat, flat)
    solved = torch.linalg.solve(metric, flat)  # G⁻¹g
    quadratic = float(flat @ solved)
    scale = rho / (math.sqrt(quadratic) + XI) if quadratic > 0 else 0.0
    pieces = solved.split([gi.numel() for gi in g])
    eps = [scale * hi.reshape(gi.shape) for gi, hi in zip(g, pieces, strict=True)]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)


class FriendlyState:
    def __init__(self) -> None:
        self.m: list[Tensor] | None = None


def friendly_sam_step(
    weights, grad_fn: GradFn, base: ReferenceSGD, state: FriendlyState, *, rho, sigma, lmbda
):
    """nblt/F-SAM: d = g − σ m_{t−1}; m_t = λ m_{t−1} + (1−λ) g (raw g); m_1 = g_1, d_1 = g_1."""
    _, g = grad_fn(weights)
    if state.m is None:
        state.m = [gi.clone() for gi in g]
        d = [gi.clone() for gi in g]
    else:
        d = [gi - sigma * mi for gi, mi in zip(g, state.m, strict=True)]
        state.m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(state.m, g, strict=True)]
    n = norm(d)
    eps = [rho * di / (n + XI) for di in d]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)


def tilted_sam_step(
    weights,
    grad_fn: GradFn,
    base: ReferenceSGD,
    generator: torch.Generator,
    *,
    rho,
    tilt,
    num_samples,
    radius,
    noise_scale,
):
    """litian96/TSAM "random1": for each sample, ζ = n·min(‖n‖,r)/‖n‖ with n ~ s·N(0,I);
    ε = ζ + ρ ĝ/(‖ĝ‖+ξ) with ĝ = ∇L(θ+ζ); weights softmax(t·L_j); descend with Σ w_j ∇L(θ+ε_j)."""
    losses, grads = [], []
    for _ in range(num_samples):
        noise = [
            noise_scale * torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in weights
        ]
        nu = norm(noise)
        zeta = [n * (min(nu, radius) / nu) for n in noise]
        _, g_hat = grad_fn([w + z for w, z in zip(weights, zeta, strict=True)])
        n_hat = norm(g_hat)
        eps = [z + rho * gh / (n_hat + XI) for z, gh in zip(zeta, g_hat, strict=True)]
        loss, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
        losses.append(loss)
        grads.append(g_tilde)
    softmax = torch.softmax(tilt * torch.tensor(losses, dtype=torch.float64), 0)
    combined = [
        sum(float(softmax[j]) * grads[j][i] for j in range(num_samples))
        for i in range(len(weights))
    ]
    return base.step(weights, combined)


# -- GSAM and WSAM (issue 9) --------------------------------------------------------------------


def gsam_radius(rho, rho_min, lr, lr_min, lr_max):
    """Algorithm 1, line 1: ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min)."""
    if rho_min is None or lr_max == lr_min:
        return rho
    return rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def gsam_step(
    weights,
    grad_fn: GradFn,
    base: ReferenceSGD,
    *,
    rho,
    alpha,
    rho_min=None,
    lr_min=0.0,
    lr_max=None,
    adaptive=False,
):
    """ε = ρ_t g/(‖g‖+ξ) (adaptive: ρ_t |w|²g/(‖|w|g‖+ξ)); g̃ = ∇L(w+ε);
    g⊥ = g − (⟨g,g̃⟩/‖g̃‖²) g̃; descend with d = g̃ − α g⊥."""
    rho_t = gsam_radius(rho, rho_min, base.lr, lr_min, base.lr if lr_max is None else lr_max)
    _, g = grad_fn(weights)
    if adaptive:
        t = [w.abs() for w in weights]
        n = norm([ti * gi for ti, gi in zip(t, g, strict=True)])
        eps = [rho_t * ti * ti * gi / (n + XI) for ti, gi in zip(t, g, strict=True)]
    else:
        n = norm(g)
        eps = [rho_t * gi / (n + XI) for gi in g]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    inner = sum(float((gi * gti).sum()) for gi, gti in zip(g, g_tilde, strict=True))
    squared = sum(float((gti * gti).sum()) for gti in g_tilde)
    projection = inner / squared
    d = [gti - alpha * (gi - projection * gti) for gi, gti in zip(g, g_tilde, strict=True)]
    return base.step(weights, d)


def clip(vectors: list[Tensor], max_norm) -> list[Tensor]:
    """torch.nn.utils.clip_grad_norm_: v·min(1, max_norm/(‖v‖ + 1e-6))."""
    factor = min(1.0, max_norm / (norm(vectors) + 1e-6))
    return [factor * v for v in vectors]


def wsam_step(
    weights,
    grad_fn: GradFn,
    base: ReferenceSGD,
    *,
    rho,
    gamma,
    decouple=True,
    max_norm=None,
    adaptive=False,
):
    """ε as SAM's (adaptive: davda54's); α = γ/(1−γ); coupled: descend with α g̃ + (1−α) g;
    decoupled: descend with g, then w ← w − lr·α·(g̃ − g). Optional clipping of g and g̃."""
    _, g = grad_fn(weights)
    if adaptive:
        t = [w.abs() for w in weights]
        n = norm([ti * gi for ti, gi in zip(t, g, strict=True)])
        eps = [rho * ti * ti * gi / (n + XI) for ti, gi in zip(t, g, strict=True)]
    else:
        n = norm(g)
        eps = [rho * gi / (n + XI) for gi in g]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    if max_norm is not None:
        g, g_tilde = clip(g, max_norm), clip(g_tilde, max_norm)
    a = gamma / (1 - gamma)
    if decouple:
        stepped = base.step(weights, g)
        return [
            w - base.lr * a * (gti - gi) for w, gi, gti in zip(stepped, g, g_tilde, strict=True)
        ]
    return base.step(weights, [a * gti + (1 - a) * gi for gi, gti in zip(g, g_tilde, strict=True)])


# -- methods-b (issue 9): LookSAM, Momentum-SAM, Bilateral SAM ------------------------------------


class LookSAMState:
    def __init__(self) -> None:
        self.count = 0
        self.unit_orthogonal: list[Tensor] | None = None


def looksam_step(
    weights, grad_fn: GradFn, base: ReferenceSGD, state: LookSAMState, *, rho, k, alpha
):
    """Steps 0, k, 2k, ...: SAM, and ĝ_v = normalise(g̃ − ⟨g̃,g⟩/(‖g‖²+ξ)·g); other steps:
    descend with g + α‖g‖ĝ_v (MarlonBecker/MSAM looksam.py, global vectors)."""
    _, g = grad_fn(weights)
    n = norm(g)
    if state.count % k == 0:
        eps = [rho * gi / (n + XI) for gi in g]
        _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
        dot = 0.0
        for a, b in zip(g_tilde, g, strict=True):
            dot += float((a * b).sum())
        coefficient = dot / (n * n + XI)
        g_v = [a - coefficient * b for a, b in zip(g_tilde, g, strict=True)]
        n_v = norm(g_v)
        state.unit_orthogonal = [v / n_v for v in g_v]
        update = g_tilde
    else:
        update = [gi + alpha * n * vi for gi, vi in zip(g, state.unit_orthogonal, strict=True)]
    state.count += 1
    return base.step(weights, update)


def momentum_sam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho):
    """One pass at w − ρ v/(‖v‖+ξ), v the SGD momentum buffer (none yet: at w); the SGD step
    from w with that gradient."""
    if base.buffers is None:
        _, g = grad_fn(weights)
    else:
        n = norm(base.buffers)
        _, g = grad_fn([w - rho * v / (n + XI) for w, v in zip(weights, base.buffers, strict=True)])
    return base.step(weights, g)


def bilateral_sam_step(weights, grad_fn: GradFn, base: ReferenceSGD, *, rho, rho_min):
    """ajiaaa/BSAM with the restore fixed: g at w; g_max at w + ρ g/(‖g‖+ξ); g_min at
    w − ρ_min g/(‖g‖+ξ); descend from w with g_max + (g − ‖g_max‖/‖g_min‖·g_min). Constant
    learning rate, so ρ_min,t = ρ_min."""
    _, g = grad_fn(weights)
    n = norm(g)
    _, g_max = grad_fn([w + rho * gi / (n + XI) for w, gi in zip(weights, g, strict=True)])
    _, g_min = grad_fn([w - rho_min * gi / (n + XI) for w, gi in zip(weights, g, strict=True)])
    ratio = norm(g_max) / norm(g_min)
    update = [a + (b - ratio * c) for a, b, c in zip(g_max, g, g_min, strict=True)]
    return base.step(weights, update)


# -- data-aware methods (issue 10, first half) ---------------------------------------------------
# Their grad_fn also takes ``examples`` (a list of row indices: the loss and gradient of those
# rows' mean loss) and has ``grad_fn.losses(weights)`` (the per-example losses, no gradient)
# and ``grad_fn.batch_size``.


class EsamState:
    """Which tensors the previous step's draws kept, and the generator they come from."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.kept: list[bool] | None = None


def esam_step(weights, grad_fn, base: ReferenceSGD, state: EsamState, *, rho, beta, gamma):
    """dydjw9/Efficient_SAM: S = the tensors the previous step kept (all on the first step,
    and all when it kept none); ε_i = ρ·g_i/(‖g_S‖ + 1e-7)/β for i in S, 0 elsewhere;
    rise_j = ℓ_j(w + ε) − ℓ_j(w); k = max(1, ⌊γB⌋); chosen = {j : rise_j > k-th largest rise}
    (if empty, those equal to it; γ ≥ 0.99: all); descend with ∇ mean_{j ∈ chosen} ℓ_j(w + ε);
    then one uniform u_i per tensor, tensor i kept for the next step when u_i ≤ β."""
    kept = state.kept if state.kept is not None and any(state.kept) else [True] * len(weights)
    before = grad_fn.losses(weights)
    _, g = grad_fn(weights)
    n = norm([gi for gi, k in zip(g, kept, strict=True) if k])
    eps = []
    for gi, k in zip(g, kept, strict=True):
        eps.append(gi * (rho / (n + 1e-7) / beta) if k else torch.zeros_like(gi))
    perturbed = [w + e for w, e in zip(weights, eps, strict=True)]
    after = grad_fn.losses(perturbed)
    rise = [float(a) - float(b) for a, b in zip(after, before, strict=True)]
    # float(a) − float(b) rounds like the tensor subtraction (both float64).
    chosen = None
    if gamma < 0.99:
        k = max(1, int(len(rise) * gamma))
        cutoff = sorted(rise, reverse=True)[k - 1]
        chosen = [j for j, r in enumerate(rise) if r > cutoff]
        if not chosen:
            chosen = [j for j, r in enumerate(rise) if r == cutoff]
        if len(chosen) == len(rise):
            chosen = None
    _, g_tilde = grad_fn(perturbed, examples=chosen)
    draws = torch.rand(len(weights), generator=state.generator, dtype=torch.float64)
    state.kept = [float(u) <= beta for u in draws]
    return base.step(weights, g_tilde)


def micro_batch_sam_step(weights, grad_fn, base: ReferenceSGD, *, rho, micro_batches):
    """mSAM: the batch cut into M contiguous parts, the first B mod M one example larger;
    for each part k: ε_k = ρ·g_k/(‖g_k‖ + ξ), h_k = ∇L_k(w + ε_k); descend with
    Σ_k (n_k/B)·h_k."""
    size = grad_fn.batch_size
    update = [torch.zeros_like(w) for w in weights]
    start = 0
    for k in range(micro_batches):
        count = size // micro_batches + (1 if k < size % micro_batches else 0)
        rows = list(range(start, start + count))
        start += count
        _, g = grad_fn(weights, examples=rows)
        n = norm(g)
        eps = [rho * gi / (n + XI) for gi in g]
        _, h = grad_fn([w + e for w, e in zip(weights, eps, strict=True)], examples=rows)
        update = [u + (count / size) * hi for u, hi in zip(update, h, strict=True)]
    return base.step(weights, update)


class SparseState:
    """The reference Sparse SAM's mask: given (``masks``), drawn on the first step from
    ``generator`` as a uniformly random subset of round((1 − s)·N) coordinates (the library's
    initial dynamic mask), or, with neither, all zeros (the Fisher mask before its refresh)."""

    def __init__(
        self, generator: torch.Generator | None = None, masks: list[Tensor] | None = None
    ) -> None:
        self.generator = generator
        self.masks = masks


def sparse_sam_step(
    weights, grad_fn: GradFn, base: ReferenceSGD, state: SparseState, *, rho, sparsity, **_mask
):
    """Mi-Peng/Sparse-Sharpness-Aware-Minimization SSAMF/SSAMD.first_step: ε = m·ρ g/(‖g‖+1e-7)
    with the unmasked norm; descend with ∇L(w+ε)."""
    if state.masks is None:
        sizes = [w.numel() for w in weights]
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        if state.generator is not None:
            keep = round((1 - sparsity) * sum(sizes))
            flat[torch.randperm(sum(sizes), generator=state.generator)[:keep]] = True
        pieces = flat.split(sizes)
        state.masks = [piece.reshape(w.shape) for piece, w in zip(pieces, weights, strict=True)]
    _, g = grad_fn(weights)
    n = norm(g)
    eps = [m.to(gi.dtype) * rho * gi / (n + 1e-7) for m, gi in zip(state.masks, g, strict=True)]
    _, g_tilde = grad_fn([w + e for w, e in zip(weights, eps, strict=True)])
    return base.step(weights, g_tilde)
