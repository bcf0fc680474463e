"""Orthogonalization for Muon: replace a matrix G = U S V^T by (approximately) U V^T.

Polar Express (Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932): after scaling
X = G / (1.01 ||G||_F) so that every singular value is below 1, apply odd quintic polynomials

    X <- a X + (b A + c A A) X,  A = X X^T   (wide or square X; for tall X use A = X^T X on the right)

with per-step coefficients chosen to push all singular values towards 1 as fast as possible.
The output's singular values land in a band around 1 (not exactly 1): that is the intended result.

Backends: fused kernels where available (each a `nanotrain::` custom op: aot_muon, aot_muon_update from the
extension's ahead-of-time cubins; triton_muon, triton_muon_update JIT; both run the same kernels through one
orchestration, `muon_step` and `polar_express_triton`, with a different kernels namespace), then `reference`
(plain PyTorch, in the input's dtype). `self_check` and `self_check_update` beside the references verify a
fused backend on the device before it serves a shape. The optimizer resolves its `muon_update` once, when it
is built (`resolve_update`); `orthogonalize` and `muon_update` resolve per call.
"""
from __future__ import annotations

import functools
from typing import Callable

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
    """Orthogonalize G (..., m, n) through the best available backend, resolved on this call (see module doc)."""
    backend = registry.resolve("muon", G.device, G.dtype, shape=tuple(G.shape[-2:]))
    return backend.fn(G, steps)


def muon_update_reference(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                          momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5,
                          ortho: Callable[[Tensor, int], Tensor] | None = None) -> None:
    """One Muon step for a stack of same-shape matrices, in place on params and both buffers.

    grads, params, momentum_buffer: (K, m, n); second_momentum: (K, m, 1) if m >= n else (K, 1, n).
    Nesterov momentum -> MuonEq row equilibration -> orthogonalize -> Muon+ norm snap to sqrt(min(m,n))
    -> NorMuon variance reduction (factored second moment, norm preserved) -> cautious weight decay:
    decay only where the update and the parameter agree in sign. `lr` is the effective rate (the caller
    applies the sqrt(max(1, m/n)) aspect factor). grads is used as scratch. `ortho` is the orthogonalization
    backend resolved in advance (default: `orthogonalize`, resolved on this call).
    """
    m, n = params.shape[-2:]
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    gf = g.float()
    target = gf.norm(dim=(-2, -1), keepdim=True) / (m ** 0.5)
    g = g * (target / gf.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(g.dtype)
    g = (orthogonalize if ortho is None else ortho)(g, steps).to(params.dtype)
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
    """One in-place Muon step for a stack of matrices through the best backend, resolved on this call
    (see muon_update_reference; the optimizer calls the one it resolved when it was built)."""
    update = resolve_update(params.device, params.dtype, tuple(params.shape[-2:]))
    update(grads, params, momentum_buffer, second_momentum, momentum, lr, weight_decay, beta2, steps)


def resolve_update(device: torch.device | str, dtype: torch.dtype, shape: tuple[int, int]) -> Callable[..., None]:
    """The Muon step for (K, *shape) stacks on device/dtype, resolved (and self-checked on a GPU) now: the fused
    backend, or the reference bound to the orthogonalization backend resolved for the same case."""
    backend = registry.resolve("muon_update", device, dtype, shape=tuple(shape))
    if backend.name != "reference":
        return backend.fn
    ortho = registry.resolve("muon", device, dtype, shape=tuple(shape))
    return functools.partial(backend.fn, ortho=ortho.fn)


# ---------------------------------------------------------------------------------------------------
# Self-checks (registry.register_self_check): a backend against the float64 reference on a small stack of
# the case's aspect ratio. Bound: twice the error of the reference run in the backend's compute dtype
# (bfloat16 on the GPU, the input's dtype under the interpreter) plus 1e-3 (orthogonalize, as the d26
# GPU test), and max(2x, 3e-2) on the parameter change for the whole Muon step (as its GPU test).
# ---------------------------------------------------------------------------------------------------
_CHECK_MAX_DIM = 128


def _check_shape(shape: tuple[int, int] | None) -> tuple[int, int]:
    """A small (m, n) with the aspect of `shape` (multiples of 8, the longer side at most _CHECK_MAX_DIM)."""
    m, n = shape or (64, 64)
    f = min(1.0, _CHECK_MAX_DIM / max(m, n))
    return max(8, int(m * f) // 8 * 8), max(8, int(n * f) // 8 * 8)


def _rel_err(a: Tensor, ref: Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _check_matrices(device: torch.device, shape: tuple[int, int] | None, K: int = 2) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    m, n = _check_shape(shape)
    return torch.randn(K, m, n, device=device, generator=gen, dtype=torch.float64)


def self_check(fn: Callable[..., Tensor], device: torch.device, dtype: torch.dtype,
               shape: tuple[int, int] | None = None, **props) -> registry.CheckResult:
    """Orthogonalization backend `fn` against the float64 reference (relative Frobenius error)."""
    G = _check_matrices(device, shape)
    ref = reference(G)
    compute = torch.bfloat16 if device.type == "cuda" else dtype
    base = _rel_err(reference(G.to(compute)), ref)
    return registry.CheckResult(_rel_err(fn(G.to(dtype), 5), ref), 2 * base + 1e-3, "relative error")


def self_check_update(fn: Callable[..., None], device: torch.device, dtype: torch.dtype,
                      shape: tuple[int, int] | None = None, **props) -> registry.CheckResult:
    """Muon-step backend `fn` against the float64 reference step (relative error of the parameter change)."""
    grads = _check_matrices(device, shape)
    gen = torch.Generator(device=device).manual_seed(1)
    params = torch.randn(grads.shape, device=device, generator=gen, dtype=torch.float64) * 0.1
    m, n = grads.shape[-2:]
    second = torch.rand((grads.shape[0], m, 1) if m >= n else (grads.shape[0], 1, n), device=device, generator=gen,
                        dtype=torch.float64) * 1e-2
    momentum = torch.randn(grads.shape, device=device, generator=gen, dtype=torch.float64) * 0.5
    hp = (0.95, 0.02, 0.2, 0.9)

    def step(update: Callable[..., None], run_dtype: torch.dtype, **kw) -> Tensor:
        state = [t.to(run_dtype).clone() for t in (grads, params, momentum, second)]
        with torch.no_grad():
            update(*state, *hp, **kw)
        return state[1].double() - params.to(run_dtype).double()

    ref = step(muon_update_reference, torch.float64, ortho=reference)
    compute = torch.bfloat16 if device.type == "cuda" else dtype
    base = _rel_err(step(muon_update_reference, compute, ortho=reference), ref)
    return registry.CheckResult(_rel_err(step(fn, dtype), ref), max(2 * base, 3e-2 if compute == torch.bfloat16
                                                                       else 1e-3), "parameter change relative error")


# ---------------------------------------------------------------------------------------------------
# Triton backend (kernels/newton_schulz.py): symmetric products on half the tiles, fused epilogues, and
# the Muon step as a few elementwise/reduction launches around the iteration.
# ---------------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_check(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    """Why the Triton backend cannot run here (None if it can); see registry's check contract."""
    try:
        import triton  # noqa: F401

        from nanotrain.kernels import newton_schulz as _kernels  # noqa: F401
    except Exception as e:  # an absent or broken Triton install: say so in the startup report
        return f"triton import failed: {type(e).__name__}: {e}"
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} unsupported (float32, float16 or bfloat16)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return f"compute capability {capability[0]}.{capability[1]} < 8.0 (needs Ampere or newer)"
        return None
    if device.type == "cpu":
        if dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 dots wrongly; use float32 or float16 on CPU"
        return None
    return f"device type '{device.type}' unsupported (CUDA GPUs; CPU only under the interpreter)"


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the Triton iteration runs in: bfloat16 on the GPU (as nanochat), t's dtype on CPU (tests)."""
    return torch.bfloat16 if t.is_cuda else t.dtype


# Gram formulation (see polar_express_triton): off by default. Measured on CPU (kernel-exact emulation of
# bf16 operands with float32 accumulation, 128x512 stacks): with one restart before step 2 it matches the
# standard path in float32 (~3e-6 from the float64 reference) but in bf16 its error is 1.1-1.9x the
# standard Triton path's (2.5e-2 vs 1.4-2.2e-2) and its largest singular value lands 0.004-0.011 above the
# band; without the restart it diverges on low-rank-plus-noise inputs. It needs 38 instead of 65 (m^3 units)
# for a 1:4 matrix, so it is worth it only if the GPU benchmark shows the speed: set GRAM_MIN_ASPECT
# (max(m, n) / min(m, n) from which to use it) after measuring with benchmarks/bench_muon.py.
GRAM_MIN_ASPECT: float | None = None
GRAM_RESTART_STEP = 2  # recompute X = R X0 and A = X X^T before this step (half-precision stability)


def polar_express_triton(X: Tensor, steps: int = 5, gram: bool | None = None, products=None) -> Tensor:
    """Run the Polar Express iteration on a normalized stack X (K, m, n) with the Triton kernels.

    X is consumed (used as one of the two ping-pong buffers). A tall stack is iterated on its transpose
    view (strides only, no copy), so every product is the short side squared. `gram` picks the Gram
    formulation (default: by GRAM_MIN_ASPECT). `products` provides sym_matmul and axpby_matmul (default: the
    Triton JIT kernels; AotProducts: the extension's ahead-of-time cubins). Returns (K, m, n) in X's dtype and
    layout.
    """
    m, n = X.shape[-2:]
    if gram is None:
        gram = GRAM_MIN_ASPECT is not None and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)
    if gram:
        return _polar_express_gram(X, steps, products)
    return _polar_express_standard(X, steps, products)


def _polar_express_standard(X: Tensor, steps: int, products=None) -> Tensor:
    """X <- a X + (b A + c A A) X, A = X X^T: three launches per step, the two square products on half
    the tiles (2 m^2 n / 2 + 2 m^3 / 2 + 2 m^2 n FLOPs per step for the short side m)."""
    nsk = products if products is not None else _triton_products()
    B, m, n = X.shape
    tall = m > n
    s = min(m, n)
    other = torch.empty_like(X)
    cur, nxt = (X.mT, other.mT) if tall else (X, other)  # (B, s, max(m, n))
    A = torch.empty(B, s, s, device=X.device, dtype=X.dtype)
    P = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        nsk.sym_matmul(cur, cur, A)                        # A = X X^T
        nsk.sym_matmul(A, A, P, alpha=c, Z=A, beta=b)      # P = b A + c A A
        nsk.axpby_matmul(P, cur, nxt, alpha=a)             # X <- a X + P X
        cur, nxt = nxt, cur
    return cur.mT if tall else cur


def _polar_express_gram(X: Tensor, steps: int, products=None) -> Tensor:
    """The same iteration on the small Gram matrix: X_k = R_k X_0 with R_k = Q_{k-1} ... Q_0 and
    Q = a I + P, P = b A + c A A, A_{k+1} = Q A_k Q. All of A, P, Q, R are polynomials in A_0, hence
    symmetric and commuting, so every square product is computed on half the tiles; the long side is
    touched only to form A_0 and X = R X_0. Before GRAM_RESTART_STEP the iterate is formed explicitly and
    A recomputed from it: in half precision A and R drift apart otherwise (measured: divergence on
    low-rank-plus-noise inputs). `a I` is kept out of the 16-bit P and applied in the float32 epilogues.
    """
    nsk = products if products is not None else _triton_products()
    B, m, n = X.shape
    tall = m > n
    s = min(m, n)
    other = torch.empty_like(X)
    cur, nxt = (X.mT, other.mT) if tall else (X, other)  # (B, s, max(m, n))
    A, P, R, T, Q_A = (torch.empty(B, s, s, device=X.device, dtype=X.dtype) for _ in range(5))
    nsk.sym_matmul(cur, cur, A)
    have_r = False
    for i, (a, b, c) in enumerate(POLAR_EXPRESS_COEFFS[:steps]):
        if i == GRAM_RESTART_STEP and have_r:
            nsk.axpby_matmul(R, cur, nxt, alpha=None)      # X = R X0
            cur, nxt = nxt, cur
            nsk.sym_matmul(cur, cur, A)
            have_r = False
        nsk.sym_matmul(A, A, P, alpha=c, Z=A, beta=b)      # P = b A + c A A
        if have_r:
            nsk.sym_matmul(P, R, T, Z=R, beta=a)           # R <- a R + P R
            R, T = T, R
        else:
            R.copy_(P)
            R.diagonal(dim1=-2, dim2=-1).add_(a)           # R = Q = a I + P
            have_r = True
        if i + 1 < steps and i + 1 != GRAM_RESTART_STEP:
            nsk.sym_matmul(P, A, Q_A, Z=A, beta=a)         # Q A
            nsk.sym_matmul(P, Q_A, A, Z=Q_A, beta=a)       # A <- Q (Q A)
    nsk.axpby_matmul(R, cur, nxt, alpha=None)              # X = R X0
    return nxt.mT if tall else nxt


def _triton_products():
    from nanotrain.kernels import newton_schulz as nsk

    return nsk


def _check_steps(G: Tensor, steps: int) -> None:
    if G.dim() < 2:
        raise ValueError(f"orthogonalize wants (..., m, n), got shape {tuple(G.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"orthogonalize: steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {steps}")


@torch.library.custom_op("nanotrain::triton_muon", mutates_args=())
def orthogonalize_triton(G: Tensor, steps: int = 5) -> Tensor:
    """Polar Express orthogonalization with the Triton kernels; G (..., m, n) -> same shape and dtype.

    Computes in bfloat16 on the GPU (float32 accumulation), in G's dtype under the interpreter.
    """
    from nanotrain.kernels import newton_schulz as nsk

    _check_steps(G, steps)
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n)
    inv = 1.0 / (G3.float().norm(dim=(-2, -1)) * NORM_SAFETY + 1e-6)  # (B,)
    X = nsk.scale_cast(G3, inv, torch.empty(G3.shape, device=G.device, dtype=compute_dtype(G)))
    return polar_express_triton(X, steps).to(G.dtype).reshape(G.shape)


@orthogonalize_triton.register_fake
def _(G: Tensor, steps: int = 5) -> Tensor:
    return torch.empty_like(G)


def _check_stacks(params: Tensor, steps: int) -> None:
    if params.dim() != 3:
        raise ValueError(f"muon_update wants stacks (K, m, n), got params of shape {tuple(params.shape)}")
    _check_steps(params, steps)


def muon_step(kernels, grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
              momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    """The fused Muon step (muon_update_reference's math) as 7 launches around the 3-per-step iteration, with the
    launchers of `kernels`: kernels/newton_schulz.py (the Triton JIT backend) or AotKernels (the extension's
    ahead-of-time cubins of the same kernels, launched with the same blocks and grids: the same bits).

    grads, params, momentum_buffer: (K, m, n); second_momentum: (K, m, 1) if m >= n else (K, 1, n).
    Launches: momentum + row norms; equilibration/normalization factors; scale and cast to the compute
    dtype; the iteration; per-neuron sums of squares; norm snap + variance reduction factors (updates
    second_momentum); the cautious update of params.
    """
    B, m, n = params.shape
    rsq = kernels.muon_momentum(grads, momentum_buffer, momentum)                 # (B, m)
    f = kernels.muon_eq_scale(rsq, NORM_SAFETY)                                   # (B, m)
    X = kernels.scale_cast(grads, f, torch.empty(B, m, n, device=grads.device, dtype=compute_dtype(grads)))
    ortho = polar_express_triton(X, steps, products=kernels)                      # (B, m, n)
    per_row = m >= n  # the reference's red_dim = -1: one second moment per row
    q = kernels.sumsq_rows(ortho if per_row else ortho.mT, params.dtype)          # (B, L)
    sm = second_momentum.squeeze(-1) if per_row else second_momentum.squeeze(-2)  # (B, L) view
    F = kernels.normuon_scale(q, sm, n if per_row else m, min(m, n) ** 0.5, beta2)  # (B, L)
    kernels.muon_apply(ortho, F, per_row, params, lr, weight_decay)


@torch.library.custom_op("nanotrain::triton_muon_update",
                         mutates_args=("grads", "params", "momentum_buffer", "second_momentum"))
def muon_update_triton(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                       momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    """muon_update_reference with the Triton kernels (JIT): muon_step with kernels/newton_schulz.py's launchers.

    grads, params, momentum_buffer: (K, m, n); second_momentum: (K, m, 1) if m >= n else (K, 1, n).
    """
    from nanotrain.kernels import newton_schulz as nsk

    _check_stacks(params, steps)
    muon_step(nsk, grads, params, momentum_buffer, second_momentum, momentum, lr, weight_decay, beta2, steps)


@muon_update_triton.register_fake
def _(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor, momentum: float,
      lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# AOT backend: the same kernels, compiled ahead of time into nanotrain._C (kernels/_aot.py lists the variants;
# csrc/muon/aot_ops.cpp launches them with the Triton launchers' blocks and grids), run through the same
# orchestration (muon_step, polar_express_triton). No Triton, no compile, no autotune at run time.
# ---------------------------------------------------------------------------------------------------
AOT_KERNELS = ("sym_matmul", "axpby_matmul", "scale_cast")
AOT_STEP_KERNELS = ("sym_matmul", "axpby_matmul", "muon_momentum", "muon_eq_scale", "scale_cast", "sumsq_rows",
                    "normuon_scale", "muon_apply")
AOT_STEP_DTYPES = (torch.float32,)  # the optimizer's master weights: the dtype the step's cubins are compiled for


class AotProducts:
    """sym_matmul and axpby_matmul with the call signatures of kernels/newton_schulz.py's, served by the
    extension's ops torch.ops.nanotrain.aot_sym_matmul / aot_axpby_matmul (bfloat16 stacks on a GPU whose
    architecture has cubins)."""

    @staticmethod
    def sym_matmul(P: Tensor, S: Tensor, out: Tensor, alpha: float = 1.0, Z: Tensor | None = None,
                   beta: float = 0.0, gamma: float = 0.0) -> Tensor:
        torch.ops.nanotrain.aot_sym_matmul(P, S, out, float(alpha), Z, float(beta), float(gamma))
        return out

    @staticmethod
    def axpby_matmul(B: Tensor, X: Tensor, out: Tensor, alpha: float | None) -> Tensor:
        torch.ops.nanotrain.aot_axpby_matmul(B, X, out, None if alpha is None else float(alpha))
        return out


class AotKernels(AotProducts):
    """Every launcher muon_step needs, with the call signatures of kernels/newton_schulz.py's (muon_momentum,
    muon_eq_scale, scale_cast, sumsq_rows, normuon_scale, muon_apply and the products), served by the extension's
    torch.ops.nanotrain.aot_* ops. Outputs are allocated here as the Triton launchers allocate them."""

    @staticmethod
    def muon_momentum(grads: Tensor, momentum_buffer: Tensor, momentum: float) -> Tensor:
        K, R, _ = grads.shape
        rsq = torch.empty(K, R, device=grads.device, dtype=torch.float32)
        torch.ops.nanotrain.aot_muon_momentum(grads, momentum_buffer, rsq, float(momentum))
        return rsq

    @staticmethod
    def muon_eq_scale(rsq: Tensor, norm_safety: float) -> Tensor:
        f = torch.empty_like(rsq)
        torch.ops.nanotrain.aot_muon_eq_scale(rsq, f, float(norm_safety))
        return f

    @staticmethod
    def scale_cast(x: Tensor, f: Tensor, out: Tensor) -> Tensor:
        torch.ops.nanotrain.aot_scale_cast(x, f, out)
        return out

    @staticmethod
    def sumsq_rows(x: Tensor, round_to: torch.dtype) -> Tensor:
        out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
        torch.ops.nanotrain.aot_sumsq_rows(x, out, round_to)
        return out

    @staticmethod
    def normuon_scale(q: Tensor, second_momentum: Tensor, red_size: int, target_norm: float, beta2: float) -> Tensor:
        f = torch.empty_like(q)
        torch.ops.nanotrain.aot_normuon_scale(q, second_momentum, f, float(red_size), float(target_norm), float(beta2))
        return f

    @staticmethod
    def muon_apply(o: Tensor, f: Tensor, f_per_row: bool, params: Tensor, lr: float, weight_decay: float) -> None:
        torch.ops.nanotrain.aot_muon_apply(o, f, bool(f_per_row), params, float(lr), float(weight_decay))


def _rows_blocks(C: int) -> dict[str, int]:
    """The GPU blocks of kernels/newton_schulz.py _rows_cfg (what csrc/muon/aot_ops.cpp passes as flags)."""
    block_c = min(1024, 1 << (max(C, 16) - 1).bit_length())
    return {"BLOCK_R": max(1, 4096 // block_c), "BLOCK_C": block_c}


def _vector_block(n: int) -> dict[str, int]:
    return {"BLOCK": min(4096, 1 << (n - 1).bit_length())}


def aot_launches(m: int, n: int, update: bool = True) -> list[tuple[str, dict[str, int], dict]]:
    """The launches of the Muon step's elementwise kernels for (K, m, n) stacks as the AOT ops make them
    (csrc/muon/aot_ops.cpp; the products' calls are served by their generic rows): (kernel, flags, arguments by
    name), a pointer as (dtype, a 16-byte aligned address) as fresh torch allocations are, the stacks contiguous
    (the optimizer's), second_momentum (K, m, 1) or (K, 1, n). update=False: orthogonalize's one launch, the
    float32 copy of G scaled per matrix. Used by the availability check (is there a cubin for each?) and the tests."""
    addr = 1 << 12
    fp32, bf16 = ("fp32", addr), ("bf16", addr)
    mn = m * n
    if not update:
        return [("scale_cast", _rows_blocks(n), {"X_ptr": fp32, "F_ptr": fp32, "Y_ptr": bf16, "R": m, "C": n,
                                                 "stride_xb": mn, "stride_xr": n, "stride_xc": 1, "stride_fb": 1,
                                                 "stride_fr": 0, "stride_yb": mn, "stride_yr": n, "stride_yc": 1})]
    per_row = m >= n
    L = m if per_row else n
    rows, cols, (xr, xc) = (m, n, (n, 1)) if per_row else (n, m, (1, n))  # sumsq_rows on ortho or ortho.mT
    return [
        ("muon_momentum", _rows_blocks(n), {"G_ptr": fp32, "MB_ptr": fp32, "RSQ_ptr": fp32, "R": m, "C": n,
                                            "stride_gb": mn, "stride_gr": n, "stride_gc": 1, "stride_mb": mn,
                                            "stride_mr": n, "stride_mc": 1, "momentum": 0.95}),
        ("muon_eq_scale", _vector_block(m), {"RSQ_ptr": fp32, "F_ptr": fp32, "R": m, "norm_safety": NORM_SAFETY}),
        ("scale_cast", _rows_blocks(n), {"X_ptr": fp32, "F_ptr": fp32, "Y_ptr": bf16, "R": m, "C": n,
                                         "stride_xb": mn, "stride_xr": n, "stride_xc": 1, "stride_fb": m,
                                         "stride_fr": 1, "stride_yb": mn, "stride_yr": n, "stride_yc": 1}),
        ("sumsq_rows", _rows_blocks(cols), {"X_ptr": bf16, "OUT_ptr": fp32, "R": rows, "C": cols, "stride_xb": mn,
                                            "stride_xr": xr, "stride_xc": xc}),
        ("normuon_scale", _vector_block(L), {"Q_ptr": fp32, "SM_ptr": fp32, "F_ptr": fp32, "L": L,
                                             "red_size": float(n if per_row else m),
                                             "target_norm": min(m, n) ** 0.5, "beta2": 0.95, "stride_smb": L,
                                             "stride_sml": 1}),
        ("muon_apply", _rows_blocks(n), {"O_ptr": bf16, "F_ptr": fp32, "P_ptr": fp32, "R": m, "C": n,
                                         "stride_ob": mn, "stride_or": n, "stride_oc": 1, "stride_fb": L,
                                         "stride_fr": 1 if per_row else 0, "stride_fc": 0 if per_row else 1,
                                         "stride_pb": mn, "stride_pr": n, "stride_pc": 1, "lr": 0.02, "lr_wd": 4e-3}),
    ]


_AOT_TABLE: list[dict] = []


def _aot_table() -> list[dict]:
    """nanotrain.ops._ext.aot_table(), parsed once (the checks look rows up by index)."""
    from nanotrain.ops import _ext

    if not _AOT_TABLE:
        _AOT_TABLE.extend(_ext.aot_table())
    return _AOT_TABLE


def _aot_param_names(kernel: str) -> tuple[str, ...]:
    """The runtime parameters of `kernel` in order, from the extension's table (no Triton import at run time)."""
    row = next((r for r in _aot_table() if r["kernel"] == kernel), None)
    return () if row is None else tuple(p["name"] for p in row["params"])


def aot_row(kernel: str, arch: str, flags: dict[str, int], named: dict) -> int:
    """The index in nanotrain.ops._ext.aot_table() of the cubin the launcher takes for this call (-1: none)."""
    from nanotrain.ops import _ext

    names = _aot_param_names(kernel)
    module = _ext.load_extension()
    if not names or module is None:
        return -1
    return module.aot_select(kernel, arch, dict(flags), [named[name] for name in names])


# The kernels of the step that reduce: their order of additions follows the loads' vectorization, which follows
# the specialization (divisibility hints), so only a cubin of the JIT's exact specialization gives the JIT's bits.
AOT_REDUCING_KERNELS = ("muon_momentum", "muon_eq_scale", "sumsq_rows", "normuon_scale")


def jit_class(value) -> tuple[str, str, str]:
    """(kind, hint, pointee dtype) Triton's launcher gives an argument, as the AOT table lists a parameter: a
    pointer (dtype, address) is 16-byte aligned or not, an int equal to 1 the constant 1, a multiple of 16 gets
    the divisibility hint (kernels/_compile.py _arg_spec; written out here: no Triton import at run time)."""
    if isinstance(value, tuple):
        return "ptr", "div16" if value[1] % 16 == 0 else "", value[0]
    if isinstance(value, float):
        return "fp32", "", ""
    if value == 1:
        return "one", "", ""
    return ("i32" if -2**31 <= value < 2**31 else "i64"), "div16" if value % 16 == 0 else "", ""


def _aot_refusal(device: torch.device, shape: tuple[int, int] | None, update: bool) -> str | None:
    """Why no cubin serves one of the launches for (K, *shape) stacks on device (None if each has one, in the
    JIT's exact specialization for the kernels that reduce)."""
    from nanotrain.ops import _ext

    if shape is None:
        return None
    m, n = shape
    if m * n >= 2**31:
        return f"shape {tuple(shape)} has 2^31 elements or more (the cubins take 32-bit strides)"
    arch = _ext.device_arch(device)
    for kernel, flags, named in aot_launches(m, n, update):
        i = aot_row(kernel, arch, flags, named)
        exact = i >= 0 and (kernel not in AOT_REDUCING_KERNELS or all(
            (p["kind"], p["hint"], p["dtype"]) == jit_class(named[p["name"]]) for p in _aot_table()[i]["params"]))
        if not exact:
            blocks = ", ".join(f"{k}={v}" for k, v in flags.items())
            return (f"no cubin of {kernel} with {blocks} {'' if i < 0 else 'in the JIT specialization '}for "
                    f"({m}, {n}) stacks on sm_{arch} (kernels/_aot.py MUON_STEP_VARIANTS lists the compiled blocks "
                    "and layouts)")
    return None


def aot_check(device: torch.device, dtype: torch.dtype, shape: tuple[int, int] | None = None, **props) -> str | None:
    """Why the AOT orthogonalization cannot run here (None if it can): the extension's cubins (see
    _ext.aot_unavailable), the input dtype (any of TRITON_DTYPES: G is scaled from its float32 copy), a cubin for
    the scale-and-cast of this shape, and int32 strides (m * n < 2^31)."""
    from nanotrain.ops import _ext

    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} unsupported (float32, float16 or bfloat16)"
    if shape is not None and shape[0] * shape[1] >= 2**31:
        return f"shape {tuple(shape)} has 2^31 elements or more (the cubins take 32-bit strides)"
    device = torch.device(device)
    return (_ext.aot_unavailable(AOT_KERNELS, device, ops=tuple(f"aot_{k}" for k in AOT_KERNELS))
            or _aot_refusal(device, shape, update=False))


def aot_update_check(device: torch.device, dtype: torch.dtype, shape: tuple[int, int] | None = None,
                     **props) -> str | None:
    """Why the AOT Muon step cannot run here (None if it can): float32 stacks only (the optimizer's master
    weights; the cubins are compiled for them), the extension's cubins, and a cubin of each launch's block for
    (K, *shape) stacks (aot_launches) and for the small stacks of its self-check (_check_shape); a shape whose
    blocks were not compiled resolves to the triton backend."""
    from nanotrain.ops import _ext

    if dtype not in AOT_STEP_DTYPES:
        return f"dtype {dtype} unsupported by the ahead-of-time Muon step (float32 stacks; triton serves others)"
    device = torch.device(device)
    ops = ("aot_sym_matmul", "aot_axpby_matmul", "aot_muon_momentum", "aot_muon_eq_scale", "aot_scale_cast",
           "aot_sumsq_rows", "aot_normuon_scale", "aot_muon_apply")
    why = _ext.aot_unavailable(AOT_STEP_KERNELS, device, ops=ops) or _aot_refusal(device, shape, update=True)
    if why is None and shape is not None:
        small = _check_shape(tuple(shape))
        why = _aot_refusal(device, small, update=True)
        return None if why is None else f"its self-check's {small} stacks: {why}"
    return why


@torch.library.custom_op("nanotrain::aot_muon", mutates_args=())
def orthogonalize_aot(G: Tensor, steps: int = 5) -> Tensor:
    """Polar Express orthogonalization with the ahead-of-time compiled kernels; G (..., m, n) -> same shape and
    dtype. Computes in bfloat16 (float32 accumulation), as the Triton backend on the GPU, with the same launch
    configs: the same result bit for bit (the scale-and-cast reads G's float32 copy, which holds G's values
    exactly, where the Triton kernel converts each loaded value to float32: the same products, rounded once)."""
    _check_steps(G, steps)
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n).float()
    inv = 1.0 / (G3.norm(dim=(-2, -1)) * NORM_SAFETY + 1e-6)  # (B,)
    X = AotKernels.scale_cast(G3, inv, torch.empty(G3.shape, device=G.device, dtype=compute_dtype(G)))
    return polar_express_triton(X, steps, products=AotKernels).to(G.dtype).reshape(G.shape)


@orthogonalize_aot.register_fake
def _(G: Tensor, steps: int = 5) -> Tensor:
    return torch.empty_like(G)


@torch.library.custom_op("nanotrain::aot_muon_update",
                         mutates_args=("grads", "params", "momentum_buffer", "second_momentum"))
def muon_update_aot(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                    momentum: float, lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    """The fused Muon step from the ahead-of-time cubins: muon_step with AotKernels, the launches of
    muon_update_triton with the same blocks and grids (the same bits as the Triton backend on the GPU). float32
    stacks whose blocks were compiled (aot_update_check)."""
    _check_stacks(params, steps)
    muon_step(AotKernels, grads, params, momentum_buffer, second_momentum, momentum, lr, weight_decay, beta2, steps)


@muon_update_aot.register_fake
def _(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor, momentum: float,
      lr: float, weight_decay: float, beta2: float, steps: int = 5) -> None:
    return None


_CASES = [{"shape": (64, 64)}, {"shape": (256, 64)}, {"shape": (64, 256)}]
# on the GPU, checked in float32: the optimizer's master weights (the Triton iteration computes in bfloat16)
registry.register_self_check("muon", self_check, _CASES, cuda_dtype=torch.float32)
registry.register_self_check("muon_update", self_check_update, _CASES, cuda_dtype=torch.float32)
registry.register("muon", "triton", orthogonalize_triton, check=triton_check, interpreter=True,
                  description="Triton symmetric-product Polar Express (bf16 on GPU)")
registry.register("muon_update", "triton", muon_update_triton, check=triton_check, interpreter=True,
                  description="Triton fused Muon step")
registry.register("muon", "aot", orthogonalize_aot, check=aot_check, fused=True, before="triton",
                  description="AOT-compiled Triton products from nanotrain._C (bf16, no JIT)")
registry.register("muon_update", "aot", muon_update_aot, check=aot_update_check, fused=True, before="triton",
                  description="AOT-compiled fused Muon step from nanotrain._C (fp32 stacks, no JIT)")
registry.register("muon", "reference", reference, description="pure-PyTorch Polar Express")
registry.register("muon_update", "reference", torch.no_grad()(muon_update_reference),
                  description="PyTorch ops around orthogonalize()")
