"""Triton kernels for Muon: symmetric products for the Polar Express / Newton–Schulz iteration and the
elementwise and reduction stages of the fused Muon step.

Every kernel is batched over a stack of K same-shape matrices (grid axis 1 or the program's matrix
index) and takes explicit strides for every operand, so a tall matrix is processed as the transpose
view of its storage (no copy). The matrix kernels accumulate in float32 and store in the output's
dtype (bfloat16 on the GPU; float32/float16 under the interpreter, which mis-computes bf16 dots).

Kernels:
- `_sym_matmul_kernel`   C = alpha * P @ S^T + beta * Z + gamma * I, for outputs known to be symmetric
                         (X X^T, A A with A symmetric, Q R with Q and R commuting symmetric): only the
                         tiles on and below the diagonal are computed, each written twice (mirrored).
- `_axpby_matmul_kernel` Y = a * X + B @ X (B square), the update step of the iteration.
- `_muon_momentum_kernel`, `_muon_eq_scale_kernel`, `_scale_cast_kernel`, `_sumsq_rows_kernel`,
  `_normuon_scale_kernel`, `_muon_apply_kernel`: the Muon step around the orthogonalization
  (see nanotrain/ops/newton_schulz.py, muon_update_reference, for the math they implement).

NaN survives: every floor (tl.maximum(x, eps)) passes propagate_nan=ALL, because tl.maximum drops NaN by
default on the GPU (and in the interpreter), which would turn a NaN second moment or norm into a finite
1/eps factor, a huge but finite update instead of the NaN the reference gives.

Row and tile offsets are int64 (the program's first row cast before it is multiplied by a stride).

This module never imports nanotrain; the host-side logic (the iteration, dispatch, checks) lives in
nanotrain/ops/newton_schulz.py.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------
# Matrix kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _triangle_tile(pid):
    """Map a linear index over the lower triangle of tiles to (row tile i, column tile j), j <= i."""
    i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # the float square root may be off by one near perfect squares: correct both ways
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    return i, j


@triton.jit
def _sym_matmul_kernel(
    P_ptr, S_ptr, Z_ptr, C_ptr,
    M, K,
    stride_pb, stride_pm, stride_pk,
    stride_sb, stride_sm, stride_sk,
    stride_zb, stride_zm, stride_zn,
    stride_cb, stride_cm, stride_cn,
    alpha, beta, gamma,
    HAS_Z: tl.constexpr,
    HAS_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[b] = alpha * P[b] @ S[b]^T + beta * Z[b] + gamma * I for each b; P, S: (M, K), Z, C: (M, M).

    The caller guarantees the result is symmetric (P = S, or P and S commuting symmetric matrices,
    and Z symmetric). Grid: (T (T + 1) / 2, batch) with T = cdiv(M, BLOCK_M): each program computes
    the lower-triangle tile (i, j), j <= i, and stores it at (i, j) and transposed at (j, i). Inside a
    diagonal tile only its lower part is stored both ways, so the output is exactly symmetric.
    """
    ti, tj = _triangle_tile(tl.program_id(0))
    b = tl.program_id(1).to(tl.int64)
    P_ptr += b * stride_pb
    S_ptr += b * stride_sb
    C_ptr += b * stride_cb

    rows = ti.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * stride may pass 2^31
    cols = tj.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < M
    p_ptrs = P_ptr + rows[:, None] * stride_pm + ks[None, :] * stride_pk
    s_ptrs = S_ptr + ks[:, None] * stride_sk + cols[None, :] * stride_sm  # S^T tile: (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        p = tl.load(p_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(s_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(p, s, acc, input_precision=DOT_PRECISION)
        p_ptrs += tl.cast(stride_pk, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
        s_ptrs += tl.cast(stride_sk, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
    acc = acc * alpha
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_Z:
        Z_ptr += b * stride_zb
        z = tl.load(Z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=out_ok, other=0.0)
        acc += beta * z.to(tl.float32)
    if HAS_I:
        acc += tl.where(rows[:, None] == cols[None, :], gamma, 0.0)
    out = acc.to(C_ptr.dtype.element_ty)
    lower = rows[:, None] >= cols[None, :]
    strictly_lower = rows[:, None] > cols[None, :]
    tl.store(C_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=out_ok & lower)
    tl.store(C_ptr + cols[None, :] * stride_cm + rows[:, None] * stride_cn, out, mask=out_ok & strictly_lower)


@triton.jit
def _axpby_matmul_kernel(
    B_ptr, X_ptr, Y_ptr,
    M, N,
    stride_bb, stride_bm, stride_bk,
    stride_xb, stride_xm, stride_xn,
    stride_yb, stride_ym, stride_yn,
    alpha,
    ADD_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y[b] = alpha * X[b] + B[b] @ X[b] (or B[b] @ X[b] without ADD_X); B: (M, M), X, Y: (M, N).

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), batch); tiles grouped GROUP_M rows at a time so that
    neighbouring programs share the same columns of X in L2. Y must not alias X.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.swizzle2d(pid // num_n, pid % num_n, num_m, num_n, GROUP_M)
    B_ptr += b * stride_bb
    X_ptr += b * stride_xb
    Y_ptr += b * stride_yb

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * stride may pass 2^31
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    b_ptrs = B_ptr + rows[:, None] * stride_bm + ks[None, :] * stride_bk
    x_ptrs = X_ptr + ks[:, None] * stride_xm + cols[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        k_ok = (k0 + ks) < M
        bt = tl.load(b_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(bt, xt, acc, input_precision=DOT_PRECISION)
        b_ptrs += tl.cast(stride_bk, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
        x_ptrs += tl.cast(stride_xm, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
    out_ok = row_ok[:, None] & col_ok[None, :]
    if ADD_X:
        x = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=out_ok, other=0.0)
        acc += alpha * x.to(tl.float32)
    tl.store(Y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y_ptr.dtype.element_ty),
             mask=out_ok)


# Autotuning: small lists per architecture family; the interpreter uses one small fixed config.
_INTERPRETER_SYM = {"BLOCK_M": 32, "BLOCK_K": 32}
_INTERPRETER_AXPBY = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _sym_configs(capability: tuple[int, int]) -> list[triton.Config]:
    if capability >= (9, 0):
        shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
    else:
        shapes = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


def _axpby_configs(capability: tuple[int, int]) -> list[triton.Config]:
    if capability >= (9, 0):
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
    else:
        shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, capability: tuple[int, int]):
    """The autotuned wrapper of a matrix kernel for one GPU architecture family."""
    from ._compile import autotune_configs  # NANOTRAIN_AUTOTUNE=first: one config (the GPU check's first call)

    if kernel_name == "sym":
        return triton.autotune(configs=autotune_configs(_sym_configs(capability)), key=["M", "K", "HAS_Z", "HAS_I"])(
            _sym_matmul_kernel)
    return triton.autotune(configs=autotune_configs(_axpby_configs(capability)), key=["M", "N", "ADD_X"])(
        _axpby_matmul_kernel)


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def _precision(t: torch.Tensor) -> str:
    # float32 operands: exact products (the tests' float32 tolerance); 16-bit operands ignore this.
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _as3d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.reshape(-1, *t.shape[-2:])


def sym_matmul(P: torch.Tensor, S: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
               Z: torch.Tensor | None = None, beta: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """out = alpha * P @ S^T + beta * Z + gamma * I for a result the caller knows is symmetric.

    P, S: (K, M, N) any strides; Z, out: (K, M, M); out must not alias P, S or Z. Half the tiles of a
    general product are computed (the lower triangle), each stored twice.
    """
    K, M, N = P.shape
    assert S.shape == P.shape and out.shape == (K, M, M), (P.shape, S.shape, out.shape)
    zz = Z if Z is not None else out
    args = (P, S, zz, out, M, N, *P.stride(), *S.stride(), *zz.stride(), *out.stride(),
            float(alpha), float(beta), float(gamma))
    flags = {"HAS_Z": Z is not None, "HAS_I": gamma != 0.0, "DOT_PRECISION": _precision(P)}
    if interpreting() or not P.is_cuda:
        T = triton.cdiv(M, _INTERPRETER_SYM["BLOCK_M"])
        _sym_matmul_kernel[(T * (T + 1) // 2, K)](*args, **flags, **_INTERPRETER_SYM)
    else:
        def grid(meta):
            T = triton.cdiv(M, meta["BLOCK_M"])
            return (T * (T + 1) // 2, K)
        _tuned("sym", _capability(P))[grid](*args, **flags)
    return out


def axpby_matmul(B: torch.Tensor, X: torch.Tensor, out: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """out = alpha * X + B @ X, or B @ X when alpha is None. B: (K, M, M), X, out: (K, M, N), any strides."""
    K, M, N = X.shape
    assert B.shape == (K, M, M) and out.shape == X.shape, (B.shape, X.shape, out.shape)
    args = (B, X, out, M, N, *B.stride(), *X.stride(), *out.stride(), float(alpha or 0.0))
    flags = {"ADD_X": alpha is not None, "DOT_PRECISION": _precision(X)}
    if interpreting() or not X.is_cuda:
        cfg = _INTERPRETER_AXPBY
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), K)
        _axpby_matmul_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), K)
        _tuned("axpby", _capability(X))[grid](*args, **flags)
    return out


# ---------------------------------------------------------------------------------------------------
# Elementwise and reduction kernels of the Muon step
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _lerp(a, b, w):
    """a + w (b - a), evaluated as torch.lerp does (from the nearer end) so results match it bit for bit."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _muon_momentum_kernel(
    G_ptr, MB_ptr, RSQ_ptr,
    R, C,
    stride_gb, stride_gr, stride_gc,
    stride_mb, stride_mr, stride_mc,
    momentum,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Nesterov momentum, in place, and the squared norm of each row of the result.

    mb <- mb + (1 - momentum) (g - mb);  g <- g + momentum (mb - g);  rsq[b, r] = sum_c g[b, r, c]^2
    (of g as stored, so that a low-precision buffer gives the norms the reference sees).
    Grid: (cdiv(R, BLOCK_R), batch).
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    G_ptr += b * stride_gb
    MB_ptr += b * stride_mb
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        g_ptrs = G_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gc
        m_ptrs = MB_ptr + rows[:, None] * stride_mr + cols[None, :] * stride_mc
        g = tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32)
        mb = tl.load(m_ptrs, mask=ok, other=0.0).to(tl.float32)
        mb = _lerp(mb, g, 1.0 - momentum).to(MB_ptr.dtype.element_ty)
        tl.store(m_ptrs, mb, mask=ok)
        g = _lerp(g, mb.to(tl.float32), momentum).to(G_ptr.dtype.element_ty)
        tl.store(g_ptrs, g, mask=ok)
        gf = g.to(tl.float32)
        acc += tl.sum(gf * gf, axis=1)
    tl.store(RSQ_ptr + b * R + rows, acc, mask=row_ok)


@triton.jit
def _muon_eq_scale_kernel(RSQ_ptr, F_ptr, R, norm_safety, BLOCK: tl.constexpr):
    """Per-row factor of MuonEq row equilibration fused with the Polar Express input normalization.

    With rsq the squared row norms of g (R rows): target = sqrt(sum rsq / R), s_r = target /
    max(sqrt(rsq_r), 1e-6); the equilibrated matrix s * g has squared norm sum_r rsq_r s_r^2, and
    the iteration's input is s * g / (norm_safety * that norm + 1e-6). Writes f_r = that factor.
    One program per matrix.
    """
    b = tl.program_id(0).to(tl.int64)
    RSQ_ptr += b * R
    F_ptr += b * R
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        total += tl.load(RSQ_ptr + r, mask=r < R, other=0.0)
    target = tl.sqrt(tl.sum(total, axis=0) / R)
    eq = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        rsq = tl.load(RSQ_ptr + r, mask=r < R, other=0.0)
        s = target / tl.maximum(tl.sqrt(rsq), 1e-6, propagate_nan=tl.PropagateNan.ALL)
        eq += rsq * s * s
    inv = 1.0 / (tl.sqrt(tl.sum(eq, axis=0)) * norm_safety + 1e-6)
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        rsq = tl.load(RSQ_ptr + r, mask=r < R, other=1.0)
        s = target / tl.maximum(tl.sqrt(rsq), 1e-6, propagate_nan=tl.PropagateNan.ALL)
        tl.store(F_ptr + r, s * inv, mask=r < R)


@triton.jit
def _scale_cast_kernel(
    X_ptr, F_ptr, Y_ptr,
    R, C,
    stride_xb, stride_xr, stride_xc,
    stride_fb, stride_fr,
    stride_yb, stride_yr, stride_yc,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Y[b, r, c] = X[b, r, c] * F[b, r], cast to Y's dtype (a per-matrix factor: stride_fr = 0).

    Grid: (cdiv(R, BLOCK_R), batch).
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    f = tl.load(F_ptr + b * stride_fb + rows * stride_fr, mask=row_ok, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(X_ptr + b * stride_xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=ok,
                    other=0.0).to(tl.float32)
        tl.store(Y_ptr + b * stride_yb + rows[:, None] * stride_yr + cols[None, :] * stride_yc,
                 (x * f[:, None]).to(Y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sumsq_rows_kernel(
    X_ptr, OUT_ptr,
    R, C,
    stride_xb, stride_xr, stride_xc,
    ROUND_TO: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUT[b, r] = sum_c x[b, r, c]^2 (float32), x first rounded to ROUND_TO (the dtype the reference
    squares in). Column sums: pass the transposed view's strides. Grid: (cdiv(R, BLOCK_R), batch)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(X_ptr + b * stride_xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=ok,
                    other=0.0)
        x = x.to(ROUND_TO).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(OUT_ptr + b * R + rows, acc, mask=row_ok)


@triton.jit
def _normuon_scale_kernel(
    Q_ptr, SM_ptr, F_ptr,
    L, red_size, target_norm, beta2,
    stride_smb, stride_sml,
    BLOCK: tl.constexpr,
):
    """Muon+ norm snap and NorMuon variance reduction, per matrix, from the per-neuron sums of squares.

    q_l = sum of O^2 over the reduced dimension (red_size entries) for neuron l of L. With
    s = target_norm / max(||O||, 1e-6) (the norm snap): v_l = s^2 q_l / red_size;
    sm_l <- sm_l + (1 - beta2) (v_l - sm_l) (in place); step_l = rsqrt(max(sm_l, 1e-10));
    F_l = s * step_l * sqrt(sum v red_size) / max(sqrt(sum v red_size step^2), 1e-10).
    One program per matrix.
    """
    b = tl.program_id(0).to(tl.int64)
    Q_ptr += b * L
    F_ptr += b * L
    SM_ptr += b * stride_smb
    tot = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        idx = l0 + tl.arange(0, BLOCK)
        tot += tl.load(Q_ptr + idx, mask=idx < L, other=0.0)
    qsum = tl.sum(tot, axis=0)
    s = target_norm / tl.maximum(tl.sqrt(qsum), 1e-6, propagate_nan=tl.PropagateNan.ALL)
    v_norm = tl.sqrt(qsum * s * s)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        idx = l0 + tl.arange(0, BLOCK)
        ok = idx < L
        v = tl.load(Q_ptr + idx, mask=ok, other=0.0) * (s * s) / red_size
        sm_ptrs = SM_ptr + idx * stride_sml
        sm = tl.load(sm_ptrs, mask=ok, other=1.0).to(tl.float32)
        sm = _lerp(sm, v.to(SM_ptr.dtype.element_ty).to(tl.float32), 1.0 - beta2).to(SM_ptr.dtype.element_ty)
        tl.store(sm_ptrs, sm, mask=ok)
        step = 1.0 / tl.sqrt(tl.maximum(sm.to(tl.float32), 1e-10, propagate_nan=tl.PropagateNan.ALL))
        acc += tl.where(ok, v * red_size * step * step, 0.0)
    ratio = v_norm / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-10, propagate_nan=tl.PropagateNan.ALL)
    for l0 in range(0, L, BLOCK):
        idx = l0 + tl.arange(0, BLOCK)
        ok = idx < L
        sm = tl.load(SM_ptr + idx * stride_sml, mask=ok, other=1.0).to(tl.float32)
        step = 1.0 / tl.sqrt(tl.maximum(sm, 1e-10, propagate_nan=tl.PropagateNan.ALL))
        tl.store(F_ptr + idx, s * step * ratio, mask=ok)


@triton.jit
def _muon_apply_kernel(
    O_ptr, F_ptr, P_ptr,
    R, C,
    stride_ob, stride_or, stride_oc,
    stride_fb, stride_fr, stride_fc,
    stride_pb, stride_pr, stride_pc,
    lr, lr_wd,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Cautious weight decay and the parameter update, in place.

    u = O * F (F per row or per column: one of stride_fr, stride_fc is 0, rounded to p's dtype);
    p <- p - (lr u + lr wd p [u p >= 0]). Grid: (cdiv(R, BLOCK_R), batch).
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        o = tl.load(O_ptr + b * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc, mask=ok,
                    other=0.0)
        f = tl.load(F_ptr + b * stride_fb + rows[:, None] * stride_fr + cols[None, :] * stride_fc, mask=ok,
                    other=0.0)
        p_ptrs = P_ptr + b * stride_pb + rows[:, None] * stride_pr + cols[None, :] * stride_pc
        p = tl.load(p_ptrs, mask=ok, other=0.0)
        u = (o.to(P_ptr.dtype.element_ty).to(tl.float32) * f).to(P_ptr.dtype.element_ty).to(tl.float32)
        pf = p.to(tl.float32)
        decay = tl.where(u * pf >= 0, lr_wd * pf, 0.0)
        tl.store(p_ptrs, (pf - (lr * u + decay)).to(P_ptr.dtype.element_ty), mask=ok)


def _rows_cfg(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for the row-tiled elementwise kernels."""
    if interpreting():
        return 16, 32, 1
    block_c = min(1024, triton.next_power_of_2(max(C, 16)))
    return max(1, 4096 // block_c), block_c, 4


def _vector_warps(block: int) -> int:
    """num_warps of the one-program-per-matrix kernels (eq_scale, normuon_scale) for a BLOCK-long vector.
    8 at 4096: with 4 warps normuon_scale spills on sm80 (ptxas: 128 registers, 4 bytes spilled)."""
    return 8 if block >= 4096 else (4 if block >= 1024 else 1)


def muon_momentum(grads: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """Nesterov momentum in place on both stacks (K, R, C); returns the row sums of squares of the new
    grads, (K, R) float32."""
    K, R, C = grads.shape
    rsq = torch.empty(K, R, device=grads.device, dtype=torch.float32)
    br, bc, w = _rows_cfg(C)
    _muon_momentum_kernel[(triton.cdiv(R, br), K)](
        grads, momentum_buffer, rsq, R, C, *grads.stride(), *momentum_buffer.stride(), float(momentum),
        BLOCK_R=br, BLOCK_C=bc, num_warps=w)
    return rsq


def muon_eq_scale(rsq: torch.Tensor, norm_safety: float) -> torch.Tensor:
    """Per-row factors (K, R) float32 of row equilibration times the Polar Express normalization."""
    K, R = rsq.shape
    f = torch.empty_like(rsq)
    block = 32 if interpreting() else min(4096, triton.next_power_of_2(R))
    _muon_eq_scale_kernel[(K,)](rsq, f, R, float(norm_safety), BLOCK=block, num_warps=_vector_warps(block))
    return f


def scale_cast(x: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, r, c] = x[b, r, c] * f[b, r] in out's dtype; f: (K, R), or (K,) for one factor per matrix."""
    K, R, C = x.shape
    stride_fb, stride_fr = (f.stride(0), f.stride(1)) if f.dim() == 2 else (f.stride(0), 0)
    br, bc, w = _rows_cfg(C)
    _scale_cast_kernel[(triton.cdiv(R, br), K)](
        x, f, out, R, C, *x.stride(), stride_fb, stride_fr, *out.stride(), BLOCK_R=br, BLOCK_C=bc, num_warps=w)
    return out


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def sumsq_rows(x: torch.Tensor, round_to: torch.dtype) -> torch.Tensor:
    """(K, R) float32 sums over the last axis of x^2 for x: (K, R, C) (any strides), x rounded to round_to."""
    K, R, C = x.shape
    out = torch.empty(K, R, device=x.device, dtype=torch.float32)
    br, bc, w = _rows_cfg(C)
    _sumsq_rows_kernel[(triton.cdiv(R, br), K)](
        x, out, R, C, *x.stride(), ROUND_TO=_TL_DTYPE[round_to], BLOCK_R=br, BLOCK_C=bc, num_warps=w)
    return out


def normuon_scale(q: torch.Tensor, second_momentum: torch.Tensor, red_size: int, target_norm: float,
                  beta2: float) -> torch.Tensor:
    """Per-neuron factors (K, L) float32 (norm snap x variance reduction); updates second_momentum (K, L)."""
    K, L = q.shape
    f = torch.empty_like(q)
    block = 32 if interpreting() else min(4096, triton.next_power_of_2(L))
    _normuon_scale_kernel[(K,)](q, second_momentum, f, L, float(red_size), float(target_norm), float(beta2),
                                second_momentum.stride(0), second_momentum.stride(1), BLOCK=block,
                                num_warps=_vector_warps(block))
    return f


def muon_apply(o: torch.Tensor, f: torch.Tensor, f_per_row: bool, params: torch.Tensor, lr: float,
               weight_decay: float) -> None:
    """params <- params - lr (o * f) - lr wd params [same sign]; o, params: (K, R, C); f: (K, R) or (K, C)."""
    K, R, C = params.shape
    stride_fr, stride_fc = (f.stride(1), 0) if f_per_row else (0, f.stride(1))
    br, bc, w = _rows_cfg(C)
    _muon_apply_kernel[(triton.cdiv(R, br), K)](
        o, f, params, R, C, *o.stride(), f.stride(0), stride_fr, stride_fc, *params.stride(), float(lr),
        float(lr * weight_decay), BLOCK_R=br, BLOCK_C=bc, num_warps=w)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU that is not here (CI on CPU: GPU-only compile errors, shared memory
# and spills per config). Needs TRITON_INTERPRET unset. Example calls use the real layouts and dtypes:
# the iteration in bf16 on the short side s of a (s, long) matrix ("wide": row-major, "tall": the transpose
# view of a row-major (long, s) matrix, "square": A A + Z on contiguous (s, s)); the Muon step on fp32
# parameters, gradients and momentum (autocast training keeps fp32 master weights).
# ---------------------------------------------------------------------------------------------------
ELEMENTWISE_KERNELS = ("momentum", "eq_scale", "scale_cast", "sumsq_rows", "normuon_scale", "apply")


def gpu_configs(kernel: str, capability: tuple[int, int]) -> list[triton.Config]:
    """The autotune configs the GPU path tries for the matrix kernel `kernel` ("sym" or "axpby")."""
    return _sym_configs(capability) if kernel == "sym" else _axpby_configs(capability)


def compile_for(kernel: str, capability: tuple[int, int], config: triton.Config | None = None, layout: str = "wide",
                dtype: str = "bf16", param_dtype: str = "fp32", size: int = 4096) -> dict:
    """Compile one kernel for compute capability `capability` without a GPU (see kernels/_compile.py).

    kernel: "sym" / "axpby" (with `config`, one of gpu_configs; `layout` wide/tall/square, operands in
    `dtype`) or one of ELEMENTWISE_KERNELS (the launch config the launcher picks for `size` columns, or
    rows for eq_scale/normuon_scale; tensors in `param_dtype`, the iteration's input/output in `dtype`).
    Returns compile_kernel's dict (shared bytes, regs, spills, cubin, ptx).
    """
    from ._compile import compile_kernel

    p, d = f"*{param_dtype}", f"*{dtype}"
    s, long_ = 1024, 4096  # short and long side of the iterated matrix (multiples of 16, as model shapes are)
    if kernel in ("sym", "axpby"):
        meta, warps, stages = dict(config.kwargs), config.num_warps, config.num_stages
        # (batch, row, col) strides of the (s, long) iterate X and of a contiguous (s, s) matrix
        x_str = (s * long_, long_, 1) if layout != "tall" else (s * long_, 1, s)
        sq_str = (s * s, s, 1)
        if kernel == "sym":
            square = layout == "square"
            ps = sq_str if square else x_str
            args = dict(P_ptr=d, S_ptr=d, Z_ptr=d, C_ptr=d, M=s, K=s if square else long_,
                        **_strides("p", "bmk", ps), **_strides("s", "bmk", ps), **_strides("z", "bmn", sq_str),
                        **_strides("c", "bmn", sq_str), alpha=0.5, beta=-1.5, gamma=0.0, HAS_Z=square,
                        HAS_I=False, DOT_PRECISION="tf32", **meta)
            fn = _sym_matmul_kernel
        else:
            args = dict(B_ptr=d, X_ptr=d, Y_ptr=d, M=s, N=long_, **_strides("b", "bmk", sq_str),
                        **_strides("x", "bmn", x_str), **_strides("y", "bmn", x_str), alpha=3.4,
                        ADD_X=True, DOT_PRECISION="tf32", **meta)
            fn = _axpby_matmul_kernel
        return compile_kernel(fn, capability, args, warps, stages)
    if kernel in ("eq_scale", "normuon_scale"):
        block = min(4096, triton.next_power_of_2(size))
        warps = _vector_warps(block)
        if kernel == "eq_scale":
            args = dict(RSQ_ptr="*fp32", F_ptr="*fp32", R=size, norm_safety=1.02, BLOCK=block)
            return compile_kernel(_muon_eq_scale_kernel, capability, args, warps, 3)
        args = dict(Q_ptr="*fp32", SM_ptr=p, F_ptr="*fp32", L=size, red_size=768.0, target_norm=27.7, beta2=0.95,
                    stride_smb=size, stride_sml=1, BLOCK=block)
        return compile_kernel(_normuon_scale_kernel, capability, args, warps, 3)
    R, C = s, size
    br, bc, warps = _rows_cfg(C)
    rc = (R * C, C, 1)
    blocks = dict(BLOCK_R=br, BLOCK_C=bc)
    if kernel == "momentum":
        args = dict(G_ptr=p, MB_ptr=p, RSQ_ptr="*fp32", R=R, C=C, **_strides("g", "brc", rc),
                    **_strides("m", "brc", rc), momentum=0.95, **blocks)
        fn = _muon_momentum_kernel
    elif kernel == "scale_cast":
        args = dict(X_ptr=p, F_ptr="*fp32", Y_ptr=d, R=R, C=C, **_strides("x", "brc", rc), stride_fb=R,
                    stride_fr=1, **_strides("y", "brc", rc), **blocks)
        fn = _scale_cast_kernel
    elif kernel == "sumsq_rows":  # the iterate (dtype) rounded to the parameters' dtype
        args = dict(X_ptr=d, OUT_ptr="*fp32", R=R, C=C, **_strides("x", "brc", rc),
                    ROUND_TO=getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[param_dtype]),
                    **blocks)
        fn = _sumsq_rows_kernel
    elif kernel == "apply":  # per-row factors (F (K, R): stride_fc = 0)
        args = dict(O_ptr=d, F_ptr="*fp32", P_ptr=p, R=R, C=C, **_strides("o", "brc", rc), stride_fb=R,
                    stride_fr=1, stride_fc=0, **_strides("p", "brc", rc), lr=0.02, lr_wd=0.0004, **blocks)
        fn = _muon_apply_kernel
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return compile_kernel(fn, capability, args, warps, 3)


def _strides(prefix: str, axes: str, values: tuple[int, ...]) -> dict:
    """{'stride_<prefix><axis>': value} for each axis letter, e.g. _strides("p", "bmk", (..))."""
    return {f"stride_{prefix}{a}": v for a, v in zip(axes, values)}
