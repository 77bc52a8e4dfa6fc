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
