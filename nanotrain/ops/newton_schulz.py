"""Orthogonalization for Muon: replace a matrix G = U S V^T by (approximately) U V^T.

Polar Express (Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932): after scaling
X = G / (1.01 ||G||_F) so that every singular value is below 1, apply odd quintic polynomials

    X <- a X + (b A + c A A) X,  A = X X^T   (wide or square X; for tall X use A = X^T X on the right)

with per-step coefficients chosen to push all singular values towards 1 as fast as possible.
The output's singular values land in a band around 1 (not exactly 1): that is the intended result.

Backends: fused kernels where available, then `reference` (plain PyTorch, in the input's dtype).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nanotrain.ops import registry

# Coefficients (a, b, c) for 5 steps, safety factor 2e-2, cushion 2 (from the Polar Express paper).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORM_SAFETY = 1.01


def reference(G: Tensor, steps: int = 5) -> Tensor:
    """Polar Express orthogonalization of a matrix or a stack of matrices, in G's dtype.

    G: (..., m, n) -> (..., m, n) with singular values near 1.
    """
    if G.dim() < 2:
        raise ValueError(f"orthogonalize wants (..., m, n), got shape {tuple(G.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"orthogonalize: steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {steps}")
    X = G / (G.norm(dim=(-2, -1), keepdim=True) * NORM_SAFETY + 1e-6)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def orthogonalize(G: Tensor, steps: int = 5) -> Tensor:
    """Orthogonalize G (..., m, n) through the best available backend (see module doc)."""
    backend = registry.select("muon", G.device, G.dtype, shape=tuple(G.shape[-2:]))
    return backend.fn(G, steps)


def muon_update_reference(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                          momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    """One Muon step for a stack of same-shape matrices, in place on params and both buffers.

    grads, params, momentum_buffer: (K, m, n); second_momentum: (K, m, 1) if m >= n else (K, 1, n).
    Nesterov momentum -> MuonEq row equilibration -> orthogonalize -> Muon+ norm snap to sqrt(min(m,n))
    -> NorMuon variance reduction (factored second moment, norm preserved) -> cautious weight decay:
    decay only where the update and the parameter agree in sign. `lr` is the effective rate (the caller
    applies the sqrt(max(1, m/n)) aspect factor). grads is used as scratch.
    """
    m, n = params.shape[-2:]
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    gf = g.float()
    target = gf.norm(dim=(-2, -1), keepdim=True) / (m ** 0.5)
    g = g * (target / gf.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(g.dtype)
    g = orthogonalize(g, steps).to(params.dtype)
    g = g * (min(m, n) ** 0.5 / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)
    red_dim = -1 if m >= n else -2
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum.lerp_(v_mean.to(second_momentum.dtype), 1 - beta2)
    step_size = second_momentum.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * weight_decay * params * mask)


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    """One in-place Muon step for a stack of matrices through the best backend (see muon_update_reference)."""
    backend = registry.select("muon_update", params.device, params.dtype, shape=tuple(params.shape[-2:]))
    backend.fn(grads, params, momentum_buffer, second_momentum, momentum, lr, weight_decay, beta2, steps)


registry.register("muon", "reference", reference, description="pure-PyTorch Polar Express")
registry.register("muon_update", "reference", torch.no_grad()(muon_update_reference),
                  description="PyTorch ops around orthogonalize()")
