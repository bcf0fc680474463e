"""Attention benchmark: the fused sliding-window Triton kernels against the strongest peers on the same device
in the same run, at the model shapes of benchmarks/shapes.py.

Shapes: bf16, the d26 model's heads (13 x 128; d20's 10 x 128 too without --quick), T = 2048, B = 8 sequences
(a quarter of the micro-batch: rates are per FLOP, so comparable), windows full causal and the model's short
window (1025 at T = 2048). Providers:
  triton     nanotrain.ops.attention.triton_attention, (B, T, H, D) inputs as the model makes them
  sdpa       torch SDPA, flash backend, is_causal (full causal only: it has no sliding window)
  flex       torch.compile'd FlexAttention with a sliding-window BlockMask (skips empty blocks too)
  reference  nanotrain.ops.attention.reference (dense masked softmax), forward only
Peers get their preferred (B, H, T, D) contiguous layout, made outside the timed region. The triton rows carry
the speed-up over sdpa (full) or flex (windowed), and the max error of a bf16 output vs the fp32 reference.

FLOPs count only what lies inside the window: forward 4 * B * H * D * sum_t min(t + 1, window) (QK^T and PV,
2 FLOPs per multiply-add), backward 2.5x the forward, so forward+backward is 3.5x. % of limit: over the
device's measured dense bf16 matmul rate (common.limits()).

Also: a d20 stack (20 layers, SSSL windows from nanotrain.scaling.window_sizes) forward+backward through the
Triton kernels, against the same stack all full causal (the peer).

Run:  python benchmarks/bench_attention.py [--quick]    (rows to the results file, table to stdout)
      python -m pytest -q benchmarks/bench_attention.py   (the same as a gpu-marked test)
Needs CUDA (collect() raises common.NeedsCUDA without it).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: timing, measured limits, the row format)
import shapes  # noqa: E402  (benchmarks/shapes.py: the model shapes)

B = 8
DTYPE = torch.bfloat16
PEERS = {"full": "sdpa", "windowed": "flex"}


# ------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------
def visible_pairs(T: int, window: int | None) -> int:
    """sum_t min(t + 1, window): the (query, key) pairs inside the causal window."""
    w = T if window is None else min(window, T)
    return sum(min(t + 1, w) for t in range(T))


def attention_flops(B: int, T: int, H: int, D: int, window: int | None, backward: bool) -> float:
    """FLOPs of one attention call (forward, or forward+backward) counting only the pairs inside the window."""
    fwd = 4.0 * B * H * D * visible_pairs(T, window)
    return fwd * (3.5 if backward else 1.0)


# ------------------------------------------------------------------------------------------------------
# Providers: each returns fn(backward: bool) -> a closure that runs one timed step, or None if it
# cannot serve this window.
# ------------------------------------------------------------------------------------------------------
def _inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype = DTYPE):
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    return q, k, v, do


def _bhtd(*xs):
    """(B, T, H, D) -> contiguous (B, H, T, D) leaves for the peers."""
    return [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in xs]


def _step(forward, inputs, do, backward: bool):
    if not backward:
        def run():
            with torch.no_grad():
                forward(*inputs)
        return run

    def run():
        out = forward(*inputs)
        torch.autograd.grad(out, inputs, do)
    return run


def provider_triton(q, k, v, do, window, backward):
    from nanotrain.ops.attention import triton_attention

    return _step(lambda a, b, c: triton_attention(a, b, c, window), (q, k, v), do, backward)


def provider_sdpa(q, k, v, do, window, backward):
    if window is not None and window < q.shape[1]:
        return None  # SDPA's flash kernel has no sliding window (a dense mask would leave the flash path)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = _bhtd(q, k, v)
    doh = do.transpose(1, 2).contiguous()
    gqa = q.shape[2] != k.shape[2]

    def forward(a, b, c):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)
    return _step(forward, (qh, kh, vh), doh, backward)


_FLEX = {}


def provider_flex(q, k, v, do, window, backward):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Tq = q.shape[1]
    w = Tq if window is None else min(window, Tq)

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < w)

    mask = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=Tq, KV_LEN=Tq, device="cuda")
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    qh, kh, vh = _bhtd(q, k, v)
    doh = do.transpose(1, 2).contiguous()
    gqa = q.shape[2] != k.shape[2]
    return _step(lambda a, b, c: flex(a, b, c, block_mask=mask, enable_gqa=gqa), (qh, kh, vh), doh, backward)


def provider_reference(q, k, v, do, window, backward):
    if backward:
        return None  # the dense reference's backward at B*T = 16384 measures the allocator, not attention
    from nanotrain.ops.attention import reference

    return _step(lambda a, b, c: reference(a, b, c, window), (q, k, v), do, backward)


PROVIDERS = {"triton": provider_triton, "sdpa": provider_sdpa, "flex": provider_flex, "reference": provider_reference}


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def correctness_guard(H: int, D: int, window: int | None) -> tuple[float, float]:
    """(max error of the bf16 Triton output vs the fp32 reference, the bf16 reference's own) at a mid shape."""
    from nanotrain.ops.attention import reference, triton_attention

    q, k, v, _ = _inputs(1, 1024, H, H, D)
    with torch.no_grad():
        ref = reference(q.float(), k.float(), v.float(), window)
        got = triton_attention(q, k, v, window).float()
        own = reference(q, k, v, window).float()
    return (got - ref).abs().max().item(), (own - ref).abs().max().item()


def shape_text(s: shapes.ModelShape, window: int | None) -> str:
    return f"{s.name} B={B} T={s.seq_len} H={s.n_head} D={s.head_dim} w={window or 'full'}"


def measure_shape(s: shapes.ModelShape, peak: float, reps: int) -> list[common.Row]:
    """Every provider x window x pass at model shape s, the triton rows with their speed-up over the peer."""
    rows: list[common.Row] = []
    q, k, v, do = _inputs(B, s.seq_len, s.n_head, s.n_kv_head, s.head_dim)
    for window in (None, s.short_window):
        err, base = correctness_guard(s.n_head, s.head_dim, window)
        guard_ok = err <= 2 * base + 1e-5
        for backward in (False, True):
            op = "fwd+bwd" if backward else "fwd"
            flops = attention_flops(B, s.seq_len, s.n_head, s.head_dim, window, backward)
            times: dict[str, common.Row] = {}
            for name, provider in PROVIDERS.items():
                try:
                    fn = provider(q, k, v, do, window, backward)
                    if fn is None:
                        continue
                    ms, mem = common.measure(fn, repeats=reps)
                except Exception as e:  # noqa: BLE001 - a peer that fails here is recorded, not fatal
                    rows.append(common.Row("attention", op, name, shape_text(s, window), status="error",
                                           note=f"{type(e).__name__}: {e}"[:300]))
                    continue
                rate = common.tflops(flops, ms)
                times[name] = common.Row("attention", op, name, shape_text(s, window), ms=ms, rate=rate,
                                         unit="TFLOP/s", pct_of_limit=100 * rate / peak, limit="bf16 matmul",
                                         peak_mb=mem)
                torch.cuda.empty_cache()
            peer = PEERS["full" if window is None else "windowed"]
            if "triton" in times:
                t = times["triton"]
                t.note = f"bf16 max err {err:.2e} vs fp32 ref (bf16 ref's own {base:.2e})"
                if not guard_ok:
                    t.status = "error"
                    t.note = "WRONG: " + t.note
                if peer in times:
                    t.vs_peer, t.peer = times[peer].ms / t.ms, peer
            rows.extend(times.values())
    return rows


def d20_stack(reps: int, peak: float) -> common.Row:
    """Forward+backward of the attention calls of a d20 model (B=8): SSSL windows vs the same stack all full."""
    from nanotrain.ops.attention import triton_attention

    s = shapes.SHAPES["d20"]
    windows = s.windows()
    layers = [_inputs(B, s.seq_len, s.n_head, s.n_kv_head, s.head_dim) for _ in range(4)]  # reused round-robin

    def stack(ws):
        def run():
            for i, w in enumerate(ws):
                q, k, v, do = layers[i % len(layers)]
                out = triton_attention(q, k, v, w)
                torch.autograd.grad(out, (q, k, v), do)
        return run

    t_sssl, mem = common.measure(stack(windows), warmup=2, repeats=reps)
    t_full, _ = common.measure(stack([None] * s.depth), warmup=2, repeats=reps)
    flops = sum(attention_flops(B, s.seq_len, s.n_head, s.head_dim, w, True) for w in windows)
    rate = common.tflops(flops, t_sssl)
    return common.Row("attention", f"{s.depth}-layer stack fwd+bwd", "triton", f"{s.name} B={B} T={s.seq_len} "
                      f"H={s.n_head} D={s.head_dim} SSSL", ms=t_sssl, rate=rate, unit="TFLOP/s",
                      pct_of_limit=100 * rate / peak, limit="bf16 matmul", vs_peer=t_full / t_sssl,
                      peer="same stack all full", peak_mb=mem,
                      note=f"the windows save {100 * (1 - t_sssl / t_full):.0f}% of the all-full stack's time")


def collect(quick: bool = False) -> list[common.Row]:
    """The benchmark's rows: d26 (and d20 unless quick) at full and short window, then the d20 stack."""
    common.require_cuda("the attention benchmark")
    torch.manual_seed(0)
    peak = common.limits()["matmul"]
    reps = 10 if quick else 30
    rows: list[common.Row] = []
    for name in (["d26"] if quick else ["d20", "d26"]):
        rows += measure_shape(shapes.SHAPES[name], peak, reps)
        torch.cuda.empty_cache()
    rows.append(d20_stack(max(3, reps // 5), peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main("attention", collect, argv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_attention():
    """The quick table, recorded; every triton row must pass its correctness guard and the windows must save time."""
    rows = [common.record(r) for r in collect(quick=True)]
    print("\n" + common.table(rows))
    triton = [r for r in rows if r.provider == "triton"]
    assert triton and all(r.status == "ok" for r in triton), [r.note for r in triton if r.status != "ok"]
    assert rows[-1].vs_peer > 1.0, "the SSSL windows must save time over an all-full stack"


if __name__ == "__main__":
    sys.exit(main())
