"""FP8 linear benchmarks at the d26 MLP shape of benchmarks/shapes.py (x: one micro-batch of 32 x 2048 = 65536
tokens by 1664, weight 6656 x 1664, bf16 activations).

Measured in one run, on one GPU:
  - forward+backward of one linear: the torch.compile'd bf16 linear (the peer) vs Float8Linear tensorwise
    and rowwise, each with the scaled_mm (cuBLASLt/CUTLASS) and the Triton GEMM backend;
  - the forward GEMM alone: bf16 matmul (the peer) vs torch._scaled_mm vs the Triton FP8 GEMM (TFLOP/s);
  - the fused quantize kernel (absmax + scale + cast + transposed copy) vs the torch.compile'd reference,
    in GB/s of the minimal traffic (read x once, write each fp8 output once), % of the measured copy rate.
The issue's targets: fwd+bwd >= 1.5x bf16 (tensorwise), >= 1.2x (rowwise); the rows' "vs peer" says it.

Run:  python benchmarks/bench_fp8.py [--quick]     (rows to the results file, table to stdout)
      python -m pytest benchmarks/bench_fp8.py     (pytest-benchmark, pedantic mode)
Needs an FP8 GPU (sm89+; collect() raises common.NeedsCUDA elsewhere). Timing: CUDA events, median.
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

from nanotrain.ops import fp8, registry  # noqa: E402

SHAPE = shapes.SHAPES["d26"]
M, N, K = SHAPE.linear_shapes()["mlp c_fc"]  # tokens of a micro-batch x 4 * model_dim <- model_dim
LINEAR_FLOPS = 3 * 2 * M * N * K  # forward + the two backward GEMMs
TARGETS = {"tensorwise": 1.5, "rowwise": 1.2}
DEVICE = "cuda"
LINEAR_TEXT = f"{SHAPE.name} mlp c_fc: x {M}x{K}, w {N}x{K}, bf16"


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
    """name -> (linear_fn(x, w), forced backends); the bf16 peer first."""
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


def _error(op: str, provider: str, shape: str, e: Exception) -> common.Row:
    return common.Row("fp8", op, provider, shape, status="error", note=f"{type(e).__name__}: {e}"[:300])


def _timed(op: str, provider: str, shape: str, fn, reps: int, flops: float | None = None,
           nbytes: float | None = None, peak: dict | None = None) -> common.Row:
    """One provider's row: time and memory, TFLOP/s (flops) or GB/s (nbytes) with % of the measured limit."""
    try:
        ms, mem = common.measure(fn, repeats=reps)
    except Exception as e:  # noqa: BLE001 - one failing provider must not hide the others
        return _error(op, provider, shape, e)
    if flops is not None:
        rate = common.tflops(flops, ms)
        return common.Row("fp8", op, provider, shape, ms=ms, rate=rate, unit="TFLOP/s",
                          pct_of_limit=100 * rate / peak["matmul"], limit="bf16 matmul", peak_mb=mem)
    rate = common.gbs(nbytes, ms)
    return common.Row("fp8", op, provider, shape, ms=ms, rate=rate, unit="GB/s",
                      pct_of_limit=100 * rate / peak["copy"], limit="copy", peak_mb=mem)


def _vs_first(rows: list[common.Row], peer: str) -> list[common.Row]:
    """Each row's speed-up over the first row (the peer) of its op."""
    base = rows[0] if rows and rows[0].status == "ok" else None
    for r in rows[1:]:
        if base is not None and r.status == "ok":
            r.vs_peer, r.peer = base.ms / r.ms, peer
    return rows


def measure_linear(reps: int, peak: dict) -> list[common.Row]:
    x, w, dy = _inputs()
    rows = [_timed("linear fwd+bwd", name, LINEAR_TEXT, _linear_step(fn, x, w, dy, forced), reps, LINEAR_FLOPS,
                   peak=peak) for name, (fn, forced) in linear_providers().items()]
    rows = _vs_first(rows, "bf16")
    for r in rows[1:]:
        recipe = "tensorwise" if "tensorwise" in r.provider else "rowwise"
        if r.vs_peer is not None:
            r.note = f"target x{TARGETS[recipe]} vs bf16: {'met' if r.vs_peer >= TARGETS[recipe] else 'NOT met'}"
    return rows


def measure_gemm(reps: int, peak: dict) -> list[common.Row]:
    torch.manual_seed(0)
    a = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
    flops = 2 * M * N * K
    text = f"{SHAPE.name} mlp c_fc: {M}x{K} @ {K}x{N}"
    rows = [_timed("forward GEMM", "bf16 matmul", text, lambda: a @ w.t(), reps, flops, peak=peak)]
    for rowwise in (False, True):
        qa, sa = fp8.quantize(a, fp8.E4M3, -1 if rowwise else None)
        qw, sw = fp8.quantize(w, fp8.E4M3, -1 if rowwise else None)
        for backend, fn in (("scaled_mm", fp8.cublas_scaled_mm), ("triton", fp8.triton_scaled_mm)):
            name = f"fp8 {'rowwise' if rowwise else 'tensorwise'} {backend}"
            rows.append(_timed("forward GEMM", name, text,
                               lambda fn=fn, qa=qa, qw=qw, sa=sa, sw=sw: fn(qa, qw.t(), sa, sw.t(), torch.bfloat16,
                                                                            True), reps, flops, peak=peak))
    return _vs_first(rows, "bf16")


def measure_quantize(reps: int, peak: dict) -> list[common.Row]:
    torch.manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    text = f"{SHAPE.name} x {M}x{K} bf16"
    ref = torch.compile(fp8.reference_cast)
    rows: list[common.Row] = []
    for mode, main_, trans, label in ((-1, True, True, "tensorwise + transposed"), (1, True, False, "rowwise"),
                                      (0, False, True, "columnwise, transposed only")):
        nbytes = x.numel() * x.element_size() + x.numel() * (int(main_) + int(trans))
        pair = [_timed(f"quantize {label}", name, text,
                       lambda fn=fn, mode=mode, main_=main_, trans=trans: fn(x, fp8.E4M3, mode, mode != -1, main_,
                                                                             trans), reps, nbytes=nbytes, peak=peak)
                for name, fn in (("torch.compile reference", ref), ("triton", fp8.triton_cast))]
        rows += _vs_first(pair, "compiled reference")
    nbytes = x.numel() * x.element_size() + 2 * x.numel()
    ref_dual = torch.compile(fp8.reference_cast_dual)
    pair = [_timed("quantize rows + cols (dual)", name, text, lambda fn=fn: fn(x, fp8.E4M3, True), reps,
                   nbytes=nbytes, peak=peak)
            for name, fn in (("torch.compile reference", ref_dual), ("triton", fp8.triton_cast_dual))]
    return rows + _vs_first(pair, "compiled reference")


def collect(quick: bool = False) -> list[common.Row]:
    """Rows of the linear (fwd+bwd), the forward GEMM and the quantize kernels, each against its peer."""
    common.require_cuda("the FP8 benchmark")
    why = fp8.fp8_available("cuda")
    if why is not None:
        raise common.NeedsCUDA(f"the FP8 benchmark needs an FP8 GPU (sm89+): {why}")
    peak = common.limits()
    reps = 8 if quick else 20
    return measure_linear(reps, peak) + measure_gemm(reps, peak) + measure_quantize(reps, peak)


def main(argv: list[str] | None = None) -> int:
    return common.main("fp8", collect, argv)


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


@needs_fp8_gpu
@pytest.mark.gpu
def test_bench_fp8_rows():
    """The quick rows, recorded: every provider measured without an error."""
    rows = [common.record(r) for r in collect(quick=True)]
    print("\n" + common.table(rows))
    assert all(r.status == "ok" for r in rows), [(r.provider, r.note) for r in rows if r.status != "ok"]


if __name__ == "__main__":
    sys.exit(main())
