"""Muon orthogonalization kernels (kernels/newton_schulz.py) against the references in
nanotrain/ops/newton_schulz.py.

On CPU the Triton kernels run under the interpreter in float32/float16 (it mis-computes bf16 dots);
the `gpu` tests check bfloat16 at the real d26 shapes. Shapes are small on CPU and include tall
matrices (iterated on the transpose view) and sizes that are not multiples of the 32-wide tiles.
"""
from __future__ import annotations

import pytest
import torch

from nanotrain.ops import newton_schulz as ns
from nanotrain.ops import registry
from tests.ops.aot_compile import compile_without_gpu, run_interpreted

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SHAPES = [(2, 24, 40), (1, 64, 32), (3, 33, 65), (2, 48, 48)]  # wide, tall, awkward, square


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN (an element was not written)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def gradient_like(K: int, m: int, n: int, rank: int = 4, noise: float = 0.05) -> torch.Tensor:
    """Low rank plus noise, as real gradients look: a few strong directions over a weak full-rank floor."""
    U = torch.randn(K, m, rank)
    V = torch.randn(K, rank, n)
    scales = torch.logspace(0, -1, rank).view(1, 1, rank)
    return (U * scales) @ V / rank ** 0.5 + noise * torch.randn(K, m, n)


def svd_band(X: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(X.double())
    return s.min().item(), s.max().item()


def triton_kernels():
    from nanotrain.kernels import newton_schulz as nsk

    return nsk


def interpreter_or_gpu() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- symmetric products

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sym_matmul_xxt(shape, dtype):
    nsk = triton_kernels()
    K, m, n = shape
    X = torch.randn(shape, device=interpreter_or_gpu()).to(dtype)
    out = torch.full((K, m, m), float("nan"), dtype=dtype, device=X.device)
    nsk.sym_matmul(X, X, out)
    ref = X.double() @ X.double().mT
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out, out.mT), "both triangles must be written, exactly mirrored"
    # the transposed view (how a tall matrix is iterated): X^T X through strides, no copy
    outT = torch.full((K, n, n), float("nan"), dtype=dtype, device=X.device)
    nsk.sym_matmul(X.mT, X.mT, outT)
    assert rel_err(outT, X.double().mT @ X.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [24, 33, 64])
def test_sym_matmul_polynomial(m, dtype):
    """P = b A + c A A (+ a I) with A symmetric: the fused epilogue of the iteration (and of the Gram path)."""
    nsk = triton_kernels()
    X = torch.randn(2, m, m + 7, device=interpreter_or_gpu())
    A = (X @ X.mT / (m + 7)).to(dtype)
    out = torch.full((2, m, m), float("nan"), dtype=dtype, device=X.device)
    nsk.sym_matmul(A, A, out, alpha=15.87, Z=A, beta=-22.48, gamma=8.15)
    Ad = A.double()
    ref = 15.87 * Ad @ Ad - 22.48 * Ad + 8.15 * torch.eye(m, dtype=torch.float64, device=X.device)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_axpby_matmul(shape, dtype):
    nsk = triton_kernels()
    K, m, n = shape
    dev = interpreter_or_gpu()
    X = torch.randn(shape, device=dev).to(dtype)
    B = torch.randn(K, m, m, device=dev)
    B = ((B + B.mT) / 2).to(dtype)
    out = torch.full_like(X, float("nan"))
    nsk.axpby_matmul(B, X, out, alpha=2.5)
    assert rel_err(out, 2.5 * X.double() + B.double() @ X.double()) < TOL[dtype]
    out = torch.full_like(X, float("nan"))
    nsk.axpby_matmul(B, X, out, alpha=None)
    assert rel_err(out, B.double() @ X.double()) < TOL[dtype]
    # tall layout: Y = X^T viewed through strides, written into a transposed view
    Bt = torch.randn(K, n, n, device=dev).to(dtype)
    outT = torch.full((K, m, n), float("nan"), dtype=dtype, device=dev)
    nsk.axpby_matmul(Bt, X.mT, outT.mT, alpha=-0.5)
    assert rel_err(outT.mT, -0.5 * X.double().mT + Bt.double() @ X.double().mT) < TOL[dtype]


# ----------------------------------------------------------------------------- orthogonalization

@pytest.mark.parametrize("kind", ["random", "gradient_like"])
@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize_matches_reference_fp32(shape, kind):
    G = torch.randn(shape) if kind == "random" else gradient_like(*shape)
    G = G.to(interpreter_or_gpu())
    ref = ns.reference(G)
    out = ns.orthogonalize_triton(G.clone())
    err = rel_err(out, ref)
    (rmin, rmax), (omin, omax) = svd_band(ref), svd_band(out)
    print(f"{kind} {shape}: |out-ref|/|ref| = {err:.2e}; singular values ref [{rmin:.4f}, {rmax:.4f}] "
          f"triton [{omin:.4f}, {omax:.4f}]")
    assert err < 1e-4
    assert abs(omin - rmin) < 1e-3 and abs(omax - rmax) < 1e-3
    assert out.dtype == G.dtype and out.shape == G.shape


@pytest.mark.parametrize("shape", [(2, 24, 40), (1, 64, 32), (3, 33, 65)])
def test_orthogonalize_band_fp16(shape):
    """In half precision the output's singular values stay in the band of the float32 reference."""
    G = gradient_like(*shape).to(interpreter_or_gpu())
    ref = ns.reference(G.double())
    out = ns.orthogonalize_triton(G.half())
    (rmin, rmax), (omin, omax) = svd_band(ref), svd_band(out)
    err = rel_err(out, ref)
    print(f"fp16 {shape}: |out-ref|/|ref| = {err:.2e}; singular values ref [{rmin:.4f}, {rmax:.4f}] "
          f"triton [{omin:.4f}, {omax:.4f}]")
    assert err < 2e-2
    assert rmin - 0.05 < omin and omax < rmax + 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 24, 96), (1, 100, 33)])
def test_gram_formulation(shape, dtype):
    """The Gram path (iterate on the short side's square matrix, restart before step 2) computes the same
    function: float32 close to the reference, float16 within the reference's singular-value band."""
    G = gradient_like(*shape).to(interpreter_or_gpu())
    ref = ns.reference(G.double())
    X = (G / (G.norm(dim=(-2, -1), keepdim=True) * ns.NORM_SAFETY + 1e-6)).to(dtype)
    out = ns.polar_express_triton(X, 5, gram=True)
    (rmin, rmax), (omin, omax) = svd_band(ref), svd_band(out)
    err = rel_err(out, ref)
    print(f"gram {dtype} {shape}: |out-ref|/|ref| = {err:.2e}; singular values ref [{rmin:.4f}, {rmax:.4f}] "
          f"gram [{omin:.4f}, {omax:.4f}]")
    assert err < (1e-4 if dtype == torch.float32 else 2e-2)
    assert rmin - 0.05 < omin and omax < rmax + 0.05


def test_orthogonalize_keeps_leading_dims_and_checks_steps():
    G = torch.randn(2, 1, 20, 36)
    out = ns.orthogonalize_triton(G, 3)
    assert out.shape == G.shape
    assert rel_err(out, ns.reference(G, 3)) < 1e-4
    with pytest.raises(ValueError, match="steps"):
        ns.orthogonalize_triton(G, 9)


# ----------------------------------------------------------------------------- fused Muon step

def make_state(K: int, m: int, n: int, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    second = (K, m, 1) if m >= n else (K, 1, n)
    return [gradient_like(K, m, n).to(device, dtype), (0.05 * torch.randn(K, m, n)).to(device, dtype),
            (0.02 * torch.randn(K, m, n)).to(device, dtype), (1e-3 * torch.rand(second)).to(device, dtype)]


@pytest.mark.parametrize("shape", [(2, 24, 40), (2, 40, 24), (3, 33, 33), (1, 33, 65)])
def test_muon_update_matches_reference_fp32(shape):
    K, m, n = shape
    ref_state = make_state(K, m, n)
    tri_state = [t.clone() for t in ref_state]
    start = [t.clone() for t in ref_state]
    hp = dict(momentum=0.95, lr=0.02, weight_decay=0.2, beta2=0.9)
    for step in range(2):  # the second step runs on nonzero, kernel-written buffers
        grads = gradient_like(K, m, n)
        ref_state[0] = grads.clone()
        tri_state[0] = grads.clone()
        with torch.no_grad():
            ns.muon_update_reference(*ref_state, **hp)
        ns.muon_update_triton(*tri_state, **hp)
    names = ["grads (scratch)", "params", "momentum_buffer", "second_momentum"]
    for name, r, t, s0 in zip(names, ref_state, tri_state, start):
        assert not torch.isnan(t).any(), name
        if name == "params":  # compare the change, far smaller than the parameters themselves
            e = rel_err(t - s0, r - s0)
            assert e < 1e-4, (name, e)
        else:
            e = rel_err(t, r)
            assert e < 1e-5, (name, e)


def test_muon_update_cautious_decay_and_scale():
    """Independent of the reference: the update has Frobenius norm lr * sqrt(min(m, n)) * (NorMuon keeps
    the norm) up to the decay term, and decay only touches entries where update and parameter agree."""
    K, m, n = 1, 24, 40
    grads, params, mb, sm = make_state(K, m, n)
    p0 = params.clone()
    lr = 0.01
    ns.muon_update_triton(grads.clone(), params, mb, sm, 0.9, lr, 0.0, 0.95)
    delta = (p0 - params) / lr
    assert abs(delta.norm().item() - min(m, n) ** 0.5) < 1e-3 * min(m, n) ** 0.5
    params2 = p0.clone()
    ns.muon_update_triton(grads.clone(), params2, mb.clone(), sm.clone(), 0.9, lr, 0.5, 0.95)
    params3 = p0.clone()
    ns.muon_update_triton(grads.clone(), params3, mb.clone(), sm.clone(), 0.9, lr, 0.0, 0.95)
    decay = params3 - params2  # = lr * wd * p where update and p agree in sign, else 0
    u = p0 - params3
    agree = (u * p0) >= 0
    assert torch.allclose(decay[agree], lr * 0.5 * p0[agree], rtol=1e-4, atol=1e-8)
    assert decay[~agree].abs().max().item() < 1e-7


@pytest.mark.parametrize("where", ["second_momentum", "grads", "params"])
def test_muon_update_nan_survives_like_the_reference(where):
    """A NaN in the second moment (a diverged earlier step), the gradient or a parameter makes the Triton step
    NaN exactly where the reference's is: the kernels' eps floors (tl.maximum) must not turn a NaN into 1/eps
    and a finite, huge update."""
    K, m, n = 2, 24, 40
    state = make_state(K, m, n)
    index = {"second_momentum": (3, (0, 0, 7)), "grads": (0, (0, 5, 9)), "params": (1, (0, 5, 9))}[where]
    state[index[0]][index[1]] = float("nan")
    ref_state = [t.clone() for t in state]
    hp = dict(momentum=0.95, lr=0.02, weight_decay=0.2, beta2=0.9)
    with torch.no_grad():
        ns.muon_update_reference(*ref_state, **hp)
    ns.muon_update_triton(*state, **hp)
    for name, t, r in zip(("params", "momentum_buffer", "second_momentum"), state[1:], ref_state[1:]):
        assert torch.equal(t.isnan(), r.isnan()), name
    assert state[1][0].isnan().any() and not state[1][1].isnan().any()  # matrix 0 diverged, matrix 1 did not


_OFFSETS_SCRIPT = """
import json, torch
from nanotrain.kernels import newton_schulz as nsk
# one (R, C) matrix whose rows are 2^26 elements apart in a lazily allocated buffer: rows 32 and up sit past
# 2^31, where an int32 row * stride wraps (only the touched pages become memory)
R, C, stride = 40, 24, 2**26
buf = torch.empty(R * stride, dtype=torch.float32)
x = buf.as_strided((1, R, C), (R * stride, stride, 1))
x.copy_(torch.randn(1, R, C))
xc = x.contiguous()
f = torch.rand(1, R) + 0.5
res = {"sumsq": torch.allclose(nsk.sumsq_rows(x, torch.float32), xc.square().sum(-1), rtol=1e-5)}
res["scale_cast"] = torch.equal(nsk.scale_cast(x, f, torch.empty(1, R, C)), xc * f[..., None])
sq = torch.empty(1, R, R)
res["sym"] = torch.allclose(nsk.sym_matmul(x, x, sq), xc @ xc.mT, rtol=1e-5, atol=1e-5)
B = torch.randn(1, R, R) / R
y = torch.empty(1, R, C)
res["axpby"] = torch.allclose(nsk.axpby_matmul(B, x, y, 0.5), 0.5 * xc + B @ xc, rtol=1e-5, atol=1e-5)
print(json.dumps(res))
"""


def test_offsets_past_2_31_under_the_interpreter():
    """A matrix whose row * stride passes 2^31: the row kernels and both matrix kernels read the right rows
    (under the interpreter a wrapped int32 offset reads outside the buffer: a crash, hence the subprocess)."""
    assert run_interpreted(_OFFSETS_SCRIPT) == {"sumsq": True, "scale_cast": True, "sym": True, "axpby": True}


# ----------------------------------------------------------------------------- dispatch

def test_dispatch_forced_triton():
    G = gradient_like(2, 24, 40)
    with registry.forced(muon="triton", muon_update="triton"):
        assert registry.select("muon", G.device, G.dtype, shape=(24, 40)).name == "triton"
        out = ns.orthogonalize(G)
        state = make_state(2, 24, 40)
        ref_state = [t.clone() for t in state]
        ns.muon_update(*state, 0.95, 0.02, 0.1, 0.9)
    assert rel_err(out, ns.reference(G)) < 1e-4
    with torch.no_grad():
        ns.muon_update_reference(*ref_state, 0.95, 0.02, 0.1, 0.9)
    assert rel_err(state[2], ref_state[2]) < 1e-5 and rel_err(state[3], ref_state[3]) < 1e-5


def test_cpu_default_is_reference_and_reasons():
    cpu = torch.device("cpu")
    assert registry.select("muon", cpu, torch.float32, shape=(24, 40)).name == "reference"
    assert registry.select("muon_update", cpu, torch.float32, shape=(24, 40)).name == "reference"
    assert "bfloat16" in ns.triton_check(cpu, torch.bfloat16)
    assert "unsupported" in ns.triton_check(cpu, torch.float64)
    assert "unsupported" in ns.triton_check(torch.device("meta"), torch.float32)
    assert ns.triton_check(cpu, torch.float32) is None
    with registry.forced(muon="triton"):
        with pytest.raises(registry.BackendUnavailable, match="bfloat16"):
            ns.orthogonalize(torch.randn(8, 8, dtype=torch.bfloat16))


def test_custom_ops_opcheck():
    """The Triton launchers are torch custom ops (one opaque node for torch.compile) with fakes."""
    G = torch.randn(1, 16, 24, device=interpreter_or_gpu())
    torch.library.opcheck(torch.ops.nanotrain.triton_muon.default, (G, 2),
                          test_utils=("test_schema", "test_faketensor"))
    state = make_state(1, 16, 24, device=G.device)
    torch.library.opcheck(torch.ops.nanotrain.triton_muon_update.default, (*state, 0.9, 0.01, 0.1, 0.9, 2),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- GPU (bfloat16, d26 shapes)

D26 = 1664  # model_dim of a depth-26 model (26 x 64)
D26_SHAPES = [(D26, D26), (4 * D26, D26), (D26, 4 * D26)]  # attention q/k/v/o, MLP c_fc, MLP c_proj


@pytest.mark.gpu
@pytest.mark.parametrize("mn", D26_SHAPES)
def test_gpu_orthogonalize_bf16_d26(mn):
    torch.backends.cuda.matmul.allow_tf32 = False
    G = gradient_like(4, *mn).cuda()
    ref = ns.reference(G)  # float32 reference
    with registry.forced(muon="triton"):
        out = ns.orthogonalize(G)  # bf16 compute
    err = rel_err(out, ref)
    (rmin, rmax), (omin, omax) = svd_band(ref), svd_band(out)
    ref_bf16 = ns.reference(G.bfloat16())
    bmin, bmax = svd_band(ref_bf16)
    print(f"d26 {mn}: |out-ref|/|ref| = {err:.2e} (torch bf16: {rel_err(ref_bf16, ref):.2e}); singular values "
          f"fp32 ref [{rmin:.4f}, {rmax:.4f}] bf16 ref [{bmin:.4f}, {bmax:.4f}] triton [{omin:.4f}, {omax:.4f}]")
    assert err < 2 * rel_err(ref_bf16, ref) + 1e-3
    assert rmin - 0.05 < omin and omax < rmax + 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("mn", D26_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_muon_update_d26(mn, dtype):
    """Triton (bf16 iteration) against the float32 reference step: at most twice the error of the
    reference run in the parameters' dtype, and never worse than 3e-2 on the parameter change."""
    torch.backends.cuda.matmul.allow_tf32 = False
    state = make_state(4, *mn, dtype=dtype, device="cuda")
    ref32 = [t.float() for t in state]
    ref_lo = [t.clone() for t in state]
    p0 = state[1].float()
    hp = dict(momentum=0.95, lr=0.02, weight_decay=0.2, beta2=0.9)
    with registry.forced(muon="reference"), torch.no_grad():
        ns.muon_update_reference(*ref32, **hp)
        ns.muon_update_reference(*ref_lo, **hp)
    with registry.forced(muon_update="triton"):
        ns.muon_update(*state, **hp)
    err_tri = rel_err(state[1].float() - p0, ref32[1] - p0)
    err_lo = rel_err(ref_lo[1].float() - p0, ref32[1] - p0)
    print(f"muon_update d26 {mn} {dtype}: param change error triton {err_tri:.2e}, reference in {dtype} {err_lo:.2e}")
    assert err_tri < max(2 * err_lo, 3e-2)
    assert rel_err(state[2].float(), ref32[2]) < TOL[dtype]  # momentum: elementwise
    assert rel_err(state[3].float(), ref32[3]) < max(2 * rel_err(ref_lo[3].float(), ref32[3]), 5e-2)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90a / sm_80 without a GPU (kernels/_compile.py): the compiled path's
# type errors, shared memory over the limit and register spills, which the interpreter cannot show.
# Every autotune config of both matrix kernels is compiled in bf16 for both GPU generations, in the layout
# with the heaviest epilogue (sym: A A + Z; axpby: the transposed iterate of a tall matrix); the other
# layouts only for the first config, and the elementwise kernels at the launcher's largest tile. The full
# grid (every layout of every config, and the small tiles too: 60 compiles) passes as well but takes ~35 s
# on one core, twice this test's share of CI.
# ---------------------------------------------------------------------------------------------------
_AOT_SCRIPT = """
import json
from nanotrain.kernels._compile import compile_cases
import triton
from nanotrain.kernels import newton_schulz as K
cases = []
for cap in [(9, 0), (8, 0)]:
    for kernel, heavy, others in [("sym", "square", ("wide", "tall")), ("axpby", "tall", ("wide",))]:
        for i, cfg in enumerate(K.gpu_configs(kernel, cap)):
            for layout in (heavy, *others) if i == 0 else (heavy,):
                cases.append((cap, kernel, dict(config=cfg, layout=layout), f"{cfg} {layout}"))
    for kernel in K.ELEMENTWISE_KERNELS:
        cases.append((cap, kernel, dict(size=4096), "size 4096"))
print(json.dumps(compile_cases(K.compile_for, cases)))
"""


@pytest.mark.gpu
def test_gpu_row_kernels_offsets_past_2_31_elements():
    """One (R, C) matrix of more than 2^31 elements: row * stride passes int32 in the row-tiled kernels
    (sums of squares, scale-and-cast); the last rows are checked against torch."""
    nsk = triton_kernels()
    R, C = 2**16 + 64, 2**15
    try:
        x = torch.randn(1, R, C, device="cuda", dtype=torch.bfloat16)
        f = torch.rand(1, R, device="cuda") + 0.5
        y = torch.empty_like(x)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element matrix")
    sums = nsk.sumsq_rows(x, torch.bfloat16)
    tail = x[0, -64:].float()
    torch.testing.assert_close(sums[0, -64:], tail.square().sum(-1), rtol=1e-4, atol=0)
    nsk.scale_cast(x, f, y)
    torch.testing.assert_close(y[0, -64:].float(), (tail * f[0, -64:, None]).bfloat16().float(), rtol=0, atol=0)


@pytest.mark.slow
def test_muon_kernels_compile_for_hopper_and_ampere_without_a_gpu():
    """Every sm90/sm80 autotune config of the symmetric and axpby products compiles in bf16 with shared
    memory under the limit (227 KB sm90, 163 KB sm80), no register spills, and wgmma on Hopper; the Muon
    step's elementwise/reduction kernels compile on both without spills."""
    from nanotrain.kernels import newton_schulz as nsk
    from nanotrain.kernels._compile import shared_limit

    rows = compile_without_gpu(_AOT_SCRIPT)
    n_configs = sum(len(nsk.gpu_configs(k, cap)) for k in ("sym", "axpby") for cap in [(9, 0), (8, 0)])
    assert len(rows) == n_configs + 2 * (2 + 1 + len(nsk.ELEMENTWISE_KERNELS)), len(rows)
    for cap, kernel, what, shared, spills, wgmma in rows:
        assert isinstance(shared, int), f"{kernel} {what} does not compile for sm{cap[0]}{cap[1]}:\n{shared}"
        assert shared <= shared_limit(tuple(cap)), (cap, kernel, what, shared)
        assert spills == 0, f"{kernel} {what} spills {spills} bytes on sm{cap[0]}{cap[1]}"
        if kernel in ("sym", "axpby"):
            assert shared > 0, (cap, kernel, what)  # the operand tiles are staged through shared memory
            assert wgmma == (cap[0] == 9), f"{kernel} {what} on sm{cap[0]}{cap[1]}: wgmma={wgmma}"
