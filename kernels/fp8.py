"""Triton kernels for FP8 training: the scaling glue (absmax + scale + saturating cast, with an optional
transposed copy) and an FP8 GEMM that applies the dequantization scales in its epilogue.

Conventions (shared with nanotrain/ops/fp8.py, which owns dispatch, checks and autograd):
  scale = fp8_max / max(amax, eps)        the quantization multiplier (x_fp8 ~ x * scale)
  x_fp8 = cast(clamp(x * scale, +-fp8_max)) rounded to nearest even, never inf/NaN from overflow
  mode  = -1: one scale for the tensor; 1: one scale per row (amax over columns); 0: one per column;
          2: both at once (the row-scaled copy and the column-scaled transposed copy, for rowwise linears)
  power_of_2: the scale is rounded down to a power of two (its mantissa bits cleared)
  out   = (a_fp8 @ b_fp8) / (scale_a * scale_b), accumulated in fp32 (see _fp8_matmul_kernel for Hopper)

NaN and inf survive: a NaN in x makes its amax, its scale and its output NaN; an inf makes the amax inf, the
scale 0 and the inf's own output NaN (inf * 0), as the reference in nanotrain/ops/fp8.py does. A diverged run
must show up as NaN, never as a quiet +-fp8_max. This takes care: tl.maximum/tl.minimum/tl.clamp default to
dropping NaN (fmax semantics) on the GPU and in the interpreter, and so does the tl.max reduction, so every
max/clamp here passes propagate_nan=ALL and the reductions go through _nan_max.

The fp32 -> fp8 rounding is done explicitly on the fp32 grid of the target format before the cast
(`_round_to_fp8_grid`), so that the final cast is exact. This costs a few integer ops in a
memory-bound kernel and makes the bytes identical everywhere: the Triton interpreter's own fp8
conversion mis-rounds values whose rounding carries into the exponent (125.7 -> 64 instead of 128).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# (mantissa bits, smallest normal exponent) per fp8 format: the grid `_round_to_fp8_grid` rounds onto.
FP8_FORMATS = {
    torch.float8_e4m3fn: (3, -6),
    torch.float8_e5m2: (2, -14),
}
EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale instead of inf


@triton.jit
def _round_to_fp8_grid(v, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """Round fp32 `v` to the nearest (ties to even) value representable with MANT_BITS mantissa bits
    and exponent >= MIN_EXP (subnormals below it), keeping the sign (also of values that round to 0)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # 0x80000000
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP)
    # magic = 1.5 * 2^(e - MANT_BITS + 23): its ulp is the fp8 quantum 2^(e - MANT_BITS) for this binade,
    # so (a + magic) - magic rounds a to a multiple of the quantum by the fp32 adder's round-to-nearest-even.
    magic = ((e - MANT_BITS + 150) << 23).to(tl.float32, bitcast=True) * 1.5
    r = (a + magic) - magic
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _to_fp8(v, fp8_dtype: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """Saturated fp32 `v` -> fp8 (round to nearest even), NaN -> NaN (byte 0x7F, a NaN in e4m3fn and e5m2).
    The GPU's satfinite conversion keeps NaN by itself; the interpreter's conversion turns it into a number,
    so the byte is set explicitly (one select in a memory-bound kernel)."""
    q = _round_to_fp8_grid(v, MANT_BITS, MIN_EXP).to(fp8_dtype)
    bits = tl.where(v != v, 0x7F, q.to(tl.uint8, bitcast=True).to(tl.int32)).to(tl.uint8)
    return bits.to(fp8_dtype, bitcast=True)


@triton.jit
def _nan_max(a, axis: tl.constexpr):
    """tl.max of `a` along `axis`, NaN where the slice holds a NaN (tl.max alone skips NaNs). The NaN count is a
    sum reduction: the interpreter runs it natively, where a NaN-propagating combine function would run its
    slow per-element path."""
    m = tl.max(a, axis=axis)
    n_nan = tl.sum((a != a).to(tl.int32), axis=axis)
    return tl.where(n_nan > 0, float("nan"), m)


@triton.jit
def _fp8_amax_kernel(x_ptr, amax_ptr, amax_col_ptr, R, C, stride_xr, stride_xc,
                     MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """amax of |x| for a (R, C) tensor: MODE -1 -> amax_ptr[0], 1 -> amax_ptr[r] (per row), 0 -> amax_ptr[c],
    2 -> both per row (amax_ptr[r]) and per column (amax_col_ptr[c]) in the same pass.

    Each program owns BLOCK_R rows and walks all columns. Per-row maxima are stored directly; per-column
    and whole-tensor maxima are combined across programs with atomic max (amax_ptr must start at 0). A NaN
    amax is a positive NaN (|x|), whose bits exceed every finite float's as integers, so the float atomic max
    (an integer max on non-negative values, in Triton 3.6 and 3.8) keeps it.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    row_max = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (offs_c[None, :] < C)
        x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
        a = tl.abs(x.to(tl.float32))
        if MODE == 0:
            tl.atomic_max(amax_ptr + offs_c, _nan_max(a, 0), mask=offs_c < C)
        else:
            row_max = tl.maximum(row_max, _nan_max(a, 1), propagate_nan=tl.PropagateNan.ALL)
        if MODE == 2:
            tl.atomic_max(amax_col_ptr + offs_c, _nan_max(a, 0), mask=offs_c < C)
    if MODE == 1 or MODE == 2:
        tl.store(amax_ptr + offs_r, row_max, mask=mask_r)
    if MODE == -1:
        tl.atomic_max(amax_ptr, _nan_max(row_max, 0))


@triton.jit
def _fp8_scale_from_amax(amax, FP8_MAX: tl.constexpr, EPS_: tl.constexpr, POW2: tl.constexpr):
    """fp8_max / max(amax, eps), NaN for a NaN amax (also with POW2, where clearing the mantissa would make
    NaN an inf)."""
    scale = tl.math.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32),
                           tl.maximum(amax, EPS_, propagate_nan=tl.PropagateNan.ALL))
    if POW2:
        scale = tl.where(scale == scale, (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True),
                         scale)
    return scale


@triton.jit
def _fp8_cast_kernel(x_ptr, amax_ptr, amax_col_ptr, out_ptr, out_t_ptr, scale_ptr, scale_col_ptr, R, C,
                     stride_xr, stride_xc,
                     MODE: tl.constexpr, FP8_MAX: tl.constexpr, EPS_: tl.constexpr, POW2: tl.constexpr,
                     MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, WRITE_MAIN: tl.constexpr,
                     WRITE_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Scale, saturate and cast one (BLOCK_R, BLOCK_C) tile of x to fp8 given the amax from
    _fp8_amax_kernel: out[r, c] (contiguous (R, C)) and/or out_t[c, r] (contiguous (C, R), the transposed
    copy that the backward GEMMs want as a column-major operand). Also writes the scales. MODE 2 scales
    out by rows and out_t by columns (the two operands a rowwise linear needs from one tensor)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: R * C may pass 2^31
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    mask = mask_r[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    if MODE == -1:
        scale = _fp8_scale_from_amax(tl.load(amax_ptr), FP8_MAX, EPS_, POW2)
        v = x.to(tl.float32) * scale
        if (pid_r == 0) & (pid_c == 0):
            tl.store(scale_ptr, scale)
    elif MODE == 1:
        scale = _fp8_scale_from_amax(tl.load(amax_ptr + offs_r, mask=mask_r, other=1.0), FP8_MAX, EPS_, POW2)
        v = x.to(tl.float32) * scale[:, None]
        if pid_c == 0:
            tl.store(scale_ptr + offs_r, scale, mask=mask_r)
    elif MODE == 0:
        scale = _fp8_scale_from_amax(tl.load(amax_ptr + offs_c, mask=mask_c, other=1.0), FP8_MAX, EPS_, POW2)
        v = x.to(tl.float32) * scale[None, :]
        if pid_r == 0:
            tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    else:
        scale = _fp8_scale_from_amax(tl.load(amax_ptr + offs_r, mask=mask_r, other=1.0), FP8_MAX, EPS_, POW2)
        v = x.to(tl.float32) * scale[:, None]
        scale_col = _fp8_scale_from_amax(tl.load(amax_col_ptr + offs_c, mask=mask_c, other=1.0), FP8_MAX, EPS_,
                                         POW2)
        v_col = x.to(tl.float32) * scale_col[None, :]
        if pid_c == 0:
            tl.store(scale_ptr + offs_r, scale, mask=mask_r)
        if pid_r == 0:
            tl.store(scale_col_ptr + offs_c, scale_col, mask=mask_c)
        v_col = tl.clamp(v_col, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        q_col = _to_fp8(v_col, out_ptr.dtype.element_ty, MANT_BITS, MIN_EXP)
        tl.store(out_t_ptr + offs_c[None, :] * R + offs_r[:, None], q_col, mask=mask)
    v = tl.clamp(v, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = _to_fp8(v, out_ptr.dtype.element_ty, MANT_BITS, MIN_EXP)
    if WRITE_MAIN:
        tl.store(out_ptr + offs_r[:, None] * C + offs_c[None, :], q, mask=mask)
    if WRITE_T and MODE != 2:
        tl.store(out_t_ptr + offs_c[None, :] * R + offs_r[:, None], q, mask=mask)


def quantize(x: torch.Tensor, fp8_dtype: torch.dtype, mode: int, power_of_2: bool, write_main: bool,
             write_t: bool, out: torch.Tensor | None = None, out_t: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch amax + cast for a 2-D x (R, C). Returns (q (R, C) or empty, scale, q_t (C, R) or empty);
    scale is () for mode -1, (R, 1) for mode 1, (1, C) for mode 0, float32. `out` / `out_t` may be given
    (contiguous, the right shape and dtype), e.g. NaN-poisoned by tests."""
    assert x.dim() == 2 and mode in (-1, 0, 1)
    R, C = x.shape
    mant, min_exp = FP8_FORMATS[fp8_dtype]
    fp8_max = torch.finfo(fp8_dtype).max
    amax = torch.zeros(1 if mode == -1 else (R if mode == 1 else C), device=x.device, dtype=torch.float32)
    scale_shape = () if mode == -1 else ((R, 1) if mode == 1 else (1, C))
    scale = torch.empty(scale_shape, device=x.device, dtype=torch.float32)
    q = out if out is not None else torch.empty((R, C) if write_main else (0,), device=x.device, dtype=fp8_dtype)
    q_t = out_t if out_t is not None else torch.empty((C, R) if write_t else (0,), device=x.device,
                                                      dtype=fp8_dtype)
    assert q.is_contiguous() and q_t.is_contiguous() and q.dtype == q_t.dtype == fp8_dtype
    assert q.shape == ((R, C) if write_main else (0,)) and q_t.shape == ((C, R) if write_t else (0,))
    if R == 0 or C == 0:
        scale.fill_(fp8_max / EPS)
        return q, scale, q_t
    _launch(x, amax, amax, q, q_t, scale, scale, mode, fp8_max, power_of_2, mant, min_exp, write_main, write_t)
    return q, scale, q_t


def quantize_rows_and_cols(x: torch.Tensor, fp8_dtype: torch.dtype, power_of_2: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both operands a rowwise-scaled linear needs from one 2-D x (R, C), in one amax pass and one cast pass:
    (q (R, C) scaled per row, scale_rows (R, 1), q_t (C, R) = x.T scaled per column of x, scale_cols (1, C))."""
    assert x.dim() == 2
    R, C = x.shape
    mant, min_exp = FP8_FORMATS[fp8_dtype]
    fp8_max = torch.finfo(fp8_dtype).max
    amax_r = torch.zeros(R, device=x.device, dtype=torch.float32)
    amax_c = torch.zeros(C, device=x.device, dtype=torch.float32)
    scale_r = torch.empty((R, 1), device=x.device, dtype=torch.float32)
    scale_c = torch.empty((1, C), device=x.device, dtype=torch.float32)
    q = torch.empty((R, C), device=x.device, dtype=fp8_dtype)
    q_t = torch.empty((C, R), device=x.device, dtype=fp8_dtype)
    if R == 0 or C == 0:
        scale_r.fill_(fp8_max / EPS)
        scale_c.fill_(fp8_max / EPS)
        return q, scale_r, q_t, scale_c
    _launch(x, amax_r, amax_c, q, q_t, scale_r, scale_c, 2, fp8_max, power_of_2, mant, min_exp, True, True)
    return q, scale_r, q_t, scale_c


def _launch(x, amax, amax_col, q, q_t, scale, scale_col, mode, fp8_max, power_of_2, mant, min_exp,
            write_main, write_t) -> None:
    R, C = x.shape
    on_gpu = x.is_cuda
    block_r = 32 if on_gpu else 16
    block_c = min(256 if on_gpu else 64, triton.next_power_of_2(C))
    _fp8_amax_kernel[(triton.cdiv(R, block_r),)](
        x, amax, amax_col, R, C, x.stride(0), x.stride(1), MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c)
    tile = 64 if on_gpu else 32
    grid = (triton.cdiv(R, tile), triton.cdiv(C, tile))
    _fp8_cast_kernel[grid](
        x, amax, amax_col, q, q_t, scale, scale_col, R, C, x.stride(0), x.stride(1), MODE=mode, FP8_MAX=fp8_max,
        EPS_=EPS,
        POW2=power_of_2, MANT_BITS=mant, MIN_EXP=min_exp, WRITE_MAIN=write_main, WRITE_T=write_t,
        BLOCK_R=tile, BLOCK_C=tile)


@triton.jit
def _fp8_matmul_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sa, stride_sb,
                       FAST_ACCUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c = (a @ b) * (1 / scale_a)[:, None] * (1 / scale_b)[None, :] for fp8 a (M, K), b (K, N).

    Scales are per row of a / per column of b (stride_sa / stride_sb = 1) or one per tensor (stride 0). Tiles
    are visited in groups of GROUP_M rows so consecutive programs share b.

    Accumulation: Hopper's fp8 wgmma adds its products into an accumulator of reduced precision (not a full
    fp32 add), and Triton's default on sm90 (max_num_imprecise_acc = 2^30) lets one such accumulator run over
    the whole K loop: with K = B*T ~ 65k (the weight-gradient GEMM) the low bits of the sum are lost. Unless
    FAST_ACCUM, max_num_imprecise_acc=BLOCK_K makes the compiler give each K tile a fresh partial accumulator
    and add it into the fp32 one (one fp32 add per tile of at most BLOCK_K products, as cuBLASLt does without
    fast accumulation). FAST_ACCUM keeps the Hopper default (the forward GEMM of the recipes). Other GPUs
    (mma.sync, sm89) accumulate in fp32 either way.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K passes 2^31 at 262k x 8192
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if FAST_ACCUM:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=tl.float32)
        a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
        b_ptrs += tl.cast(stride_bk, tl.int64) * BLOCK_K  # int64: BLOCK_K steps of a long stride pass 2^31
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=offs_m < M, other=1.0)
    sb = tl.load(sb_ptr + offs_n * stride_sb, mask=offs_n < N, other=1.0)
    acc = acc * (1.0 / sa)[:, None] * (1.0 / sb)[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    mask_c = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c, mask=mask_c)


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Hopper: wgmma keeps the accumulator in registers only
# once per warpgroup, so 128x256 tiles fit (ptxas, sm_90a: <= 228 registers, no spills, <= 144 KB shared).
_GPU_CONFIGS = _configs([
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
    (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4),
])
# Ada (sm89, mma.sync, 99 KB shared): the 128x256 / 256x128 tiles and 128x128 at 4 warps spill 560-680 bytes
# per thread there (ptxas, sm_89), so they are replaced by 8-warp 128x128 tiles that do not.
_GPU_CONFIGS_SM89 = _configs([
    (128, 128, 128, 4, 8), (128, 128, 64, 4, 8), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4),
])


def gpu_configs(capability: tuple[int, int], fast_accum: bool = True) -> list[triton.Config]:
    """The FP8 GEMM's autotune configs for a GPU of `capability` (sm89 or newer). On Hopper without fast
    accumulation the per-tile partial accumulator doubles the accumulator registers: the 128x256 and 256x128
    tiles then spill (ptxas, sm_90a: 255 registers, 56-176 bytes each way), so they are left out."""
    if tuple(capability) < (9, 0):
        return _GPU_CONFIGS_SM89
    if fast_accum:
        return _GPU_CONFIGS
    return [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]


@functools.lru_cache(maxsize=None)
def _fp8_matmul_tuned(hopper: bool, fast_accum: bool):
    from ._compile import autotune_configs  # NANOTRAIN_AUTOTUNE=first: one config (the GPU check's first call)

    return triton.autotune(configs=autotune_configs(gpu_configs((9, 0) if hopper else (8, 9), fast_accum)),
                           key=["M", "N", "K", "stride_sa", "stride_sb"])(_fp8_matmul_kernel)


def matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
           out_dtype: torch.dtype, out: torch.Tensor | None = None, use_fast_accum: bool = False) -> torch.Tensor:
    """Launch the FP8 GEMM: a (M, K) fp8, b (K, N) fp8 (any strides), scale_a () or (M, 1), scale_b () or
    (1, N) float32 -> (M, N) in out_dtype (into `out` when given). Autotuned on a GPU, one small tile
    under the interpreter. use_fast_accum: Hopper's reduced-precision accumulation over all of K (faster);
    False adds each K tile into an fp32 accumulator (see _fp8_matmul_kernel)."""
    M, K = a.shape
    N = b.shape[1]
    assert b.shape[0] == K, f"fp8 matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain"
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype
    sa = scale_a.reshape(-1).to(torch.float32)
    sb = scale_b.reshape(-1).to(torch.float32)
    stride_sa = 1 if sa.numel() > 1 else 0
    stride_sb = 1 if sb.numel() > 1 else 0
    args = (a, b, out, sa, sb, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), stride_sa, stride_sb)
    if a.is_cuda:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        hopper = torch.cuda.get_device_capability(a.device) >= (9, 0)
        _fp8_matmul_tuned(hopper, bool(use_fast_accum))[grid](*args, FAST_ACCUM=bool(use_fast_accum))
    else:
        # the interpreter's cost is per loop iteration, not per element: long-K GEMMs (weight gradients, K = B*T)
        # take wide K tiles so that a K = 65536 test runs in seconds
        bm, bn, bk = 16, 16, (32 if K <= 1024 else 2048)
        _fp8_matmul_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
            *args, FAST_ACCUM=bool(use_fast_accum), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU that is not here (CI on CPU: GPU-only compile errors, shared memory and
# spills per config; kernels/_compile.py). Needs TRITON_INTERPRET unset. The example calls use the recipes'
# layouts: casts of a contiguous (R, C) tensor (bf16 activations and gradients, fp32 master weights); GEMMs
# with a row-major left operand and a column-major right one (the transposed copies of the casts).
# ----------------------------------------------------------------------------------------------------------
TRITON_FP8 = {"e4m3": "fp8e4nv", "e5m2": "fp8e5"}
_TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# (write_main, write_t) per cast mode, as nanotrain/ops/fp8.py calls them
CAST_WRITES = {-1: (True, True), 1: (True, False), 0: (False, True), 2: (True, True)}


def compile_for(kernel: str, capability: tuple[int, int], config: triton.Config | None = None, mode: int = -1,
                x_dtype: str = "bf16", fp8: str = "e4m3", b_fp8: str = "e4m3", rowwise: bool = False,
                out_dtype: str = "bf16", shape: tuple[int, int] = (8192, 768), fast_accum: bool = False) -> dict:
    """Compile one FP8 kernel for compute capability `capability` without a GPU.

    kernel "amax" / "cast": the launch `_launch` makes for an x of `shape` in `x_dtype` ("bf16"/"fp32"), cast
    `mode` (-1 tensor, 1 rows, 0 columns, 2 both) into `fp8` ("e4m3"/"e5m2"). kernel "matmul": one of
    gpu_configs(capability), a (`fp8`) x b (`b_fp8`) -> `out_dtype`, tensorwise or `rowwise` scales (needs sm89+),
    with Hopper's fast accumulation when `fast_accum`.
    Returns compile_kernel's dict (shared bytes, regs, spills, cubin, ptx).
    """
    from ._compile import compile_kernel

    R, C = shape
    if kernel in ("amax", "cast"):
        block_r = 32
        block_c = min(256, triton.next_power_of_2(C))
        x = f"*{x_dtype}"
        if kernel == "amax":
            args = dict(x_ptr=x, amax_ptr="*fp32", amax_col_ptr="*fp32", R=R, C=C, stride_xr=C, stride_xc=1,
                        MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c)
            return compile_kernel(_fp8_amax_kernel, capability, args)
        mant, min_exp = FP8_FORMATS[_TORCH_FP8[fp8]]
        write_main, write_t = CAST_WRITES[mode]
        q = f"*{TRITON_FP8[fp8]}"
        args = dict(x_ptr=x, amax_ptr="*fp32", amax_col_ptr="*fp32", out_ptr=q, out_t_ptr=q, scale_ptr="*fp32",
                    scale_col_ptr="*fp32", R=R, C=C, stride_xr=C, stride_xc=1, MODE=mode,
                    FP8_MAX=torch.finfo(_TORCH_FP8[fp8]).max, EPS_=EPS, POW2=rowwise, MANT_BITS=mant,
                    MIN_EXP=min_exp, WRITE_MAIN=write_main, WRITE_T=write_t, BLOCK_R=64, BLOCK_C=64)
        return compile_kernel(_fp8_cast_kernel, capability, args)
    if kernel != "matmul":
        raise ValueError(f"unknown kernel {kernel!r}")
    M, N, K = R, C, 4 * C
    stride_s = 1 if rowwise else 0
    args = dict(a_ptr=f"*{TRITON_FP8[fp8]}", b_ptr=f"*{TRITON_FP8[b_fp8]}", c_ptr=f"*{out_dtype}", sa_ptr="*fp32",
                sb_ptr="*fp32", M=M, N=N, K=K, stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K, stride_cm=N,
                stride_cn=1, stride_sa=stride_s, stride_sb=stride_s, FAST_ACCUM=fast_accum, **config.kwargs)
    return compile_kernel(_fp8_matmul_kernel, capability, args, config.num_warps, config.num_stages)
