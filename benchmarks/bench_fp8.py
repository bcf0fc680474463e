"""FP8 linear benchmarks on the d26 MLP shape (input 65536 x 1664, weight 6656 x 1664, bf16 activations).

Measured in one run, on one GPU:
  - forward+backward of one linear: the torch.compile'd bf16 linear (the peer) vs Float8Linear tensorwise
    and rowwise, each with the scaled_mm (cuBLASLt/CUTLASS) and the Triton GEMM backend;
  - the forward GEMM alone: bf16 matmul vs torch._scaled_mm vs the Triton FP8 GEMM (TFLOP/s);
  - the fused quantize kernel (absmax + scale + cast + transposed copy) vs the torch.compile'd reference,
    in GB/s of the minimal traffic (read x once, write each fp8 output once).
The issue's targets: fwd+bwd >= 1.5x bf16 (tensorwise), >= 1.2x (rowwise).

Run:  python benchmarks/bench_fp8.py            (a table and RESULTS.md lines; JSON to $OUT/bench_fp8.json,
                                                 else benchmarks/out/)
      python -m pytest benchmarks/bench_fp8.py   (pytest-benchmark, pedantic mode)
Everything is skipped without CUDA. Timing: CUDA events after warm-up, median of the repeats.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nanotrain.ops import fp8, registry

M, K, N = 65536, 1664, 6656  # d26: tokens per micro-batch x model dim -> 4 x model dim
LINEAR_FLOPS = 3 * 2 * M * N * K  # forward + the two backward GEMMs
TARGETS = {"tensorwise": 1.5, "rowwise": 1.2}

DEVICE = "cuda"


def cuda_time_ms(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median milliseconds of fn() (CUDA events after warm-up): the platform's common.cuda_time_ms."""
    import common  # benchmarks/common.py (on sys.path when run as a script or through benchmarks/conftest.py)

    return common.cuda_time_ms(fn, warmup=warmup, repeats=repeats)


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).requires_grad_(True)  # fp32 master weight
    dy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    return x, w, dy


def _linear_step(linear_fn, x, w, dy, forced: dict | None = None):
    def step():
        x.grad, w.grad = None, None
        with registry.forced(**(forced or {})), torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = linear_fn(x, w)
        y.backward(dy)
    return step


def linear_providers() -> dict:
    """name -> (linear_fn(x, w), forced backends)."""
    bf16 = torch.compile(lambda x, w: F.linear(x, w))
    out = {"bf16 linear (torch.compile)": (bf16, {})}
    for recipe in ("tensorwise", "rowwise"):
        config = fp8.Float8Config.from_recipe(recipe)
        for backend in ("scaled_mm", "triton"):
            out[f"fp8 {recipe} ({backend})"] = (
                lambda x, w, c=config: fp8.float8_linear(x, w, None, c),
                {"fp8_matmul": backend, "fp8_quantize": "triton", "fp8_quantize_dual": "triton"})
        out[f"fp8 {recipe} (scaled_mm, reference casts compiled)"] = (
            torch.compile(lambda x, w, c=config: fp8.float8_linear(x, w, None, c)),
            {"fp8_matmul": "scaled_mm", "fp8_quantize": "reference", "fp8_quantize_dual": "reference"})
    return out


def measure_linear() -> list[dict]:
    x, w, dy = _inputs()
    rows, base = [], None
    for name, (fn, forced) in linear_providers().items():
        try:
            ms = cuda_time_ms(_linear_step(fn, x, w, dy, forced))
        except Exception as e:  # noqa: BLE001 - one failing provider must not hide the others
            rows.append({"bench": "linear fwd+bwd", "provider": name, "error": f"{type(e).__name__}: {e}"})
            continue
        base = ms if base is None else base
        rows.append({"bench": "linear fwd+bwd", "provider": name, "ms": ms, "tflops": LINEAR_FLOPS / ms / 1e9,
                     "speedup_vs_bf16": base / ms})
    return rows


def measure_gemm() -> list[dict]:
    torch.manual_seed(0)
    a = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
    flops = 2 * M * N * K
    base = cuda_time_ms(lambda: a @ w.t())
    rows = [{"bench": "forward GEMM", "provider": "bf16 matmul", "ms": base}]
    for rowwise in (False, True):
        qa, sa = fp8.quantize(a, fp8.E4M3, -1 if rowwise else None)
        qw, sw = fp8.quantize(w, fp8.E4M3, -1 if rowwise else None)
        for backend, fn in (("scaled_mm", fp8.cublas_scaled_mm), ("triton", fp8.triton_scaled_mm)):
            name = f"fp8 {'rowwise' if rowwise else 'tensorwise'} {backend}"
            try:
                ms = cuda_time_ms(lambda fn=fn: fn(qa, qw.t(), sa, sw.t(), torch.bfloat16, True))
            except Exception as e:  # noqa: BLE001
                rows.append({"bench": "forward GEMM", "provider": name, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"bench": "forward GEMM", "provider": name, "ms": ms})
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / r["ms"] / 1e9
            r["speedup_vs_bf16"] = base / r["ms"]
    return rows


def measure_quantize() -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    ref = torch.compile(fp8.reference_cast)
    rows = []
    for mode, main, trans, label in ((-1, True, True, "tensorwise + transposed"), (1, True, False, "rowwise"),
                                     (0, False, True, "columnwise, transposed only")):
        nbytes = x.numel() * x.element_size() + x.numel() * (int(main) + int(trans))
        for name, fn in (("triton", fp8.triton_cast), ("torch.compile reference", ref)):
            try:
                ms = cuda_time_ms(lambda fn=fn: fn(x, fp8.E4M3, mode, mode != -1, main, trans))
            except Exception as e:  # noqa: BLE001
                rows.append({"bench": f"quantize {label}", "provider": name, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"bench": f"quantize {label}", "provider": name, "ms": ms, "gb_s": nbytes / ms / 1e6})
    nbytes = x.numel() * x.element_size() + 2 * x.numel()
    ref_dual = torch.compile(fp8.reference_cast_dual)
    for name, fn in (("triton", fp8.triton_cast_dual), ("torch.compile reference", ref_dual)):
        try:
            ms = cuda_time_ms(lambda fn=fn: fn(x, fp8.E4M3, True))
        except Exception as e:  # noqa: BLE001
            rows.append({"bench": "quantize rows + cols (dual)", "provider": name, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"bench": "quantize rows + cols (dual)", "provider": name, "ms": ms, "gb_s": nbytes / ms / 1e6})
    return rows


def to_rows(results: list[dict], copy_gbs: float | None = None) -> list:
    """The measurements as common.Row records (RESULTS.md lines), with the speed-up over the bf16 peer
    (linear, GEMM) or the percentage of the measured copy bandwidth (quantize)."""
    import common

    rows = []
    for r in results:
        if "error" in r:
            continue
        if "tflops" in r:
            rows.append(common.Row(bench=f"fp8 {r['bench']}", case=f"x {M}x{K}, w {N}x{K}, bf16",
                                   provider=r["provider"], time_ms=r["ms"], rate=r["tflops"], unit="TFLOP/s",
                                   vs_peer=r["speedup_vs_bf16"], peer="bf16"))
        else:
            rows.append(common.Row(bench=f"fp8 {r['bench']}", case=f"x {M}x{K} bf16", provider=r["provider"],
                                   time_ms=r["ms"], rate=r["gb_s"], unit="GB/s",
                                   pct_of_limit=100 * r["gb_s"] / copy_gbs if copy_gbs else None))
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_fp8: skipped (needs a CUDA GPU)")
        return 0
    why = fp8.fp8_available("cuda")
    if why is not None:
        print(f"bench_fp8: skipped (needs an FP8 GPU; this is {why})")
        return 0
    import common

    results = measure_linear() + measure_gemm() + measure_quantize()
    copy = common.copy_bandwidth_gbs()
    print(" | ".join(f"{k}: {v}" for k, v in common.machine_info().items()) + f" | copy {copy:.0f} GB/s")
    for r in results:
        if "error" in r:
            print(f"{r['bench']:<34} {r['provider']:<52} ERROR {r['error'][:200]}")
            continue
        extra = f"{r['tflops']:8.1f} TFLOP/s  x{r['speedup_vs_bf16']:.2f} vs bf16" if "tflops" in r \
            else f"{r['gb_s']:8.0f} GB/s ({100 * r['gb_s'] / copy:.0f}% of copy)"
        print(f"{r['bench']:<34} {r['provider']:<52} {r['ms']:8.3f} ms  {extra}")
    for recipe, target in TARGETS.items():
        best = max((r["speedup_vs_bf16"] for r in results if r["bench"] == "linear fwd+bwd"
                    and r["provider"].startswith(f"fp8 {recipe}") and "speedup_vs_bf16" in r), default=0.0)
        verdict = "MET" if best >= target else "NOT MET"
        print(f"target {recipe}: fwd+bwd x{best:.2f} vs bf16 (target x{target}): {verdict}")
    rows = [common.record(row) for row in to_rows(results, copy)]
    print(common.MARKDOWN_HEADER)
    for row in rows:
        print(row.markdown())
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    common.save_json(rows, os.path.join(out_dir, "bench_fp8.json"))
    with open(os.path.join(out_dir, "bench_fp8_raw.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark entry points (pedantic mode; each synchronises the device)

needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or fp8.fp8_available("cuda") is not None,
                                   reason="needs an FP8-capable CUDA GPU")


def _pedantic(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()
    for _ in range(3):
        run()
    benchmark.pedantic(run, rounds=20, iterations=1)


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["bf16 linear (torch.compile)", "fp8 tensorwise (scaled_mm)",
                                      "fp8 tensorwise (triton)", "fp8 rowwise (scaled_mm)", "fp8 rowwise (triton)"])
def test_bench_linear_fwd_bwd(benchmark, provider):
    fn, forced = linear_providers()[provider]
    x, w, dy = _inputs()
    benchmark.extra_info.update(flops=LINEAR_FLOPS)
    _pedantic(benchmark, _linear_step(fn, x, w, dy, forced))


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", [-1, 1, 0])
def test_bench_quantize(benchmark, mode):
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    benchmark.extra_info.update(bytes=x.numel() * 4)
    _pedantic(benchmark, lambda: fp8.triton_cast(x, fp8.E4M3, mode, mode != -1, mode != 0, mode != 1))


if __name__ == "__main__":
    sys.exit(main())
