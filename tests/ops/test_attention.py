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

from nanotrain.ops import attention as A
from nanotrain.ops import registry
from tests.ops.aot_compile import compile_without_gpu, run_interpreted

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
for cap, kind, kw in [((9, 0), "fwd", {}), ((9, 0), "dkdv", {}), ((9, 0), "dq", {}), ((9, 0), "decode", {}),
                      ((9, 0), "decode", {"split": True}), ((8, 0), "dkdv", {}), ((8, 0), "decode", {"split": True})]:
    r = K.compile_for(kind, cap, 128, K._GPU_CONFIGS[K.gpu_generation(cap)][kind][0], **kw)
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


# (B, H, Hkv, D, Tq, window, cache_seqlens) for a cache of DECODE_TMAX positions: the interpreter's decode blocks
# are BLOCK_N=16 and a split holds a multiple of 128 keys, so 320 positions allow up to 3 splits.
DECODE_TMAX = 320
SPLIT_CASES = [
    pytest.param(2, 4, 2, 16, 1, None, [300, 170], id="gqa2-full-rows-differ"),
    pytest.param(3, 2, 1, 32, 3, 40, [290, 45, 200], id="mqa-window-smaller-than-prompt-tq3"),
    pytest.param(1, 2, 2, 16, 5, 130, [257], id="window-across-a-split-boundary"),
    pytest.param(2, 4, 1, 16, 20, None, [320, 20], id="prefill-fills-the-cache"),
]


@pytest.mark.parametrize("B,H,Hkv,D,tq,window,seqlens", SPLIT_CASES)
def test_decode_split_and_unsplit_equal_reference(B, H, Hkv, D, tq, window, seqlens, monkeypatch):
    """Flash-decoding: the KV range split across 1, 2 or 3 programs per (query block, b, h) gives
    reference_decode's output (GQA, a window smaller than the prompt, per-row cache lengths, NaN past them)."""
    from nanotrain.kernels import attention as K

    dtype = DTYPES[0]
    seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = _poisoned_cache(B, DECODE_TMAX, Hkv, D, dtype)
    for b, n in enumerate(seqlens.tolist()):
        k_cache[b, :n] = torch.randn(n, Hkv, D, device=DEVICE).to(dtype)
        v_cache[b, :n] = torch.randn(n, Hkv, D, device=DEVICE).to(dtype)
    q = torch.randn(B, tq, H, D, device=DEVICE).to(dtype)
    kf, vf = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    ref64 = A.reference_decode(q.double(), kf.double(), vf.double(), seqlens, window)
    combined = []
    combine = K.combine_decode_splits
    monkeypatch.setattr(K, "combine_decode_splits",
                        lambda o, lse, out: combined.append(o.shape[0]) or combine(o, lse, out))
    block_m = max(16, min(64, 1 << (tq - 1).bit_length()))
    span = min(K._effective_window(window, DECODE_TMAX) + block_m + K._SPLIT_ALIGN, DECODE_TMAX)
    cap = -(-span // K._SPLIT_ALIGN)
    for splits in (1, 2, 3):
        got = K.attention_decode(q, k_cache, v_cache, seqlens, window, 1 / math.sqrt(D),
                                 out=_nan_like((B, tq, H, D), dtype), num_splits=splits)
        assert not got.isnan().any(), f"{splits} splits"
        _check_close(f"decode, {splits} splits", got, ref64, None)
    expected = [min(n, cap) for n in (2, 3) if min(n, cap) > 1]
    assert len(expected) >= 1 and combined == expected, (combined, span)  # the split path really ran


def test_decode_splits_heuristic():
    """Split only while the grid leaves SMs idle and each split keeps enough keys."""
    from nanotrain.kernels import attention as K

    assert K.decode_splits(programs=16, key_span=8192, sm_count=132) == 9     # batch-1 sample, 16 heads
    assert K.decode_splits(programs=16, key_span=1024, sm_count=132) == 4     # short cache: >= 256 keys each
    assert K.decode_splits(programs=16, key_span=200, sm_count=132) == 1
    assert K.decode_splits(programs=132, key_span=8192, sm_count=132) == 1    # the grid already fills the GPU


def test_decode_lengths_must_fit_the_cache():
    B, Tmax, H, D = 2, 16, 2, 16
    k_cache = torch.zeros(B, Tmax, H, D, device=DEVICE, dtype=DTYPES[0])
    v_cache = torch.zeros_like(k_cache)

    def run(tq, lengths):
        q = torch.randn(B, tq, H, D, device=DEVICE, dtype=DTYPES[0])
        with registry.forced(attention_decode="triton"):
            return A.attention_decode(q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device=DEVICE))

    assert run(16, [16, 16]).shape == (B, 16, H, D)  # exactly full is fine
    with pytest.raises(ValueError, match="do not fit a KV cache of 16"):
        run(17, [16, 16])
    with pytest.raises(ValueError, match="cache_seqlens reaches 17"):
        run(1, [5, 17])
    with pytest.raises(ValueError, match="row of 2 < the 3 new queries"):
        run(3, [2, 9])


def test_tune_key_separates_window_kind_groups_and_grid(monkeypatch):
    """Autotuner keys: a short-window layer never shares a tuned config with a full one of the same length,
    nor a batch-1 grid with a training grid; every kernel's key holds the GQA group size."""
    from nanotrain.kernels import attention as K

    assert K._bucket(1025) == K._bucket(2048)  # why the window bucket alone cannot tell them apart
    full, short = K.tune_key(2048, None, 96), K.tune_key(2048, 1025, 96)
    assert full[1] == 0 and short[1] == 2048 and full != short
    assert K.tune_key(2048, 2048, 96) == K.tune_key(2048, 5000, 96) == full  # window >= T is full causal
    assert K.tune_key(2048, 1025, 96) != K.tune_key(2048, 64, 96)
    assert K.tune_key(2048, None, 6) != K.tune_key(2048, None, 96)
    for kind, keys in K._TUNE_KEYS.items():
        assert {"TUNE_T", "TUNE_W", "TUNE_BH", "GROUPS", "HEAD_DIM"} <= set(keys), kind
        assert set(keys) <= set(K._KERNELS[kind].arg_names), kind
        assert K._tuned(kind, "sm90").keys == keys
    # the launchers pass tune_key's values: record the forward's arguments for a full and a windowed call
    seen = []
    monkeypatch.setattr(K, "_launch", lambda kind, dev, rows, cols, *args, **kw: seen.append(
        dict(zip(K._KERNELS[kind].arg_names, args))))
    q, k, v, _ = _inputs(1, 40, 4, 2, 16, DTYPES[0])
    K.attention_fwd(q, k, v, None, 0.25)
    K.attention_fwd(q, k, v, 21, 0.25)
    assert [(a["TUNE_T"], a["TUNE_W"], a["TUNE_BH"], a["GROUPS"]) for a in seen] == [(64, 0, 16, 2), (64, 32, 16, 2)]


_OFFSETS_SCRIPT = """
import json, math, torch
from nanotrain.ops import attention as A
from nanotrain.kernels import attention as K
# q, k, v, do interleaved in one lazily allocated buffer whose positions are 2^26 elements apart: positions 32
# and up sit past 2^31, where an int32 position * stride wraps (only the touched pages become memory)
T, D, stride = 40, 16, 2**26
buf = torch.empty(T * stride, dtype=torch.float32)
q, k, v, do = (buf.as_strided((1, T, 1, D), (T * stride, stride, D, 1), i * D) for i in range(4))
for t in (q, k, v, do):
    t.copy_(torch.randn(1, T, 1, D))
qc, kc, vc, doc = (t.contiguous().double().requires_grad_(True) for t in (q, k, v, do))
res = {}
for window in (None, 9):
    ref = A.reference(qc, kc, vc, window)
    gq, gk, gv = torch.autograd.grad(ref, (qc, kc, vc), doc)
    out, lse = K.attention_fwd(q, k, v, window, 1 / math.sqrt(D))
    dq, dk, dv = K.attention_bwd(do, q, k, v, out, lse, window, 1 / math.sqrt(D))
    err = max((a.double() - b).abs().max().item() for a, b in [(out, ref), (dq, gq), (dk, gk), (dv, gv)])
    seqlens = torch.tensor([T], dtype=torch.int32)
    dec = K.attention_decode(q[:, -3:], k, v, seqlens, window, 1 / math.sqrt(D), num_splits=1)
    err = max(err, (dec.double() - ref[:, -3:]).abs().max().item())
    res[str(window)] = err < 1e-4
print(json.dumps(res))
"""


def test_offsets_past_2_31_under_the_interpreter():
    """q, k, v, do whose position * stride passes 2^31 (positions 2^26 elements apart): forward, backward and
    decode read the right rows. The interpreter keeps int32 arithmetic in int32, so a wrapped offset reads
    outside the buffer (a crash, hence the subprocess) or wrong data."""
    assert run_interpreted(_OFFSETS_SCRIPT) == {"None": True, "9": True}


def test_nan_in_inputs_reaches_exactly_the_outputs_it_touches():
    """A NaN in q or k makes NaN exactly the outputs the reference makes NaN (forward and split decode):
    never swallowed by the running max, never spread past the window."""
    from nanotrain.kernels import attention as K

    B, T, H, Hkv, D, window = 1, 40, 2, 1, 16, 7
    q, k, v, _ = _inputs(B, T, H, Hkv, D, DTYPES[0])
    k[0, 10, 0, 3] = float("nan")
    q[0, 30, 1, 0] = float("nan")
    ref = A.reference(q, k, v, window)
    got, lse = K.attention_fwd(q, k, v, window, 1 / math.sqrt(D))
    assert ref.isnan().any() and torch.equal(got.isnan(), ref.isnan())
    assert got[0, 10:17].isnan().all() and not got[0, 17:30].isnan().any()
    k_cache, v_cache = k.contiguous(), v.contiguous()
    seqlens = torch.full((B,), T, dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = K.attention_decode(q[:, 25:], k_cache, v_cache, seqlens, None, 1 / math.sqrt(D), num_splits=splits)
        ref_d = A.reference_decode(q[:, 25:], k_cache, v_cache, seqlens, None)
        assert torch.equal(out.isnan(), ref_d.isnan()) and out.isnan().all()  # every query sees key 10


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


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 768])
def test_gpu_decode_batch1_splits_the_cache_across_sms(window, monkeypatch):
    """A batch-1 sample (16 query heads, one token against 6000 cached positions) splits its KV range so the
    grid covers the SMs, and the split result equals the reference and the unsplit kernel."""
    from nanotrain.kernels import attention as K

    B, H, Hkv, D, Tmax, n = 1, 16, 4, 128, 8192, 6000
    dtype = torch.bfloat16
    k_cache = torch.randn(B, Tmax, Hkv, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(B, Tmax, Hkv, D, device="cuda", dtype=dtype)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype)
    seqlens = torch.tensor([n], dtype=torch.int32, device="cuda")
    splits = []
    combine = K.combine_decode_splits
    monkeypatch.setattr(K, "combine_decode_splits",
                        lambda o, lse, out: splits.append(o.shape[0]) or combine(o, lse, out))
    got = K.attention_decode(q, k_cache, v_cache, seqlens, window, 1 / math.sqrt(D))
    assert len(splits) == 1 and splits[0] > 1, splits
    unsplit = K.attention_decode(q, k_cache, v_cache, seqlens, window, 1 / math.sqrt(D), num_splits=1)
    ref64 = A.reference_decode(q.double(), k_cache.double(), v_cache.double(), seqlens, window)
    base = (A.reference_decode(q, k_cache, v_cache, seqlens, window).double() - ref64).abs().max().item()
    for out in (got, unsplit):
        assert (out.double() - ref64).abs().max().item() <= 2 * base + 1e-6


@pytest.mark.gpu
def test_gpu_attention_offsets_past_2_31_elements():
    """One sequence whose (T, H, D) slice holds more than 2^31 elements (T = 196608, H = 128, D = 128): the
    position * stride offsets of q, k, v, out and the gradients pass int32. The forward and backward tails
    are checked against the reference on the last 256 positions (window 128: their inputs lie inside)."""
    from nanotrain.kernels import attention as K

    B, T, H, D, W, tail = 1, 196608, 128, 128, 128, 256
    dtype = torch.bfloat16
    assert T * H * D > 2**31
    try:
        q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(4))
        out, lse = K.attention_fwd(q, k, v, W, 1 / math.sqrt(D))
        dq, dk, dv = K.attention_bwd(do, q, k, v, out, lse, W, 1 / math.sqrt(D))
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 2^31-element attention tensors")
    qs, ks, vs = (x[:, -tail:].detach().double().requires_grad_(True) for x in (q, k, v))
    ref = A.reference(qs, ks, vs, W)
    ref.backward(do[:, -tail:].double())
    inside = slice(W, None)  # queries whose window, and keys whose queries' windows, lie inside the tail

    def rel(got, want):
        return ((got[:, -tail:][:, inside].double() - want[:, inside]).norm() / want[:, inside].norm()).item()

    assert rel(out, ref) < 1e-2
    assert rel(dq, qs.grad) < 2e-2 and rel(dk, ks.grad) < 2e-2 and rel(dv, vs.grad) < 2e-2
