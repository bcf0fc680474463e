"""Triton kernels for causal sliding-window (flash) attention: forward, backward, and KV-cache decode.

Math (per batch b, query head h, kv head hk = h // GROUPS, query position t):
    visible(t, s) = s <= t  and  s > t - window          (window >= T means plain causal)
    S[t, s]  = scale * <q[t], k[s]>                      (-inf where not visible)
    lse[t]   = log sum_s exp(S[t, s])                    (saved for the backward, fp32, natural log)
    P[t, s]  = exp(S[t, s] - lse[t]);  o[t] = sum_s P[t, s] v[s]
Backward (delta[t] = <do[t], o[t]>):
    dv[s] = sum_t P[t, s] do[t];  dS[t, s] = P[t, s] (<do[t], v[s]> - delta[t])
    dq[t] = scale * sum_s dS[t, s] k[s];  dk[s] = scale * sum_t dS[t, s] q[t]   (dk/dv summed over a GQA group)

Tensors stay in the model's (B, T, H, D) layout: the kernels take strides (the last dim must be
contiguous), so no transpose or copy is needed. Each program walks only the blocks that intersect
the window of its rows, so the work is proportional to T * window, not T^2; blocks wholly inside
the window skip the mask (only the diagonal and the window's left edge are masked). Softmax runs
online in fp32 with exp2 (log2(e) folded into the scale). The backward is deterministic: dK/dV
come from one program per key block that loops over the query heads of its GQA group, dQ from a
separate kernel; no atomics. Tile offsets are int64 at the tile's start (position * row stride passes 2^31 for
long sequences of wide rows) and int32 inside it.

Decode (Tq new queries against a KV cache) has B * H * cdiv(Tq, BLOCK_M) programs: for a batch-1 sample that
is a few dozen on a GPU of 132 SMs, so the KV range is split across programs (flash-decoding), each writing a
partial output and its log-sum-exp, combined after (combine_decode_splits).

This module never imports nanotrain; nanotrain.ops.attention owns dispatch, checks and autograd.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tile_ptrs(base, start, offs, stride, offs_d):
    """Pointers to the rows start + offs (x HEAD_DIM columns offs_d) of a (T, D) slice with row stride `stride`.
    The tile's start offset is int64 (position * stride passes 2^31 for a long sequence of wide rows); the
    offsets inside the tile stay int32 (cheap, and hoisted out of the key loops)."""
    return (base + tl.cast(start, tl.int64) * stride) + (offs[:, None] * stride + offs_d[None, :])


# ----------------------------------------------------------------------------------------------------------
# Block ranges. For the rows [start_m, start_m + BLOCK_M) the visible keys lie in [lo, hi); the key blocks in
# [mid_lo, mid_hi) are visible to every row of the block (no mask), the others need the mask.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _key_block_ranges(start_m, n_keys, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, n_keys)
    mid_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    mid_hi = (start_m + 1) // BLOCK_N * BLOCK_N
    mid_lo = tl.maximum(tl.minimum(mid_lo, mid_hi), lo)
    mid_hi = tl.maximum(mid_hi, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_block_ranges(start_n, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys [start_n, start_n + BLOCK_N): the query blocks that see them (the transpose of the above)."""
    lo = start_n // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N + window - 1, T)
    mid_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    mid_hi = tl.minimum(start_n + window, T) // BLOCK_M * BLOCK_M
    mid_lo = tl.maximum(tl.minimum(mid_lo, mid_hi), lo)
    mid_hi = tl.maximum(mid_hi, mid_lo)
    return lo, mid_lo, mid_hi, hi


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                         lo, hi, n_keys, window, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax accumulation of the key blocks [lo, hi) into (acc, l_i, m_i); logits in base 2."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            in_range = cols[:, None] < n_keys
            k = tl.load(_tile_ptrs(k_base, start_n, offs_n, stride_kt, offs_d), mask=in_range, other=0.0)
            v = tl.load(_tile_ptrs(v_base, start_n, offs_n, stride_vt, offs_d), mask=in_range, other=0.0)
        else:
            k = tl.load(_tile_ptrs(k_base, start_n, offs_n, stride_kt, offs_d))
            v = tl.load(_tile_ptrs(v_base, start_n, offs_n, stride_vt, offs_d))
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = ((cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - window)
                       & (cols[None, :] < n_keys))
            qk = tl.where(visible, qk, float("-inf"))
        # a NaN logit reaches the output through p below whatever m is; propagate_nan keeps m honest too
        m_new = tl.maximum(m_i, tl.max(qk, 1), propagate_nan=tl.PropagateNan.ALL)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, OUT, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    T, H, GROUPS, window, qk_scale, TUNE_T, TUNE_W, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """o = softmax(scale * q k^T, sliding-window causal mask) v and lse, for one (BLOCK_M rows, b, h) tile.

    Grid: (cdiv(T, BLOCK_M), B * H). qk_scale = scale * log2(e). LSE is (B, H, T) fp32, natural log.
    TUNE_T/TUNE_W/TUNE_BH are unused by the math: they key the autotuner (see tune_key).
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query blocks (most keys when causal) first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T

    q = tl.load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, start_m, tl.arange(0, BLOCK_M), stride_qt, offs_d),
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row with no visible key yet stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _key_block_ranges(start_m, T, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, lo, mid_lo, T, window, qk_scale, BLOCK_N, True)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, mid_lo, mid_hi, T, window, qk_scale, BLOCK_N, False)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, mid_hi, hi, T, window, qk_scale, BLOCK_N, True)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows past T only
    out = acc / l_safe[:, None]
    tl.store(_tile_ptrs(OUT + b * stride_ob + h * stride_oh, start_m, tl.arange(0, BLOCK_M), stride_ot, offs_d),
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + rows, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,
             mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_db, stride_dh,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, t] = sum_d do[b, t, h, d] * o[b, t, h, d] in fp32. Grid: (cdiv(T, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    rows = pid_m * BLOCK_M + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T
    o = tl.load(_tile_ptrs(OUT + b * stride_ob + h * stride_oh, pid_m * BLOCK_M, offs_m, stride_ot, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO + b * stride_dob + h * stride_doh, pid_m * BLOCK_M, offs_m, stride_dot, offs_d),
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_db + h * stride_dh + rows, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                              cols, offs_m, offs_d, lo, hi, T, window, qk_scale,
                              BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate the query blocks [lo, hi) of one query head into dk, dv (BLOCK_N, HEAD_DIM), fp32."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            row_ok = rows < T
            q = tl.load(_tile_ptrs(q_base, start_m, offs_m, stride_qt, offs_d), mask=row_ok[:, None], other=0.0)
            do = tl.load(_tile_ptrs(do_base, start_m, offs_m, stride_dot, offs_d), mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(_tile_ptrs(q_base, start_m, offs_m, stride_qt, offs_d))
            do = tl.load(_tile_ptrs(do_base, start_m, offs_m, stride_dot, offs_d))
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        p_t = tl.math.exp2(qk_t - (lse * 1.4426950408889634)[None, :])
        if MASKED:
            visible = ((cols[:, None] <= rows[None, :]) & (rows[None, :] < cols[:, None] + window)
                       & (rows[None, :] < T))
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    T, H_KV, GROUPS, window, qk_scale, sm_scale, TUNE_T, TUNE_W, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv for one block of BLOCK_N keys of one kv head, summed over its GROUPS query heads in order.

    Grid: (cdiv(T, BLOCK_N), B * H_KV). LSE and DELTA are (B, H, T) fp32.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < T

    k = tl.load(_tile_ptrs(K + b * stride_kb + hk * stride_kh, start_n, tl.arange(0, BLOCK_N), stride_kt, offs_d),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_tile_ptrs(V + b * stride_vb + hk * stride_vh, start_n, tl.arange(0, BLOCK_N), stride_vt, offs_d),
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _query_block_ranges(start_n, T, window, BLOCK_M, BLOCK_N)
    for g in range(GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + b * stride_lb + h * stride_lh
        delta_base = DELTA + b * stride_lb + h * stride_lh
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                           stride_dot, cols, offs_m, offs_d, lo, mid_lo, T, window, qk_scale,
                                           BLOCK_M, True)
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                           stride_dot, cols, offs_m, offs_d, mid_lo, mid_hi, T, window, qk_scale,
                                           BLOCK_M, False)
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                           stride_dot, cols, offs_m, offs_d, mid_hi, hi, T, window, qk_scale,
                                           BLOCK_M, True)

    tl.store(_tile_ptrs(DK + b * stride_dkb + hk * stride_dkh, start_n, tl.arange(0, BLOCK_N), stride_dkt, offs_d),
             (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(_tile_ptrs(DV + b * stride_dvb + hk * stride_dvh, start_n, tl.arange(0, BLOCK_N), stride_dvt, offs_d),
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                            lo, hi, T, window, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate the key blocks [lo, hi) into dq (BLOCK_M, HEAD_DIM), fp32 (unscaled)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            in_range = cols[:, None] < T
            k = tl.load(_tile_ptrs(k_base, start_n, offs_n, stride_kt, offs_d), mask=in_range, other=0.0)
            v = tl.load(_tile_ptrs(v_base, start_n, offs_n, stride_vt, offs_d), mask=in_range, other=0.0)
        else:
            k = tl.load(_tile_ptrs(k_base, start_n, offs_n, stride_kt, offs_d))
            v = tl.load(_tile_ptrs(v_base, start_n, offs_n, stride_vt, offs_d))
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            visible = ((cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - window)
                       & (cols[None, :] < T))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    stride_dqb, stride_dqt, stride_dqh,
    T, H, GROUPS, window, qk_scale, sm_scale, TUNE_T, TUNE_W, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq for one block of BLOCK_M queries of one head. Grid: (cdiv(T, BLOCK_M), B * H)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest blocks first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T

    q = tl.load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, start_m, tl.arange(0, BLOCK_M), stride_qt, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO + b * stride_dob + h * stride_doh, start_m, tl.arange(0, BLOCK_M), stride_dot, offs_d),
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _key_block_ranges(start_m, T, window, BLOCK_M, BLOCK_N)
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                 lo, mid_lo, T, window, qk_scale, BLOCK_N, True)
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                 mid_lo, mid_hi, T, window, qk_scale, BLOCK_N, False)
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                 mid_hi, hi, T, window, qk_scale, BLOCK_N, True)
    tl.store(_tile_ptrs(DQ + b * stride_dqb + h * stride_dqh, start_m, tl.arange(0, BLOCK_M), stride_dqt, offs_d),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Decode / prefill against a KV cache
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_decode_kernel(
    Q, KC, VC, SEQLENS, OUT, OPART, LPART,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    TQ, H, GROUPS, window, qk_scale, SPLIT_LEN, TUNE_T, TUNE_W, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """The TQ newest queries of row b (at positions n - TQ .. n - 1, n = SEQLENS[b]) against cache[b, :n].

    Same math as the forward. Grid: (cdiv(TQ, BLOCK_M), B * H, splits). Without SPLIT (one split) the program
    walks every visible key block and stores the output. With SPLIT (flash-decoding: a batch-1 decode has only
    B * H programs, too few to fill the GPU) program z walks only the keys [lo + z * SPLIT_LEN, lo + (z + 1) *
    SPLIT_LEN) of its block's visible range [lo, hi) (the last split to hi; SPLIT_LEN a multiple of BLOCK_N) and
    stores its normalized partial output in OPART (splits, B, H, TQ, HEAD_DIM) fp32 and its log2-sum-exp2 in
    LPART (splits, B, H, TQ) fp32 (-inf where it saw no key), for combine_decode_splits.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    n = tl.load(SEQLENS + b).to(tl.int32)
    idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the new queries
    start_m = n - TQ + pid_m * BLOCK_M               # absolute position of the block's first query
    rows = n - TQ + idx
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = idx < TQ

    first = pid_m * BLOCK_M                          # index of the block's first query among the new ones
    q = tl.load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, first, tl.arange(0, BLOCK_M), stride_qt, offs_d),
                mask=row_ok[:, None], other=0.0)
    k_base = KC + b * stride_kb + hk * stride_kh
    v_base = VC + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _key_block_ranges(tl.maximum(start_m, 0), n, window, BLOCK_M, BLOCK_N)
    if SPLIT:  # intersect the three ranges with this program's chunk (aligned: lo and SPLIT_LEN are)
        split = tl.program_id(2)
        c_lo = lo + split * SPLIT_LEN
        c_hi = tl.where(split == tl.num_programs(2) - 1, hi, c_lo + SPLIT_LEN)
        lo = tl.maximum(lo, c_lo)
        mid_lo = tl.minimum(tl.maximum(mid_lo, c_lo), c_hi)
        mid_hi = tl.minimum(tl.maximum(mid_hi, c_lo), c_hi)
        hi = tl.minimum(hi, c_hi)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, lo, mid_lo, n, window, qk_scale, BLOCK_N, True)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, mid_lo, mid_hi, n, window, qk_scale, BLOCK_N, False)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n,
                                         offs_d, mid_hi, hi, n, window, qk_scale, BLOCK_N, True)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if SPLIT:
        part = (tl.program_id(2).to(tl.int64) * tl.num_programs(1) + pid_bh) * TQ + idx  # (split, b, h, t)
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
        tl.store(LPART + part, tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf")), mask=row_ok)
    else:
        tl.store(_tile_ptrs(OUT + b * stride_ob + h * stride_oh, first, tl.arange(0, BLOCK_M), stride_ot, offs_d),
                 (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Launch configurations: a short list per GPU generation, autotuned per (T, window, head_dim); one small fixed
# config under the interpreter (CPU tests), where autotuning would only burn time.
# ----------------------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETER_META = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
    "decode": dict(BLOCK_N=16),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
_GPU_CONFIGS = {
    "sm90": {  # D=128 at 8 warps: no register spills in the first config of each (ptxas, sm_90a)
        "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)],
        "dkdv": [(64, 64, 8, 3), (32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        "decode": [(0, 64, 4, 3), (0, 128, 8, 3), (0, 32, 4, 2)],
    },
    "sm80": {  # mma.sync keeps operands in registers: smaller tiles than Hopper
        "fwd": [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
        "dkdv": [(64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 4, 2), (16, 64, 4, 2)],
        "dq": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2)],
        "decode": [(0, 64, 4, 2), (0, 32, 4, 2), (0, 128, 8, 2)],
    },
    # sm86/sm89 and consumer Blackwell: ~100 KB of shared memory per SM
    "sm8x": {
        "fwd": [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3), (128, 64, 4, 2)],
        "dkdv": [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (16, 64, 4, 2)],
        "dq": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2), (32, 32, 4, 2)],
        "decode": [(0, 64, 4, 2), (0, 32, 4, 2)],
    },
}

_KERNELS = {
    "fwd": _attention_fwd_kernel,
    "dkdv": _attention_bwd_dkdv_kernel,
    "dq": _attention_bwd_dq_kernel,
    "decode": _attention_decode_kernel,
}
# Buckets, not exact T: evaluation calls attention at many lengths and must not re-tune for each one.
# Besides the buckets of tune_key: the head dim, the GQA group size (the dK/dV kernel loops over it; it sets how
# often K/V tiles are re-read from L2), and for decode its query tile and whether the KV length is split.
_TUNE_KEYS = {"fwd": ["TUNE_T", "TUNE_W", "TUNE_BH", "HEAD_DIM", "GROUPS"],
              "dkdv": ["TUNE_T", "TUNE_W", "TUNE_BH", "HEAD_DIM", "GROUPS"],
              "dq": ["TUNE_T", "TUNE_W", "TUNE_BH", "HEAD_DIM", "GROUPS"],
              "decode": ["TUNE_T", "TUNE_W", "TUNE_BH", "HEAD_DIM", "GROUPS", "BLOCK_M", "SPLIT"]}


def _bucket(n: int) -> int:
    """The power of 2 at or above n (at least 16): the autotuner's key for a length."""
    return max(16, triton.next_power_of_2(int(n)))


def tune_key(n_keys: int, window: int | None, batch_heads: int) -> tuple[int, int, int]:
    """(TUNE_T, TUNE_W, TUNE_BH): the autotuner's buckets for a call over `n_keys` keys, `window` and a grid of
    `batch_heads` (B * heads) columns.

    TUNE_W is 0 for a full causal layer (window None or >= n_keys) and the bucket of the window otherwise, so a
    short-window layer never shares a key, and so a tuned config, with a full one of the same length (a window
    of 1025 and a full 2048 land in the same power-of-2 bucket, with half the work per row). TUNE_BH separates
    grids that fill the GPU from those that do not (a batch-1 evaluation against a training batch).
    """
    w = _effective_window(window, n_keys)
    return _bucket(n_keys), (0 if w >= n_keys else _bucket(w)), _bucket(batch_heads)


def gpu_generation(capability: tuple[int, int]) -> str:
    """The config family for a compute capability: sm90 (Hopper, datacenter Blackwell), sm80 (A100), sm8x."""
    major, minor = capability
    if major in (9, 10):
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "sm8x"


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, generation: str):
    configs = []
    for bm, bn, warps, stages in _GPU_CONFIGS[generation][kind]:
        meta = {"BLOCK_N": bn} if kind == "decode" else {"BLOCK_M": bm, "BLOCK_N": bn}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    from ._compile import autotune_configs  # NANOTRAIN_AUTOTUNE=first: one config (the GPU check's first call)

    return triton.autotune(configs=autotune_configs(configs), key=_TUNE_KEYS[kind])(_KERNELS[kind])


def _launch(kind: str, device: torch.device, grid_rows: int, grid_cols: int, *args, grid_z: int = 1,
            **constexprs) -> None:
    """Run kernel `kind` over grid (cdiv(grid_rows, BLOCK_M or BLOCK_N), grid_cols, grid_z)."""
    block_key = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if interpreting() or device.type != "cuda":
        meta = dict(_INTERPRETER_META[kind], **constexprs)
        kernel = _KERNELS[kind]
        kernel[(triton.cdiv(grid_rows, meta[block_key]), grid_cols, grid_z)](*args, **meta)
        return
    kernel = _tuned(kind, gpu_generation(torch.cuda.get_device_capability(device)))

    def grid(meta):
        return (triton.cdiv(grid_rows, meta[block_key]), grid_cols, grid_z)

    kernel[grid](*args, **constexprs)


# ----------------------------------------------------------------------------------------------------------
# Launchers (tensors in, tensors out; no autograd here)
# ----------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _effective_window(window: int | None, n_keys: int) -> int:
    return n_keys if window is None or window >= n_keys else int(window)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float,
                  out: torch.Tensor | None = None, lse: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q: (B, T, H, D), k/v: (B, T, Hkv, D) -> out (B, T, H, D) in q's dtype, lse (B, H, T) fp32.

    `out`/`lse` may be given (tests pass NaN-filled buffers to catch unwritten elements).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32) if lse is None else lse
    assert out.stride(-1) == 1 and lse.stride(-1) == 1
    _launch("fwd", q.device, T, B * H,
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            T, H, H // Hkv, _effective_window(window, T), scale * LOG2E,
            *tune_key(T, window, B * H), HEAD_DIM=D)
    return out, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, window: int | None, scale: float,
                  dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq (B,T,H,D), dk, dv (B,T,Hkv,D)) in the inputs' dtypes. Deterministic (no atomics)."""
    do, q, k, v, out = (_last_dim_contiguous(x) for x in (do, q, k, v, out))
    lse = lse.contiguous()
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    w = _effective_window(window, T)
    dq = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) if dq is None else dq
    dk = torch.empty((B, T, Hkv, D), device=k.device, dtype=k.dtype) if dk is None else dk
    dv = torch.empty((B, T, Hkv, D), device=v.device, dtype=v.dtype) if dv is None else dv
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    block = 16 if interpreting() else 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(T, block), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        delta.stride(0), delta.stride(1),
        T, H, HEAD_DIM=D, BLOCK_M=block)
    _launch("dkdv", q.device, T, B * Hkv,
            q, k, v, do, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            T, Hkv, H // Hkv, w, scale * LOG2E, scale, *tune_key(T, window, B * Hkv),
            HEAD_DIM=D)
    _launch("dq", q.device, T, B * H,
            q, k, v, do, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            T, H, H // Hkv, w, scale * LOG2E, scale, *tune_key(T, window, B * H),
            HEAD_DIM=D)
    return dq, dk, dv


_SPLIT_ALIGN = 128  # a split's key count is a multiple of every BLOCK_N the decode configs use
_MIN_SPLIT_KEYS = 256  # below this many keys per split the combine costs more than the extra programs gain


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(programs: int, key_span: int, sm_count: int) -> int:
    """How many chunks to split a decode's KV range into: enough that `programs` (cdiv(Tq, BLOCK_M) * B * H)
    times the splits fill `sm_count` SMs, keeping at least _MIN_SPLIT_KEYS of the `key_span` keys each."""
    if programs >= sm_count:
        return 1
    return max(1, min(triton.cdiv(sm_count, programs), key_span // _MIN_SPLIT_KEYS))


def check_decode_lengths(tq: int, t_max: int, cache_seqlens: torch.Tensor) -> None:
    """Raise ValueError unless the Tq new queries fit the cache (Tq <= Tmax) and every row's cache length n
    holds them and fits it (Tq <= n <= Tmax): beyond that the kernel would read past the cache or place the
    queries at negative positions. Reading the lengths synchronizes with the GPU once per call."""
    if tq > t_max:
        raise ValueError(f"attention_decode: {tq} new queries do not fit a KV cache of {t_max} positions; "
                         "use a cache at least as long as the prompt")
    if cache_seqlens.numel():
        lo, hi = (int(v) for v in torch.aminmax(cache_seqlens))
        if hi > t_max:
            raise ValueError(f"attention_decode: cache_seqlens reaches {hi}, past the cache's {t_max} positions; "
                             "keep every length <= the cache length (allocate a longer cache)")
        if lo < tq:
            raise ValueError(f"attention_decode: cache_seqlens has a row of {lo} < the {tq} new queries; each "
                             "row's length must count the new tokens (write them into the cache first)")


def combine_decode_splits(o_part: torch.Tensor, lse2_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The flash-decoding reduction: out (B, Tq, H, D) = sum_z w_z o_z / sum_z w_z with w_z = 2^(lse2_z - max),
    from the splits' partial outputs o_part (Z, B, H, Tq, D) and log2-sum-exp2 lse2_part (Z, B, H, Tq) fp32."""
    m = lse2_part.amax(dim=0)
    w = torch.exp2(lse2_part - m)                                        # (Z, B, H, Tq); 0 for empty splits
    o = (w[..., None] * o_part).sum(dim=0) / w.sum(dim=0)[..., None]     # (B, H, Tq, D)
    out.copy_(o.transpose(1, 2))
    return out


@dataclass(frozen=True)
class DecodePlan:
    """How a decode call runs (the same for every backend that launches _attention_decode_kernel): the query tile
    BLOCK_M, the effective window, the number of KV splits (1: no split) and the keys per split."""
    block_m: int
    window: int
    splits: int
    split_len: int


def plan_decode(q: torch.Tensor, t_max: int, window: int | None, num_splits: int | None = None) -> DecodePlan:
    """The plan of a decode of q (B, Tq, H, D) against a cache of t_max positions: BLOCK_M the power of 2 at or
    above Tq within [16, 64]; the split count from decode_splits on a GPU (1 elsewhere) unless `num_splits`
    forces one, capped so that every split keeps _SPLIT_ALIGN keys of the visible span."""
    B, Tq, H, _ = q.shape
    block_m = max(16, min(64, triton.next_power_of_2(Tq)))
    w = _effective_window(window, t_max)
    key_span = min(w + block_m + _SPLIT_ALIGN, t_max)  # an upper bound of a query block's visible keys
    if num_splits is None:
        on_gpu = q.device.type == "cuda" and not interpreting()
        programs = triton.cdiv(Tq, block_m) * B * H
        num_splits = decode_splits(programs, key_span, _sm_count(q.device)) if on_gpu else 1
    num_splits = max(1, min(int(num_splits), triton.cdiv(key_span, _SPLIT_ALIGN)))
    split_len = triton.cdiv(triton.cdiv(key_span, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return DecodePlan(block_m, w, num_splits, split_len)


# launch(plan, q, k_cache, v_cache, cache_seqlens, out, o_part, l_part, window, scale): one run of
# _attention_decode_kernel as `plan` says; o_part/l_part are None without a split.
DecodeLaunch = Callable[..., None]


def run_decode(launch: DecodeLaunch, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               cache_seqlens: torch.Tensor, window: int | None, scale: float, out: torch.Tensor | None = None,
               num_splits: int | None = None) -> torch.Tensor:
    """The decode flow around one kernel launch, shared by the Triton (JIT) and the ahead-of-time backends so
    that both split and combine alike: the length checks, the plan, the split buffers, `launch`, the combine of
    the splits. Raises ValueError for lengths that do not fit the cache (check_decode_lengths)."""
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    B, Tq, H, D = q.shape
    check_decode_lengths(Tq, k_cache.shape[1], cache_seqlens)
    out = torch.empty((B, Tq, H, D), device=q.device, dtype=q.dtype) if out is None else out
    plan = plan_decode(q, k_cache.shape[1], window, num_splits)
    o_part = l_part = None
    if plan.splits > 1:
        o_part = torch.empty((plan.splits, B, H, Tq, D), device=q.device, dtype=torch.float32)
        l_part = torch.empty((plan.splits, B, H, Tq), device=q.device, dtype=torch.float32)
    launch(plan, q, k_cache, v_cache, cache_seqlens.contiguous(), out, o_part, l_part, window, scale)
    if plan.splits > 1:
        combine_decode_splits(o_part, l_part, out)
    return out


def _triton_decode_launch(plan: DecodePlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cache_seqlens: torch.Tensor, out: torch.Tensor, o_part: torch.Tensor | None,
                          l_part: torch.Tensor | None, window: int | None, scale: float) -> None:
    B, Tq, H, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    o_part = out if o_part is None else o_part  # unused without a split
    l_part = out if l_part is None else l_part
    _launch("decode", q.device, Tq, B * H,
            q, k_cache, v_cache, cache_seqlens, out, o_part, l_part,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            Tq, H, H // Hkv, plan.window, scale * LOG2E, plan.split_len, *tune_key(Tmax, window, B * H),
            grid_z=plan.splits, HEAD_DIM=D, BLOCK_M=plan.block_m, SPLIT=plan.splits > 1)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     window: int | None, scale: float, out: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """Tq new queries against a KV cache. q: (B, Tq, H, D); caches (B, Tmax, Hkv, D); cache_seqlens (B,).

    The KV range is split across programs (flash-decoding) when cdiv(Tq, BLOCK_M) * B * H programs would
    leave SMs idle (a batch-1 sample); `num_splits` forces a split count (tests; 1 = never split). Raises
    ValueError for lengths that do not fit the cache (check_decode_lengths).
    """
    return run_decode(_triton_decode_launch, q, k_cache, v_cache, cache_seqlens, window, scale, out, num_splits)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU that is not here (CI on CPU: catches GPU-only compile errors and shows
# shared memory / spills per config). Needs TRITON_INTERPRET unset (the interpreter replaces @triton.jit).
# ----------------------------------------------------------------------------------------------------------
_POINTERS = {
    "fwd": ["Q", "K", "V", "OUT", "LSE"],
    "dkdv": ["Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV"],
    "dq": ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ"],
    "decode": ["Q", "KC", "VC", "SEQLENS", "OUT", "OPART", "LPART"],
}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
_FP32_POINTERS = {"LSE", "DELTA", "OPART", "LPART"}


def compile_for(kind: str, capability: tuple[int, int], head_dim: int, config: tuple[int, int, int, int],
                dtype: str = "bf16", groups: int = 1, split: bool = False) -> dict:
    """Compile kernel `kind` for a GPU of `capability` without one (kernels/_compile.py), as a (B, T=2048, H=6,
    head_dim) call with H // Hkv = `groups` would (decode: split across programs when `split`); returns shared
    bytes, registers, spills, the cubin and PTX."""
    from ._compile import compile_kernel

    bm, bn, warps, stages = config
    T, H = 2048, 6
    args = {"HEAD_DIM": head_dim, "BLOCK_N": bn, "BLOCK_M": bm if kind != "decode" else 16}
    if kind == "decode":
        args.update(SPLIT=split, SPLIT_LEN=512, TUNE_W=1024, TUNE_BH=16)
    for name in _KERNELS[kind].arg_names:
        if name in args:
            continue
        if name in _POINTERS[kind]:
            args[name] = "*fp32" if name in _FP32_POINTERS else ("*i32" if name == "SEQLENS" else f"*{dtype}")
        elif name in _FLOAT_ARGS:
            args[name] = 0.125
        elif name in ("stride_lb", "stride_lh", "stride_db", "stride_dh"):  # LSE / DELTA: (B, H, T) fp32
            args[name] = {"b": H * T, "h": T}[name[-1]]
        elif name.startswith("stride_"):  # (B, T, H, D) tensors, the last dim contiguous
            args[name] = {"b": T * H * head_dim, "t": H * head_dim, "h": head_dim}[name[-1]]
        else:
            args[name] = {"GROUPS": groups, "H": H, "H_KV": H // groups, "TQ": 1, "window": T // 2}.get(name, T)
    return compile_kernel(_KERNELS[kind], capability, args, warps, stages)
