"""Causal sliding-window attention: training (full sequences) and decoding (against a KV cache).

Semantics shared by every backend:
  q: (B, T, H, D), k and v: (B, T, Hkv, D) with H a multiple of Hkv (GQA: query head h reads
  kv head h // (H // Hkv)). Query t sees keys s with t - window < s <= t: `window` counts the keys
  visible to a query, itself included; window=None (or window >= T) is plain causal attention.
  Softmax scale defaults to 1/sqrt(D). Output (B, T, H, D) in q's dtype.

Backends, in order of preference (see registry.py): fused kernels where available, PyTorch SDPA,
then `reference`, the readable masked-softmax definition that every other backend is tested against.
Each fused backend is a `nanotrain::` custom op (one opaque node for torch.compile); `self_check` and
`self_check_decode` beside the references verify a fused backend on the device before it serves a case
(head_dim, window kind, GQA). The model resolves its backends once, when it is built (`resolve`);
`attention(...)` and `attention_decode(...)` resolve on each call, for tests and evaluation scripts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nanotrain.ops import registry

if TYPE_CHECKING:  # kernels/attention.py imports Triton: only the decode backends import it, when they run
    from nanotrain.kernels.attention import DecodePlan


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention wants q (B,T,H,D) and k, v (B,T,Hkv,D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 (or None for full causal), got {window}")


def window_mask(t_q: int, t_k: int, window: int | None, device: torch.device, q_offset: int = 0) -> Tensor:
    """Boolean (t_q, t_k) mask, True where query i (at position q_offset + i) may see key j."""
    qpos = torch.arange(t_q, device=device)[:, None] + q_offset
    kpos = torch.arange(t_k, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def reference(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None) -> Tensor:
    """Plain masked-softmax attention, computed in q's dtype with the softmax in float32.

    q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D).
    """
    _check_shapes(q, k, v, window)
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh = q.transpose(1, 2)                                   # (B, H, T, D)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, H, T, D)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = (qh @ kh.transpose(-1, -2)).float() * scale     # (B, H, T, T)
    scores = scores.masked_fill(~window_mask(T, k.shape[1], window, q.device), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return (probs @ vh).transpose(1, 2).contiguous()


def reference_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     window: int | None = None, scale: float | None = None) -> Tensor:
    """Attention of the newest Tq queries against a KV cache that already holds their keys.

    q: (B, Tq, H, D); k_cache/v_cache: (B, Tmax, Hkv, D); cache_seqlens: (B,) int, the number of
    valid cache positions per row (the Tq new tokens included), so the queries sit at positions
    cache_seqlens - Tq ... cache_seqlens - 1. Returns (B, Tq, H, D).
    """
    B, Tq, H, D = q.shape
    groups = H // k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        n = int(cache_seqlens[b])
        kh = k_cache[b, :n].transpose(0, 1).repeat_interleave(groups, dim=0)  # (H, n, D)
        vh = v_cache[b, :n].transpose(0, 1).repeat_interleave(groups, dim=0)
        qh = q[b].transpose(0, 1)                                             # (H, Tq, D)
        scores = (qh @ kh.transpose(-1, -2)).float() * scale                 # (H, Tq, n)
        scores = scores.masked_fill(~window_mask(Tq, n, window, q.device, q_offset=n - Tq), float("-inf"))
        out[b] = (scores.softmax(-1).to(q.dtype) @ vh).transpose(0, 1)
    return out


def sdpa(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None) -> Tensor:
    """PyTorch's scaled_dot_product_attention: its flash kernel when causal, a dense mask otherwise."""
    _check_shapes(q, k, v, window)
    T = q.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if window is None or window >= T:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = window_mask(T, T, window, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def case_props(head_dim: int, window: int | None, seq_len: int | None, gqa: bool) -> dict:
    """The registry props of an attention case: head_dim, window kind ("full" when every earlier key is
    visible, else "short") and whether queries share key/value heads (GQA)."""
    full = window is None or (seq_len is not None and window >= seq_len)
    return {"head_dim": int(head_dim), "window": "full" if full else "short", "gqa": bool(gqa)}


def attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None) -> Tensor:
    """Causal sliding-window attention through the best available backend, resolved on this call (see module
    doc; the model calls the backend it resolved when it was built instead)."""
    props = case_props(q.shape[-1], window, q.shape[1], q.shape[2] != k.shape[2])
    return registry.resolve("attention", q.device, q.dtype, **props).fn(q, k, v, window, scale)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     window: int | None = None, scale: float | None = None) -> Tensor:
    """Decoding/prefill attention against a KV cache (see reference_decode), resolved on this call."""
    props = case_props(q.shape[-1], window, k_cache.shape[1], q.shape[2] != k_cache.shape[2])
    backend = registry.resolve("attention_decode", q.device, q.dtype, **props)
    return backend.fn(q, k_cache, v_cache, cache_seqlens, window, scale)


@dataclass(frozen=True)
class Resolved:
    """The attention backends of one layer, resolved once when the model is built: `train(q, k, v, window,
    scale)` and `decode(q, k_cache, v_cache, cache_seqlens, window, scale)`, valid for `device_type` and
    `dtype` (the model falls back to the per-call functions for other tensors)."""
    device_type: str
    dtype: torch.dtype
    train: Callable[..., Tensor]
    decode: Callable[..., Tensor]
    names: tuple[str, str]  # the backends' names, for the startup report


def resolve(device: torch.device | str, dtype: torch.dtype, head_dim: int, window: int | None, seq_len: int,
            gqa: bool) -> Resolved:
    """Resolve (and self-check, on a GPU) the attention and decode backends of a layer's case."""
    device = torch.device(device)
    props = case_props(head_dim, window, seq_len, gqa)
    train = registry.resolve("attention", device, dtype, **props)
    decode = registry.resolve("attention_decode", device, dtype, **props)
    return Resolved(device.type, dtype, train.fn, decode.fn, (train.name, decode.name))


# ----------------------------------------------------------------------------------------------------------
# Self-checks (registry.register_self_check): a backend against the reference on small random inputs, with
# DESIGN.md's flash-attention rule: its max error against the float64 reference is at most twice the error of
# the reference itself run in the same dtype, plus a floor at float32 rounding, for the output and each
# gradient.
# ----------------------------------------------------------------------------------------------------------
_FLOOR = 1e-5  # relative to max(1, |result|): where the exact result is 0 the low-precision reference can be exact


def _check_inputs(device: torch.device, dtype: torch.dtype, head_dim: int, window: str, gqa: bool, T: int):
    gen = torch.Generator(device=device).manual_seed(0)
    H, Hkv = (4, 2) if gqa else (2, 2)
    shapes = ((1, T, H, head_dim), (1, T, Hkv, head_dim), (1, T, Hkv, head_dim), (1, T, H, head_dim))
    q, k, v, do = (torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes)
    return q, k, v, do, (None if window == "full" else T // 2 + 1)


def _worst(names: tuple[str, ...], got: tuple[Tensor, ...], ref64: tuple[Tensor, ...],
           lowp: tuple[Tensor, ...]) -> registry.CheckResult:
    """The result with the largest error/bound ratio among outputs and gradients (NaN counts as failed)."""
    worst = None
    for name, g, r, lo in zip(names, got, ref64, lowp):
        err = (g.double() - r).abs().max().item()
        base = (lo.double() - r).abs().max().item()
        bound = 2 * base + _FLOOR * max(1.0, r.abs().max().item())
        ratio = math.inf if not math.isfinite(err) else err / bound
        if worst is None or ratio > worst[0]:
            worst = (ratio, registry.CheckResult(err, bound, f"{name} max error"))
    return worst[1]


def self_check(fn: Callable[..., Tensor], device: torch.device, dtype: torch.dtype, head_dim: int = 64,
               window: str = "full", gqa: bool = False, **props) -> registry.CheckResult:
    """Run an attention backend `fn` forward and backward on one small case against the reference."""
    T = 48 if device.type == "cpu" else 200  # not a multiple of any block: the edge tiles run too
    q, k, v, do, w = _check_inputs(device, dtype, head_dim, window, gqa, T)
    results = []
    for run_dtype, run in ((dtype, fn), (torch.float64, reference), (dtype, reference)):
        qr, kr, vr = (x.detach().to(run_dtype).requires_grad_() for x in (q, k, v))
        out = run(qr, kr, vr, w, None)
        out.backward(do.to(run_dtype))
        results.append((out.detach(), qr.grad, kr.grad, vr.grad))
    return _worst(("out", "dq", "dk", "dv"), *results)


def self_check_decode(fn: Callable[..., Tensor], device: torch.device, dtype: torch.dtype, head_dim: int = 64,
                      window: str = "full", gqa: bool = False, **props) -> registry.CheckResult:
    """Run a decode backend `fn` (2 rows of different cache lengths, 3 new queries) against reference_decode."""
    Tmax = 40 if device.type == "cpu" else 160
    gen = torch.Generator(device=device).manual_seed(0)
    H, Hkv = (4, 2) if gqa else (2, 2)
    q = torch.randn(2, 3, H, head_dim, device=device, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(2, Tmax, Hkv, head_dim, device=device, generator=gen).to(dtype) for _ in "kv")
    seqlens = torch.tensor([Tmax, Tmax // 2 + 3], device=device, dtype=torch.int32)
    w = None if window == "full" else Tmax // 2 + 1
    got = fn(q, k_cache, v_cache, seqlens, w, None)
    ref64 = reference_decode(q.double(), k_cache.double(), v_cache.double(), seqlens, w)
    lowp = reference_decode(q, k_cache, v_cache, seqlens, w)
    return _worst(("out",), (got,), (ref64,), (lowp,))


_CASES = [{"head_dim": d, "window": w, "gqa": g} for d in (64, 128) for w in ("full", "short") for g in (False, True)]


# ----------------------------------------------------------------------------------------------------------
# Triton backend: fused flash kernels (nanotrain.kernels.attention) behind torch custom ops, so that
# torch.compile sees one opaque node per call and autograd runs our backward kernels.
# ----------------------------------------------------------------------------------------------------------
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


def triton_check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None, **props) -> str | None:
    """None if the Triton kernels can run for this device/dtype/head_dim, else the reason why not."""
    if head_dim is not None and head_dim not in _TRITON_HEAD_DIMS:
        dims = ", ".join(map(str, _TRITON_HEAD_DIMS))
        return f"head_dim {head_dim} is not supported (the Triton kernels take {dims})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"{dtype} is not supported on the GPU (bfloat16 or float16)"
    elif device.type == "cpu":  # the interpreter (tests); the registry enforces TRITON_INTERPRET=1 and forcing
        if dtype not in (torch.float32, torch.float16):
            return f"{dtype} is not supported under the Triton interpreter (float32 or float16; its bf16 dot is wrong)"
    else:
        return f"Triton does not run on {device.type} tensors"
    try:
        import triton  # noqa: F401

        from nanotrain.kernels import attention as _  # noqa: F401
    except Exception as e:  # an import failure is a reason to fall back, reported at startup
        return f"Triton cannot be imported: {type(e).__name__}: {e}"
    return None


@torch.library.custom_op("nanotrain::triton_attention_fwd", mutates_args=())
def _triton_attention_fwd(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], scale: float
                          ) -> tuple[Tensor, Tensor]:
    """(out (B,T,H,D), lse (B,H,T) fp32) from the Triton forward kernel."""
    from nanotrain.kernels import attention as kernels

    return kernels.attention_fwd(q, k, v, window, scale)


@torch.library.custom_op("nanotrain::triton_attention_bwd", mutates_args=())
def _triton_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          window: Optional[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the Triton backward kernels (deterministic: no atomics)."""
    from nanotrain.kernels import attention as kernels

    return kernels.attention_bwd(grad_out, q, k, v, out, lse, window, scale)


def _flash_fwd_fake(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], scale: float) -> tuple[Tensor, Tensor]:
    B, T, H, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


def _flash_bwd_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    window: Optional[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def flash_attention_backend(fwd_op, bwd_op, name: str, what: str):
    """The public function of a flash-attention backend whose custom op `fwd_op(q, k, v, window, scale)` gives
    (out, lse) and `bwd_op(grad_out, q, k, v, out, lse, window, scale)` gives (dq, dk, dv); registers both ops'
    fakes (shapes for torch.compile) and the autograd that connects them (the torch.library form of an
    autograd.Function: saves q, k, v, out and the log-sum-exp)."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, window, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.scale = window, scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, ctx.window, ctx.scale)
        return dq, dk, dv, None, None

    fwd_op.register_fake(_flash_fwd_fake)
    bwd_op.register_fake(_flash_bwd_fake)
    fwd_op.register_autograd(backward, setup_context=setup_context)

    def run(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None) -> Tensor:
        _check_shapes(q, k, v, window)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, _ = fwd_op(q, k, v, window, scale)
        return out

    run.__name__ = run.__qualname__ = name
    run.__doc__ = (f"{what} (forward and backward): same semantics as `reference`.\n\n"
                   "    q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D).\n    ")
    return run


triton_attention = flash_attention_backend(_triton_attention_fwd, _triton_attention_bwd, "triton_attention",
                                           "The fused Triton kernels")


@torch.library.custom_op("nanotrain::triton_attention_decode", mutates_args=())
def _triton_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                             window: Optional[int], scale: float) -> Tensor:
    """Decode/prefill attention against a KV cache from the Triton kernel."""
    from nanotrain.kernels import attention as kernels

    return kernels.attention_decode(q, k_cache, v_cache, cache_seqlens, window, scale)


@_triton_attention_decode.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, window: Optional[int],
      scale: float) -> Tensor:
    return q.new_empty(q.shape)


def triton_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            window: int | None = None, scale: float | None = None) -> Tensor:
    """The Triton decode kernel: same semantics as `reference_decode` (inference only, no autograd).

    q: (B, Tq, H, D); k_cache/v_cache: (B, Tmax, Hkv, D); cache_seqlens: (B,) int -> (B, Tq, H, D).
    """
    return _call_decode_op(_triton_attention_decode, q, k_cache, v_cache, cache_seqlens, window, scale)


def _call_decode_op(op: Callable[..., Tensor], q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                    window: int | None, scale: float | None) -> Tensor:
    """A fused decode backend's custom op on checked arguments: the window (>= 1, or None) and the scale
    (1/sqrt(D) by default), as every decode backend takes them."""
    if window is not None and window < 1:
        raise ValueError(f"attention_decode: window must be >= 1 (or None for full causal), got {window}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return op(q, k_cache, v_cache, cache_seqlens, window, scale)


# ----------------------------------------------------------------------------------------------------------
# AOT backend: the same kernels compiled ahead of time into nanotrain._C (kernels/_aot.py lists the variants:
# bfloat16, head_dim 64 and 128, every window kind and GQA shape), launched by csrc/attention/aot_ops.cpp. No
# Triton, no compile, no autotune at run time; autograd as the Triton path's.
# ----------------------------------------------------------------------------------------------------------
AOT_KERNELS = ("attn_fwd", "attn_preprocess", "attn_dkdv", "attn_dq")
AOT_HEAD_DIMS = (64, 128)


def _aot_unavailable(kernels: tuple[str, ...], ops: tuple[str, ...], device: torch.device, dtype: torch.dtype,
                     head_dim: int | None) -> str | None:
    """Why the cubins of `kernels` (launched by the extension's `ops`) cannot serve this case (None if they can):
    bfloat16 only, head_dim 64 or 128, and the extension's cubins for this GPU (see _ext.aot_unavailable)."""
    from nanotrain.ops import _ext

    device = torch.device(device)
    why = _ext.aot_unavailable(kernels, device, ops=ops)  # the extension, the device, the arch
    if why:
        return why
    if dtype != torch.bfloat16:
        return f"{dtype} has no ahead-of-time cubins (bfloat16 only; the next backend serves it)"
    if head_dim is not None and head_dim not in AOT_HEAD_DIMS:
        return f"head_dim {head_dim} has no ahead-of-time cubins (64 or 128; the next backend serves it)"
    return _ext.aot_unavailable(kernels, device, ops=ops, HEAD_DIM=head_dim) if head_dim is not None else None


def aot_check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None, **props) -> str | None:
    """Why the AOT attention cannot run here (None if it can): bfloat16 only, head_dim 64 or 128, and the
    extension's cubins for this GPU (see _ext.aot_unavailable)."""
    return _aot_unavailable(AOT_KERNELS, ("aot_attention_fwd", "aot_attention_bwd"), device, dtype, head_dim)


def _aot_ready(x: Tensor) -> Tensor:
    """x with a contiguous last dimension and a 16-byte aligned start (what every compiled variant assumes, as
    Triton's launcher assumes of torch's allocations): a copy only for an odd view."""
    return x if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 else x.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("nanotrain::aot_attention", mutates_args=())
def _aot_attention_fwd(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], scale: float) -> tuple[Tensor, Tensor]:
    """(out (B,T,H,D), lse (B,H,T) fp32) from the ahead-of-time compiled forward kernel."""
    q, k, v = (_aot_ready(x) for x in (q, k, v))
    B, T, H, D = q.shape
    out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    torch.ops.nanotrain.aot_attention_fwd(q, k, v, out, lse, window, scale)
    return out, lse


@torch.library.custom_op("nanotrain::aot_attention_grad", mutates_args=())
def _aot_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       window: Optional[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the ahead-of-time compiled backward kernels (deterministic: no atomics)."""
    grad_out, q, k, v, out = (_aot_ready(x) for x in (grad_out, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    torch.ops.nanotrain.aot_attention_bwd(grad_out, q, k, v, out, _aot_ready(lse.contiguous()), dq, dk, dv, window,
                                          scale)
    return dq, dk, dv


aot_attention = flash_attention_backend(_aot_attention_fwd, _aot_attention_bwd, "aot_attention",
                                        "The ahead-of-time compiled kernels of nanotrain._C")


def aot_decode_check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None, **props) -> str | None:
    """Why the AOT decode attention cannot run here (None if it can): bfloat16 only, head_dim 64 or 128, the
    extension's decode cubins for this GPU, and kernels/attention.py importable (its run_decode plans the split
    and combines it, for this backend as for the Triton one; importing it needs Triton, running it does not)."""
    why = _aot_unavailable(("attn_decode",), ("aot_attention_decode",), device, dtype, head_dim)
    if why:
        return why
    try:
        from nanotrain.kernels import attention as _  # noqa: F401
    except Exception as e:  # an import failure is a reason to fall back, reported at startup
        return f"kernels/attention.py (the decode plan) cannot be imported: {type(e).__name__}: {e}"
    return None


def aot_decode_launch(plan: DecodePlan, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, out: Tensor,
                      o_part: Tensor | None, l_part: Tensor | None, window: int | None, scale: float) -> None:
    """The `launch` of kernels/attention.py run_decode for the AOT backend: the extension's decode op with the
    plan's query tile and split length (the split count is o_part's first dimension)."""
    torch.ops.nanotrain.aot_attention_decode(q, k_cache, v_cache, cache_seqlens, out, o_part, l_part, window, scale,
                                             plan.block_m, plan.split_len)


@torch.library.custom_op("nanotrain::aot_decode_attention", mutates_args=())
def _aot_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                          window: Optional[int], scale: float) -> Tensor:
    """Decode/prefill attention against a KV cache from the ahead-of-time compiled decode kernel, planned,
    split and combined by the Triton backend's Python (kernels/attention.py run_decode)."""
    from nanotrain.kernels import attention as kernels

    q, k_cache, v_cache = (_aot_ready(x) for x in (q, k_cache, v_cache))
    seqlens = cache_seqlens.to(torch.int32).contiguous()  # the cubins take int32 lengths (the model's dtype)
    seqlens = seqlens if seqlens.data_ptr() % 16 == 0 else seqlens.clone()
    return kernels.run_decode(aot_decode_launch, q, k_cache, v_cache, seqlens, window, scale)


@_aot_attention_decode.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, window: Optional[int],
      scale: float) -> Tensor:
    return q.new_empty(q.shape)


def aot_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         window: int | None = None, scale: float | None = None) -> Tensor:
    """The ahead-of-time compiled decode kernel of nanotrain._C: same semantics as `reference_decode`, same bits
    as `triton_attention_decode` (inference only, no autograd).

    q: (B, Tq, H, D); k_cache/v_cache: (B, Tmax, Hkv, D); cache_seqlens: (B,) int -> (B, Tq, H, D).
    """
    return _call_decode_op(_aot_attention_decode, q, k_cache, v_cache, cache_seqlens, window, scale)


registry.register_self_check("attention", self_check, _CASES)
registry.register_self_check("attention_decode", self_check_decode, _CASES)
registry.register("attention", "triton", triton_attention, triton_check, interpreter=True,
                  description="fused sliding-window flash attention (Triton)")
registry.register("attention", "aot", aot_attention, aot_check, fused=True, before="triton",
                  description="AOT-compiled flash attention from nanotrain._C (bf16, head_dim 64/128, no JIT)")
registry.register("attention", "sdpa", sdpa, description="PyTorch SDPA (dense mask for sliding windows)")
registry.register("attention", "reference", reference, description="pure-PyTorch masked softmax")
registry.register("attention_decode", "triton", triton_attention_decode, triton_check, interpreter=True,
                  description="fused KV-cache decode attention (Triton)")
registry.register("attention_decode", "aot", aot_attention_decode, aot_decode_check, fused=True, before="triton",
                  description="AOT-compiled KV-cache decode from nanotrain._C (bf16, head_dim 64/128, no JIT)")
registry.register("attention_decode", "reference", reference_decode, description="pure-PyTorch masked softmax")
