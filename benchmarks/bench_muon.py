"""Muon benchmark: one full Muon step over every matrix group of a d26 model, Triton vs the torch.compile'd
reference step, in the same run; plus the orthogonalization alone in TFLOP/s against the device's measured bf16
matmul rate.

The groups come from benchmarks/shapes.py (a meta-device GPT of the shape, its block matrices grouped by shape
as nanotrain.optim.build_optimizer groups them): for d26 (model_dim 1664) attn c_q/c_k/c_v/c_proj stacked
(104 x 1664 x 1664), mlp c_fc (26 x 6656 x 1664), mlp c_proj (26 x 1664 x 6656) and ve_gate (13 x 13 x 12).

FLOPs of the orthogonalization, for a matrix with short side s and long side l, per Polar Express step:
X X^T 2 s^2 l, A A 2 s^3, B X 2 s^2 l ("nominal", what a dense implementation executes); the Triton kernels
execute half of the first two (symmetric outputs). Rates below are executed FLOPs over time (how busy the
tensor cores are); the vs-peer ratio compares times, so it does not depend on the count.

Run:  python benchmarks/bench_muon.py [--quick]     (rows to the results file, table to stdout)
      python -m pytest -q benchmarks/bench_muon.py   (the same as a gpu-marked test)
Needs CUDA (collect() raises common.NeedsCUDA without it).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: timing, measured limits, the row format)
import shapes  # noqa: E402  (benchmarks/shapes.py: the model shapes)

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


def _group_text(s: shapes.ModelShape, name: str, K: int, m: int, n: int) -> str:
    return f"{s.name} {name} ({K} x {m} x {n})"


def collect(quick: bool = False, model: str = "d26") -> list[common.Row]:
    """Rows: per group, the update's error vs the fp32 reference, the orthogonalization (compiled reference,
    Triton standard, Triton Gram) in bf16; then the full Muon step over all groups, fp32 and bf16 parameters."""
    common.require_cuda("the Muon benchmark")
    from nanotrain.ops import newton_schulz as ns
    from nanotrain.ops import registry

    torch.manual_seed(0)
    s = shapes.SHAPES[model]
    groups = s.muon_groups()
    peak = common.limits()["matmul"]
    reps = 8 if quick else 20
    rows: list[common.Row] = []

    def row(op, provider, shape, ms, mem, flops=None, **kw):
        rate = common.tflops(flops, ms) if flops else None
        return common.Row("muon", op, provider, shape, ms=ms, rate=rate, unit="TFLOP/s" if flops else "",
                          pct_of_limit=100 * rate / peak if flops else None, limit="bf16 matmul" if flops else "",
                          peak_mb=mem, **kw)

    # --- orthogonalization alone (bf16) per group: compiled reference (the peer) vs Triton standard and Gram,
    # each Triton row with the fp32 update check of the group (the timed kernels must compute the right thing)
    ref_ortho = torch.compile(ns.reference, dynamic=False)
    for name, (K, m, n) in groups.items():
        text = _group_text(s, name, K, m, n)
        k = min(K, 2)
        ref = make_group(k, m, n, torch.float32)
        tri = [t.clone() for t in ref]
        p0 = ref[1].clone()
        with torch.no_grad(), registry.forced(muon="reference"):
            ns.muon_update_reference(*ref, **HP)
        ns.muon_update_triton(*tri, **HP)
        upd_err = ((tri[1] - ref[1]).norm() / (ref[1] - p0).norm()).item()

        G = torch.randn(K, m, n, device="cuda", dtype=torch.bfloat16)
        Xn = (G.float() / (G.float().norm(dim=(-2, -1), keepdim=True) * ns.NORM_SAFETY + 1e-6)).bfloat16()
        nominal, executed = ortho_flops(K, m, n)
        t_ref, m_ref = common.measure(lambda: ref_ortho(G), repeats=reps)
        t_copy = common.cuda_time_ms(lambda: Xn.clone(), repeats=reps)  # the clone inside the timed call, subtracted
        t_tri, m_tri = common.measure(lambda: ns.polar_express_triton(Xn.clone(), STEPS, gram=False), repeats=reps)
        t_tri = max(t_tri - t_copy, 1e-6)
        rows.append(row("orthogonalize bf16", "torch.compile reference", text, t_ref, m_ref, nominal,
                        note="nominal FLOPs (dense)"))
        rows.append(row("orthogonalize bf16", "triton", text, t_tri, m_tri, executed, vs_peer=t_ref / t_tri,
                        peer="compiled reference", status="ok" if upd_err < 5e-2 else "error",
                        note=f"fp32 update rel. err {upd_err:.1e} vs reference"))
        if min(m, n) >= 16 and max(m, n) >= 2 * min(m, n):
            t_gram, m_gram = common.measure(lambda: ns.polar_express_triton(Xn.clone(), STEPS, gram=True),
                                            repeats=reps)
            t_gram = max(t_gram - t_copy, 1e-6)
            out_gram = ns.polar_express_triton(Xn.clone(), STEPS, gram=True).double()
            ref64 = ns.reference(G[:2].double())
            err = ((out_gram[:2] - ref64).norm() / ref64.norm()).item()
            sv = torch.linalg.svdvals(out_gram[:2])
            rows.append(row("orthogonalize bf16", "triton gram", text, t_gram, m_gram, gram_flops(K, m, n),
                            vs_peer=t_ref / t_gram, peer="compiled reference",
                            note=f"rel. err {err:.1e} vs fp64, singular values {sv.min():.2f}..{sv.max():.2f}"))
        torch.cuda.empty_cache()

    # --- one full Muon step over all groups: compiled reference (the peer) vs Triton, fp32 and bf16 parameters
    ref_step = torch.compile(ns.muon_update_reference, dynamic=False)
    all_groups = f"{s.name} all {len(groups)} groups"
    for dtype in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)):
        states = {name: make_group(*shape, dtype) for name, shape in groups.items()}

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

        op = f"Muon step, {str(dtype).replace('torch.', '')} params"
        t_ref, m_ref = common.measure(step_reference, repeats=reps)
        t_tri, m_tri = common.measure(step_triton, repeats=reps)
        t_gram, m_gram = common.measure(lambda: step_triton(True), repeats=reps)
        rows.append(row(op, "torch.compile reference", all_groups, t_ref, m_ref))
        rows.append(row(op, "triton", all_groups, t_tri, m_tri, vs_peer=t_ref / t_tri, peer="compiled reference"))
        rows.append(row(op, "triton gram", all_groups, t_gram, m_gram, vs_peer=t_ref / t_gram,
                        peer="compiled reference"))
        states = {}  # free this dtype's stacks before the next
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main("muon", collect, argv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_muon_d26():
    rows = [common.record(r) for r in collect(quick=True)]
    print("\n" + common.table(rows))
    assert all(r.status == "ok" for r in rows), [r.note for r in rows if r.status != "ok"]
    step = next(r for r in rows if r.op.startswith("Muon step") and r.provider == "triton")
    assert step.vs_peer > 1.0, "the Triton Muon step must beat the compiled reference"


if __name__ == "__main__":
    sys.exit(main())
