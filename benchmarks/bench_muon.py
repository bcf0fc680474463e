"""Muon benchmark: one full Muon step over every matrix group of a d26 model, Triton vs the
torch.compile'd reference step, in the same run; plus the orthogonalization alone in TFLOP/s against
the device's measured bf16 matmul rate.

d26 (nanotrain/scaling.py: model_dim = 26 * 64 = 1664, 13 heads of 128, n_kv_head = n_head) has per
block c_q, c_k, c_v, c_proj (1664 x 1664), MLP c_fc (6656 x 1664) and c_proj (1664 x 6656), and on
alternating layers the value-embedding gate ve_gate (13 x 12); Muon stacks same-shape matrices into one
group (nanotrain/optim.py), so the step is four stacked updates.

FLOPs of the orthogonalization, for a matrix with short side s and long side l, per Polar Express step:
X X^T 2 s^2 l, A A 2 s^3, B X 2 s^2 l ("nominal", what a dense implementation executes); the Triton
kernels execute half of the first two (symmetric outputs). TFLOP/s below are nominal FLOPs over time
(comparable across providers) and executed FLOPs over time (how busy the tensor cores are).

Run:  python benchmarks/bench_muon.py            (prints a table; JSON to $OUT or benchmarks/out/)
      python -m pytest -q benchmarks/bench_muon.py -s   (the same, as a gpu-marked test)
Skipped without CUDA.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: CUDA-event timing, measured limits, commit)

D26_GROUPS: dict[str, tuple[int, int, int]] = {
    "attn q/k/v/o (104 x 1664 x 1664)": (104, 1664, 1664),
    "mlp c_fc (26 x 6656 x 1664)": (26, 6656, 1664),
    "mlp c_proj (26 x 1664 x 6656)": (26, 1664, 6656),
    "ve_gate (13 x 13 x 12)": (13, 13, 12),
}
STEPS = 5
HP = dict(momentum=0.95, lr=0.02, weight_decay=0.2, beta2=0.9)


def ortho_flops(K: int, m: int, n: int, steps: int = STEPS) -> tuple[float, float]:
    """(nominal, executed-with-symmetry) FLOPs of the standard iteration on a stack."""
    s, l_ = min(m, n), max(m, n)
    nominal = steps * (2 * s * s * l_ + 2 * s ** 3 + 2 * s * s * l_)
    executed = steps * (s * s * l_ + s ** 3 + 2 * s * s * l_)
    return K * nominal, K * executed


def gram_flops(K: int, m: int, n: int) -> float:
    """Executed FLOPs of the Gram path (5 steps, restart before step 2), symmetric products halved."""
    s, l_ = min(m, n), max(m, n)
    square = s ** 3  # one symmetric s x s product on half the tiles
    return K * (2 * (s * s * l_) + 2 * (2 * s * s * l_) + 14 * square)






def make_group(K: int, m: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    second = (K, m, 1) if m >= n else (K, 1, n)
    g = torch.randn(K, m, n, device="cuda", dtype=dtype)
    return [g, 0.02 * torch.randn_like(g), 0.01 * torch.randn_like(g),
            1e-3 * torch.rand(second, device="cuda", dtype=dtype)]




def run(reps: int = 20) -> dict:
    from nanotrain.ops import newton_schulz as ns
    from nanotrain.ops import registry

    torch.manual_seed(0)
    results: dict = {"gpu": torch.cuda.get_device_name(), "commit": common.git_commit(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M"), "groups": {}, "step": {}}
    peak = common.matmul_peak_tflops()
    results["bf16_matmul_tflops"] = peak

    # --- correctness guard: the timed Triton step computes what the reference computes
    for name, (K, m, n) in D26_GROUPS.items():
        k = min(K, 2)
        ref = make_group(k, m, n, torch.float32)
        tri = [t.clone() for t in ref]
        p0 = ref[1].clone()
        with torch.no_grad(), registry.forced(muon="reference"):
            ns.muon_update_reference(*ref, **HP)
        ns.muon_update_triton(*tri, **HP)
        err = ((tri[1] - ref[1]).norm() / (ref[1] - p0).norm()).item()
        results["groups"].setdefault(name, {})["update_err_vs_fp32_reference"] = err

    # --- orthogonalization alone (bf16), per group: compiled reference vs Triton standard vs Triton Gram
    ref_ortho = torch.compile(ns.reference, dynamic=False)
    for name, (K, m, n) in D26_GROUPS.items():
        G = torch.randn(K, m, n, device="cuda", dtype=torch.bfloat16)
        Xn = (G.float() / (G.float().norm(dim=(-2, -1), keepdim=True) * ns.NORM_SAFETY + 1e-6)).bfloat16()
        nominal, executed = ortho_flops(K, m, n)
        row = results["groups"][name]
        t_ref = common.cuda_time_ms(lambda: ref_ortho(G), repeats=reps)
        t_tri = common.cuda_time_ms(lambda: ns.polar_express_triton(Xn.clone(), STEPS, gram=False), repeats=reps)
        t_copy = common.cuda_time_ms(lambda: Xn.clone(), repeats=reps)  # the clone inside the timed lambda, subtracted
        t_tri = max(t_tri - t_copy, 1e-6)
        row.update(ortho_ms_compiled_reference=t_ref, ortho_ms_triton=t_tri,
                   ortho_tflops_nominal_triton=nominal / (t_tri * 1e-3) / 1e12,
                   ortho_tflops_executed_triton=executed / (t_tri * 1e-3) / 1e12,
                   ortho_tflops_nominal_reference=nominal / (t_ref * 1e-3) / 1e12,
                   ortho_pct_of_matmul_peak_triton=100 * executed / (t_tri * 1e-3) / 1e12 / peak)
        if min(m, n) >= 16 and max(m, n) >= 2 * min(m, n):
            t_gram = common.cuda_time_ms(lambda: ns.polar_express_triton(Xn.clone(), STEPS, gram=True), repeats=reps)
            t_gram = max(t_gram - t_copy, 1e-6)
            out_std = ns.polar_express_triton(Xn.clone(), STEPS, gram=False).double()
            out_gram = ns.polar_express_triton(Xn.clone(), STEPS, gram=True).double()
            ref64 = ns.reference(G[:2].double())
            row.update(ortho_ms_triton_gram=t_gram,
                       ortho_tflops_executed_gram=gram_flops(K, m, n) / (t_gram * 1e-3) / 1e12,
                       err_standard_bf16=((out_std[:2] - ref64).norm() / ref64.norm()).item(),
                       err_gram_bf16=((out_gram[:2] - ref64).norm() / ref64.norm()).item(),
                       svd_band_gram=[torch.linalg.svdvals(out_gram[:2]).min().item(),
                                      torch.linalg.svdvals(out_gram[:2]).max().item()],
                       svd_band_standard=[torch.linalg.svdvals(out_std[:2]).min().item(),
                                          torch.linalg.svdvals(out_std[:2]).max().item()])

    # --- one full Muon step over all groups: compiled reference vs Triton, fp32 and bf16 parameters
    ref_step = torch.compile(ns.muon_update_reference, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        states = {name: make_group(*shape, dtype) for name, shape in D26_GROUPS.items()}

        def step_reference():
            with torch.no_grad(), registry.forced(muon="reference"):
                for st in states.values():
                    ref_step(*st, **HP)

        def step_triton(gram: bool = False):
            old = ns.GRAM_MIN_ASPECT
            ns.GRAM_MIN_ASPECT = 2.0 if gram else None
            try:
                for st in states.values():
                    ns.muon_update_triton(*st, **HP)
            finally:
                ns.GRAM_MIN_ASPECT = old

        key = str(dtype).replace("torch.", "")
        t_ref = common.cuda_time_ms(step_reference, repeats=reps)
        t_tri = common.cuda_time_ms(step_triton, repeats=reps)
        t_gram = common.cuda_time_ms(lambda: step_triton(True), repeats=reps)
        results["step"][key] = dict(ms_compiled_reference=t_ref, ms_triton=t_tri, ms_triton_gram=t_gram,
                                    speedup=t_ref / t_tri, speedup_gram=t_ref / t_gram)
        states = {}  # free this dtype's stacks before the next
        torch.cuda.empty_cache()
    return results


def print_table(r: dict) -> None:
    print(f"\nMuon d26 on {r['gpu']} (commit {r['commit']}, torch {r['torch']}, {r['date']}); "
          f"measured bf16 matmul {r['bf16_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'group':36s} {'ref ms':>8s} {'triton':>8s} {'gram':>8s} {'TF/s exec':>9s} {'% peak':>7s} "
          f"{'err std':>8s} {'err gram':>8s} {'upd err':>8s}")
    for name, g in r["groups"].items():
        print(f"{name:36s} {g['ortho_ms_compiled_reference']:8.3f} {g['ortho_ms_triton']:8.3f} "
              f"{g.get('ortho_ms_triton_gram', float('nan')):8.3f} {g['ortho_tflops_executed_triton']:9.0f} "
              f"{g['ortho_pct_of_matmul_peak_triton']:7.1f} {g.get('err_standard_bf16', float('nan')):8.1e} "
              f"{g.get('err_gram_bf16', float('nan')):8.1e} {g['update_err_vs_fp32_reference']:8.1e}")
    for key, s in r["step"].items():
        print(f"full Muon step, {key} params: compiled reference {s['ms_compiled_reference']:.2f} ms, "
              f"triton {s['ms_triton']:.2f} ms ({s['speedup']:.2f}x), triton+gram {s['ms_triton_gram']:.2f} ms "
              f"({s['speedup_gram']:.2f}x)")


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_muon: skipped (needs a CUDA GPU)")
        return
    r = run()
    out = Path(os.environ.get("OUT", Path(__file__).parent / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_muon.json").write_text(json.dumps(r, indent=2))
    print_table(r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_muon_d26():
    r = run(reps=10)
    print_table(r)
    for g in r["groups"].values():
        assert g["update_err_vs_fp32_reference"] < 5e-2
    assert r["step"]["float32"]["speedup"] > 1.0


if __name__ == "__main__":
    main()
