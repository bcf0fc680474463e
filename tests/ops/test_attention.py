"""Attention backends against the reference (nanotrain/ops/attention.py is the spec).

The fused Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest
when there is no CUDA) in float32 and float16, on tiny awkward shapes: the interpreter executes every
program of the grid in Python, so the grid is cut to a few (B, H) pairs and T <= 100, with each case
chosen to hit one awkward property (see CASES). On a GPU the same tests run on CUDA in float16, and the
`gpu`-marked tests add bfloat16 at the model's real shapes and the backward's determinism.

Accuracy rule (DESIGN.md, the flash-attention rule): the kernel's max error against the float64
reference is at most twice the max error of the reference itself run in the kernel's low-precision
dtype, for the output and each gradient. Float32 kernels must match the float64 reference to a tight
relative tolerance. Kernel outputs are written into NaN-filled buffers, so an unwritten element fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from aot_compile import compile_without_gpu

from nanotrain.ops import attention as A
from nanotrain.ops import registry

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# float32 runs only under the interpreter (on the GPU the kernels take bf16/fp16)
DTYPES = [torch.float16] if CUDA else [torch.float32, torch.float16]

# (B, T, H, Hkv, D, window): each case targets an awkward property; the interpreter's blocks are
# BLOCK_M=32/BLOCK_N=16 (forward, dq) and BLOCK_M=16/BLOCK_N=32 (dk/dv).
CASES = [
    pytest.param(1, 37, 2, 2, 16, None, id="full-causal-T-not-block-multiple"),
    pytest.param(2, 50, 4, 2, 32, 5, id="window-smaller-than-block-gqa2-B2"),
    pytest.param(1, 70, 4, 1, 16, 1, id="window-1-mqa"),
    pytest.param(1, 33, 2, 2, 16, 40, id="window-ge-T"),
    pytest.param(1, 100, 2, 1, 32, 17, id="odd-window-T100-mqa"),
    pytest.param(1, 96, 2, 2, 16, 47, id="window-with-unmasked-interior-blocks"),
    pytest.param(1, 60, 2, 2, 64, 18, id="D64-window-edge-on-block-boundary"),
    pytest.param(1, 40, 1, 1, 128, None, id="D128"),
    pytest.param(1, 5, 2, 1, 16, 3, id="T-shorter-than-a-block"),
]


def _fp32_rel_tol() -> float:
    return 1e-5


def _inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, device=DEVICE):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, T, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, T, Hkv, D, device=device).to(dtype)
    do = torch.randn(B, T, H, D, device=device).to(dtype)
    return q, k, v, do


def _reference_with_grads(q, k, v, do, window, dtype):
    """Output and (dq, dk, dv) of the reference run in `dtype`."""
    qr, kr, vr = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = A.reference(qr, kr, vr, window)
    out.backward(do.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


def _nan_like(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _kernel_with_grads(q, k, v, do, window):
    """The Triton launchers run into NaN-poisoned buffers: output, lse, then dq, dk, dv."""
    from nanotrain.kernels import attention as K

    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out, lse = K.attention_fwd(q, k, v, window, scale, out=_nan_like(q.shape, q.dtype),
                               lse=_nan_like((B, H, T), torch.float32))
    dq, dk, dv = K.attention_bwd(do, q, k, v, out, lse, window, scale, dq=_nan_like(q.shape, q.dtype),
                                 dk=_nan_like(k.shape, k.dtype), dv=_nan_like(v.shape, v.dtype))
    return out, lse, dq, dk, dv


def _check_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None) -> None:
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result (unwritten or invalid)"
    err = (got.double() - ref64).abs().max().item()
    if ref_lowp is None:  # float32 kernel: tight tolerance relative to the result's scale (>= 1: dq is 0 at window 1)
        bound = _fp32_rel_tol() * max(1.0, ref64.abs().max().item())
        assert err < bound, f"{name}: max error {err:.2e} > {bound:.2e}"
        return
    base = (ref_lowp.double() - ref64).abs().max().item()
    # floor at fp32 rounding: where the exact result is 0 (dk at window 1) the fp16 reference can be exact too
    floor = _fp32_rel_tol() * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: kernel error {err:.3e} > 2 x reference's own {base:.3e}"


def _compare_to_reference(q, k, v, do, window):
    out, lse, dq, dk, dv = _kernel_with_grads(q, k, v, do, window)
    ref64 = _reference_with_grads(q, k, v, do, window, torch.float64)
    lowp = None if q.dtype == torch.float32 else _reference_with_grads(q, k, v, do, window, q.dtype)
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))):
        _check_close(name, got, ref64[i], None if lowp is None else lowp[i])
    # the saved log-sum-exp, recomputed densely in float64
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double().repeat_interleave(groups, 2)) / math.sqrt(D)
    s = s.masked_fill(~A.window_mask(T, T, window, q.device), float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    assert not torch.isnan(lse).any()
    assert (lse.double() - lse_ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,Hkv,D,window", CASES)
def test_triton_forward_backward_match_reference(B, T, H, Hkv, D, window, dtype):
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    _compare_to_reference(q, k, v, do, window)


def test_triton_strided_inputs_without_copies():
    """q, k, v as views of one fused qkv projection (the model's layout): strides, not copies."""
    B, T, H, Hkv, D = 1, 45, 4, 2, 16
    dtype = DTYPES[-1]
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D: (H + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    _compare_to_reference(q, k, v, do, 20)


def test_public_attention_dispatches_to_triton_with_autograd():
    B, T, H, Hkv, D, window = 2, 29, 4, 2, 16, 9
    dtype = DTYPES[-1]
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with registry.forced(attention="triton"):
        assert registry.select("attention", q.device, dtype, head_dim=D).name == "triton"
        out = A.attention(q, k, v, window)
    out.backward(do)
    got = (out.detach(), q.grad, k.grad, v.grad)
    ref64 = _reference_with_grads(q, k, v, do, window, torch.float64)
    lowp = None if dtype == torch.float32 else _reference_with_grads(q, k, v, do, window, dtype)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        _check_close(name, got[i], ref64[i], None if lowp is None else lowp[i])


def test_triton_under_torch_compile_is_one_opaque_node():
    """The custom op traces through torch.compile (fake impl + registered autograd) and matches eager."""
    B, T, H, Hkv, D, window = 1, 24, 2, 1, 16, 7
    dtype = DTYPES[-1]
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    comp = [x.clone().requires_grad_() for x in (q, k, v)]
    out_e = A.triton_attention(*eager, window)
    out_e.backward(do)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: A.triton_attention(a, b, c, window), backend="aot_eager", fullgraph=True)
    out_c = fn(*comp)
    out_c.backward(do)
    assert torch.equal(out_c, out_e)
    for a, b in zip(comp, eager):
        assert torch.equal(a.grad, b.grad)


def test_custom_ops_pass_opcheck():
    B, T, H, Hkv, D, window = 1, 20, 2, 1, 16, 6
    dtype = DTYPES[-1]
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    scale = 1.0 / math.sqrt(D)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), window, scale)
    torch.library.opcheck(torch.ops.nanotrain.triton_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    cache_k = torch.randn(2, 16, Hkv, D, device=DEVICE).to(dtype)
    cache_v = torch.randn(2, 16, Hkv, D, device=DEVICE).to(dtype)
    qd = torch.randn(2, 1, H, D, device=DEVICE).to(dtype)
    seqlens = torch.tensor([5, 16], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(torch.ops.nanotrain.triton_attention_decode.default,
                          (qd, cache_k, cache_v, seqlens, window, scale),
                          test_utils=("test_schema", "test_faketensor"))


def test_availability_reasons():
    cpu = torch.device("cpu")
    assert A.triton_check(cpu, torch.float32, head_dim=64) is None
    assert A.triton_check(cpu, torch.float16, head_dim=128) is None
    assert "bfloat16" in A.triton_check(cpu, torch.bfloat16, head_dim=64)
    assert "head_dim 80" in A.triton_check(cpu, torch.float32, head_dim=80)
    assert "head_dim 256" in A.triton_check(cpu, torch.float32, head_dim=256)
    assert A.triton_check(torch.device("meta"), torch.float32, head_dim=64) is not None
    q = torch.randn(1, 8, 2, 80)
    with registry.forced(attention="triton"):  # forcing a backend that cannot run is an error, not a fallback
        with pytest.raises(registry.BackendUnavailable, match="head_dim 80"):
            A.attention(q, q, q, None)
    # never picked automatically on CPU (the interpreter is for tests): the registry falls back
    assert registry.select("attention", cpu, torch.float32, head_dim=64).name != "triton"
    assert registry.select("attention_decode", cpu, torch.float32, head_dim=64).name == "reference"
    names = [b.name for b in registry.backends("attention")]
    assert names.index("triton") < names.index("sdpa") < names.index("reference")
    names = [b.name for b in registry.backends("attention_decode")]
    assert names.index("triton") < names.index("reference")


_AOT_SCRIPT = """
import json
from nanotrain.kernels import attention as K
out = []
for cap, kind in [((9, 0), "fwd"), ((9, 0), "dkdv"), ((9, 0), "dq"), ((9, 0), "decode"), ((8, 0), "dkdv")]:
    r = K.compile_for(kind, cap, 128, K._GPU_CONFIGS[K.gpu_generation(cap)][kind][0])
    out.append([list(cap), kind, r["shared"], "wgmma" in r["ptx"]])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu():
    """Triton compiles the kernels ahead of time for sm_90a/sm_80 (ptxas ships with Triton): GPU-only
    compile errors show up in CI. Hopper must get wgmma tensor-core code, and shared memory must fit."""
    from nanotrain.kernels._compile import shared_limit

    for cap, kind, shared, wgmma in compile_without_gpu(_AOT_SCRIPT):
        assert 0 < shared <= shared_limit(tuple(cap)), (cap, kind, shared)
        if cap[0] == 9 and kind != "decode":
            assert wgmma, f"{kind} on sm90 does not use wgmma"


# ----------------------------------------------------------------------------------------------------------
# Decode / prefill against a KV cache
# ----------------------------------------------------------------------------------------------------------
def _poisoned_cache(B: int, Tmax: int, Hkv: int, D: int, dtype: torch.dtype):
    """Caches full of NaN: a kernel that reads past cache_seqlens (or an unfilled slot) turns NaN."""
    return _nan_like((B, Tmax, Hkv, D), dtype), _nan_like((B, Tmax, Hkv, D), dtype)


@pytest.mark.parametrize("window", [None, 7, 1], ids=lambda w: f"window={w}")
def test_decode_prefill_then_tokens_equals_full_attention(window):
    """Prefill a 20-token prompt (Tq=20) then 9 single tokens; each output equals full attention's row."""
    from nanotrain.kernels import attention as K

    B, T, H, Hkv, D, prompt, Tmax = 2, 29, 4, 2, 32, 20, 40
    dtype = DTYPES[0]
    q, k, v, _ = _inputs(B, T, H, Hkv, D, dtype)
    full = A.reference(q.double(), k.double(), v.double(), window)
    k_cache, v_cache = _poisoned_cache(B, Tmax, Hkv, D, dtype)
    scale = 1.0 / math.sqrt(D)
    pos = 0
    outs = []
    for chunk in [prompt] + [1] * (T - prompt):
        k_cache[:, pos:pos + chunk] = k[:, pos:pos + chunk]
        v_cache[:, pos:pos + chunk] = v[:, pos:pos + chunk]
        pos += chunk
        seqlens = torch.full((B,), pos, dtype=torch.int32, device=DEVICE)
        out = K.attention_decode(q[:, pos - chunk:pos], k_cache, v_cache, seqlens, window, scale,
                                 out=_nan_like((B, chunk, H, D), dtype))
        outs.append(out)
    got = torch.cat(outs, dim=1)
    _check_decode(got, full, q, k, v, window)


def _check_decode(got, ref64, q, k, v, window):
    assert not torch.isnan(got).any()
    if got.dtype == torch.float32:
        _check_close("decode", got, ref64, None)
    else:
        base = (A.reference(q, k, v, window).double() - ref64).abs().max().item()
        err = (got.double() - ref64).abs().max().item()
        assert err <= 2 * base + 1e-6, f"decode error {err:.3e} > 2 x reference's own {base:.3e}"


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("window", [None, 6])
def test_decode_different_cache_lengths_per_row(tq, window):
    B, H, Hkv, D, Tmax = 3, 2, 1, 16, 40
    dtype = DTYPES[-1]
    seqlens = torch.tensor([5, 31, 18], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = _poisoned_cache(B, Tmax, Hkv, D, dtype)
    for b, n in enumerate(seqlens.tolist()):
        k_cache[b, :n] = torch.randn(n, Hkv, D, device=DEVICE).to(dtype)
        v_cache[b, :n] = torch.randn(n, Hkv, D, device=DEVICE).to(dtype)
    q = torch.randn(B, tq, H, D, device=DEVICE).to(dtype)
    with registry.forced(attention_decode="triton"):
        got = A.attention_decode(q, k_cache, v_cache, seqlens, window)
    assert not torch.isnan(got).any()
    # the reference reads only cache[b, :n]; give it finite caches beyond n so it cannot see NaN either
    kf, vf = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref64 = A.reference_decode(q.double(), kf.double(), vf.double(), seqlens, window)
    if dtype == torch.float32:
        _check_close("decode", got, ref64, None)
    else:
        base = (A.reference_decode(q, kf, vf, seqlens, window).double() - ref64).abs().max().item()
        assert (got.double() - ref64).abs().max().item() <= 2 * base + 1e-6


# ----------------------------------------------------------------------------------------------------------
# GPU: bfloat16/float16 at the model's real shapes, determinism of the backward
# ----------------------------------------------------------------------------------------------------------
GPU_CASES = [
    pytest.param(1, 2048, 16, 16, 128, 768, id="T2048-H16-D128-window768"),
    pytest.param(1, 2048, 16, 16, 128, None, id="T2048-H16-D128-full"),
    pytest.param(2, 2048, 16, 4, 128, 513, id="B2-T2048-gqa4-window513"),
    pytest.param(2, 1000, 8, 8, 64, 300, id="B2-T1000-D64-window300"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,T,H,Hkv,D,window", GPU_CASES)
def test_gpu_triton_matches_reference(B, T, H, Hkv, D, window, dtype):
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype, device="cuda")
    out, lse, dq, dk, dv = _kernel_with_grads(q, k, v, do, window)
    ref64 = _reference_with_grads(q, k, v, do, window, torch.float64)
    lowp = _reference_with_grads(q, k, v, do, window, dtype)
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))):
        _check_close(name, got, ref64[i], lowp[i])


@pytest.mark.gpu
@pytest.mark.parametrize("window", [768, None])
def test_gpu_backward_is_deterministic(window):
    q, k, v, do = _inputs(2, 2048, 16, 4, 128, torch.bfloat16, device="cuda")
    first = _kernel_with_grads(q, k, v, do, window)
    second = _kernel_with_grads(q, k, v, do, window)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_registry_picks_a_fused_kernel_and_it_compiles():
    q, k, v, do = _inputs(2, 512, 8, 8, 128, torch.bfloat16, device="cuda")
    assert registry.select("attention", q.device, q.dtype, head_dim=128).name != "reference"
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    comp = [x.clone().requires_grad_() for x in (q, k, v)]
    out_e = A.triton_attention(*eager, 256)
    out_e.backward(do)
    fn = torch.compile(lambda a, b, c: A.triton_attention(a, b, c, 256) * 2.0, fullgraph=True)
    out_c = fn(*comp)
    out_c.backward(do)
    torch.testing.assert_close(out_c, out_e * 2.0)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad * 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window", [None, 768])
def test_gpu_decode_matches_full_attention(dtype, window):
    from nanotrain.kernels import attention as K

    B, T, H, Hkv, D, prompt, Tmax = 2, 1100, 16, 4, 128, 1037, 2048
    q, k, v, _ = _inputs(B, T, H, Hkv, D, dtype, device="cuda")
    full = A.reference(q.double(), k.double(), v.double(), window)
    k_cache, v_cache = _nan_like((B, Tmax, Hkv, D), dtype, "cuda"), _nan_like((B, Tmax, Hkv, D), dtype, "cuda")
    pos, outs = 0, []
    for chunk in [prompt] + [1] * (T - prompt):
        k_cache[:, pos:pos + chunk] = k[:, pos:pos + chunk]
        v_cache[:, pos:pos + chunk] = v[:, pos:pos + chunk]
        pos += chunk
        seqlens = torch.full((B,), pos, dtype=torch.int32, device="cuda")
        outs.append(K.attention_decode(q[:, pos - chunk:pos], k_cache, v_cache, seqlens, window, 1 / math.sqrt(D)))
    _check_decode(torch.cat(outs, 1), full, q, k, v, window)
