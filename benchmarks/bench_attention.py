"""Attention benchmark: our fused sliding-window Triton kernels against the strongest peers on the same
device in the same run, at the shapes of issue 8.

Shapes: bf16, D = 128, H * D = 2048 (H = 16), T = 2048, B * T = 16384 tokens (B = 8); windows full
causal and 768 (the issue's SSSL short window; the model's own short window at T = 2048 is 1025, also
measured). Providers:
  triton     nanotrain.ops.attention.triton_attention, (B, T, H, D) inputs as the model makes them
  sdpa       torch SDPA, flash backend, is_causal (full causal only: it has no sliding window)
  flex       torch.compile'd FlexAttention with a sliding-window BlockMask (skips empty blocks too)
  reference  nanotrain.ops.attention.reference (dense masked softmax), forward only at these shapes
Peers get their preferred (B, H, T, D) contiguous layout, made outside the timed region.

FLOPs count only what lies inside the window: forward 4 * B * H * D * sum_t min(t + 1, window)
(QK^T and PV, 2 FLOPs per multiply-add), backward 2.5x the forward, so forward+backward is 3.5x.
The limit is the device's measured dense bf16 matmul rate (8192^3).

Also: a d20-shaped SSSL stack (20 layers, 10 heads of 128, windows from nanotrain.scaling.window_sizes
with T = 2048) forward+backward through the Triton kernels, against the same stack all full causal.

Run:  python benchmarks/bench_attention.py        (table to stdout; JSON to $OUT or benchmarks/out/)
      python -m pytest -q benchmarks/bench_attention.py -s   (pytest-benchmark, pedantic mode, one row
                                                              per provider x window x pass; gpu-marked)
Skipped without CUDA.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: CUDA-event timing, measured limits, commit)
import torch.nn.functional as F

B, T, H, D = 8, 2048, 16, 128
WINDOWS: list[int | None] = [None, 768, 1025]
DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------------------------------
# FLOPs, timing, device facts
# ------------------------------------------------------------------------------------------------------
def visible_pairs(T: int, window: int | None) -> int:
    """sum_t min(t + 1, window): the (query, key) pairs inside the causal window."""
    w = T if window is None else min(window, T)
    return sum(min(t + 1, w) for t in range(T))


def attention_flops(B: int, T: int, H: int, D: int, window: int | None, backward: bool) -> float:
    fwd = 4.0 * B * H * D * visible_pairs(T, window)
    return fwd * (3.5 if backward else 1.0)








# ------------------------------------------------------------------------------------------------------
# Providers: each returns fn(backward: bool) -> a closure that runs one timed step, or None if it
# cannot serve this window.
# ------------------------------------------------------------------------------------------------------
def _inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype=DTYPE):
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
def correctness_guard(window: int | None) -> float:
    """Max error of the bf16 Triton output vs the float32 reference at a mid shape (timed kernels must be right)."""
    from nanotrain.ops.attention import reference, triton_attention

    q, k, v, _ = _inputs(1, 1024, 4, 4, D)
    with torch.no_grad():
        ref = reference(q.float(), k.float(), v.float(), window)
        got = triton_attention(q, k, v, window).float()
        own = reference(q, k, v, window).float()
    err, base = (got - ref).abs().max().item(), (own - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"triton bf16 error {err:.3e} > 2x reference's own {base:.3e}"
    return err


def d20_stack(reps: int) -> dict:
    """Forward+backward of the attention calls of a d20 model (T=2048, B=8): SSSL windows vs all-full."""
    from nanotrain.ops.attention import triton_attention
    from nanotrain.scaling import model_shape, window_sizes

    n_layer = 20
    model_dim, n_head = model_shape(n_layer)
    head_dim = model_dim // n_head
    windows = window_sizes("SSSL", n_layer, T)
    layers = [_inputs(B, T, n_head, n_head, head_dim) for _ in range(4)]  # 4 input sets reused round-robin

    def stack(ws):
        def run():
            for i, w in enumerate(ws):
                q, k, v, do = layers[i % len(layers)]
                out = triton_attention(q, k, v, w)
                torch.autograd.grad(out, (q, k, v), do)
        return run

    t_sssl = common.cuda_time_ms(stack(windows), warmup=2, repeats=reps)
    t_full = common.cuda_time_ms(stack([None] * n_layer), warmup=2, repeats=reps)
    flops_sssl = sum(attention_flops(B, T, n_head, head_dim, w, True) for w in windows)
    flops_full = n_layer * attention_flops(B, T, n_head, head_dim, None, True)
    return dict(n_layer=n_layer, n_head=n_head, head_dim=head_dim, B=B, T=T,
                windows=[w if w is not None else "full" for w in windows],
                ms_sssl=t_sssl, ms_full=t_full, saving=1 - t_sssl / t_full,
                tflops_sssl=flops_sssl / (t_sssl * 1e-3) / 1e12, tflops_full=flops_full / (t_full * 1e-3) / 1e12)


def run(reps: int = 30) -> dict:
    torch.manual_seed(0)
    results: dict = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                     "commit": common.git_commit(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "shape": dict(B=B, T=T, H=H, D=D, dtype=str(DTYPE)), "rows": []}
    results["bf16_matmul_tflops"] = peak = common.matmul_peak_tflops()
    for window in WINDOWS:
        results.setdefault("guard_err", {})[str(window)] = correctness_guard(window)
    q, k, v, do = _inputs(B, T, H, H, D)
    for window in WINDOWS:
        for backward in (False, True):
            flops = attention_flops(B, T, H, D, window, backward)
            row = {"window": "full" if window is None else window, "pass": "fwd+bwd" if backward else "fwd",
                   "gflop": flops / 1e9}
            for name, provider in PROVIDERS.items():
                try:
                    fn = provider(q, k, v, do, window, backward)
                    if fn is None:
                        continue
                    ms = common.cuda_time_ms(fn, repeats=reps)
                except Exception as e:  # a peer that fails here is recorded, not fatal
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
                    continue
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
                row[f"{name}_pct_matmul"] = 100 * row[f"{name}_tflops"] / peak
                torch.cuda.empty_cache()
            peer = "sdpa" if window is None else "flex"
            if f"{peer}_ms" in row and "triton_ms" in row:
                row["peer"] = peer
                row["speedup_vs_peer"] = row[f"{peer}_ms"] / row["triton_ms"]
            results["rows"].append(row)
    del q, k, v, do
    torch.cuda.empty_cache()
    results["d20_sssl_stack"] = d20_stack(reps=max(3, reps // 5))
    return results


def print_table(r: dict) -> None:
    print(f"\nattention on {r['gpu']} (sm{''.join(map(str, r['capability']))}, commit {r['commit']}, "
          f"torch {r['torch']}, {r['date']}); B={B} T={T} H={H} D={D} bf16; "
          f"measured bf16 matmul {r['bf16_matmul_tflops']:.0f} TFLOP/s")
    names = list(PROVIDERS)
    print(f"{'window':>7s} {'pass':>8s} {'GFLOP':>8s} " + " ".join(f"{n + ' ms':>12s} {'TF/s':>6s}" for n in names)
          + f" {'vs peer':>10s}")
    for row in r["rows"]:
        cells = []
        for n in names:
            if f"{n}_ms" in row:
                cells.append(f"{row[n + '_ms']:12.3f} {row[n + '_tflops']:6.0f}")
            else:
                cells.append(f"{'error' if n + '_error' in row else '-':>12s} {'':>6s}")
        sp = f"{row['speedup_vs_peer']:.2f}x {row['peer']}" if "speedup_vs_peer" in row else "-"
        print(f"{str(row['window']):>7s} {row['pass']:>8s} {row['gflop']:8.1f} " + " ".join(cells) + f" {sp:>10s}")
    for row in r["rows"]:
        for n in names:
            if n + "_error" in row:
                print(f"  {n} at window={row['window']} {row['pass']}: {row[n + '_error']}")
    s = r["d20_sssl_stack"]
    print(f"d20 stack ({s['n_layer']} layers, {s['n_head']}x{s['head_dim']}, B={s['B']} T={s['T']}), fwd+bwd: "
          f"SSSL {s['ms_sssl']:.2f} ms ({s['tflops_sssl']:.0f} TF/s) vs all-full {s['ms_full']:.2f} ms "
          f"({s['tflops_full']:.0f} TF/s): the windows save {100 * s['saving']:.0f}%")


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_attention: skipped (needs a CUDA GPU)")
        return
    r = run()
    out = Path(os.environ.get("OUT", Path(__file__).parent / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(r, indent=2))
    print_table(r)


# ------------------------------------------------------------------------------------------------------
# pytest-benchmark entry points (pedantic mode, CUDA-synchronised), one per provider x window x pass
# ------------------------------------------------------------------------------------------------------
_SHARED: dict = {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("window", [None, 768], ids=["full", "w768"])
@pytest.mark.parametrize("provider", ["triton", "sdpa", "flex"])
def test_bench_attention(benchmark, provider, window, backward):
    if "inputs" not in _SHARED:
        torch.manual_seed(0)
        _SHARED["inputs"] = _inputs(B, T, H, H, D)
    q, k, v, do = _SHARED["inputs"]
    fn = PROVIDERS[provider](q, k, v, do, window, backward)
    if fn is None:
        pytest.skip(f"{provider} has no sliding window")

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, warmup_rounds=5, rounds=30, iterations=1)
    flops = attention_flops(B, T, H, D, window, backward)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), gflop=flops / 1e9,
                                tflops=flops / median_s / 1e12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_attention_table():
    """The whole table (and the d20 stack) with the issue's targets checked and printed."""
    r = run(reps=20)
    print_table(r)
    rows = {(row["window"], row["pass"]): row for row in r["rows"]}
    assert all(math.isfinite(row.get("triton_ms", float("nan"))) for row in r["rows"])
    assert r["d20_sssl_stack"]["ms_sssl"] < r["d20_sssl_stack"]["ms_full"], "the windows must save time"
    # issue 8's targets are reported (RESULTS.md), not asserted: they depend on the device
    print("targets: full fwd >= 450 TF/s:", f"{rows[('full', 'fwd')]['triton_tflops']:.0f}",
          "| full fwd+bwd >= 1.0x sdpa:", f"{rows[('full', 'fwd+bwd')].get('speedup_vs_peer', float('nan')):.2f}",
          "| w768 fwd+bwd >= 1.3x flex:", f"{rows[(768, 'fwd+bwd')].get('speedup_vs_peer', float('nan')):.2f}")


if __name__ == "__main__":
    main()
