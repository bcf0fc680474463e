"""The compiled extension nanotrain._C, loaded lazily: whether it is there, how it was built, which ops it has.

The extension registers its ops with the torch dispatcher (TORCH_LIBRARY(nanotrain, ...)), so once loaded
they are called as torch.ops.nanotrain.<name>. This module also registers their fake (meta)
implementations, which torch.compile and torch.library.opcheck need; the C++ library names this module
(set_python_module) so that torch can point here when a fake is missing.

Set NANOTRAIN_NO_EXT=1 to run as if the extension were absent (tests use this; so can a user who suspects
a broken build). Nothing here imports nanotrain._C at import time: `import nanotrain` never needs it.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from types import ModuleType

import torch

REINSTALL = "reinstall with `pip install --no-build-isolation -e .`"
DISABLE_VAR = "NANOTRAIN_NO_EXT"

_absent_reason: str | None = None
_fakes_registered = False
_missing_ops: list[str] = []  # ops these sources fake but the loaded build lacks (a stale build: not used)


@functools.lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """nanotrain._C, imported once (its ops and fakes registered), or None when it is absent or disabled."""
    global _absent_reason
    if os.environ.get(DISABLE_VAR) == "1":
        _absent_reason = f"disabled by {DISABLE_VAR}=1"
        return None
    try:
        module = importlib.import_module("nanotrain._C")
    except ImportError as e:  # not built (pure-Python install), or built against another torch
        missing = isinstance(e, ModuleNotFoundError) and e.name == "nanotrain._C"
        _absent_reason = "not built" if missing else f"cannot load it ({e})"
        return None
    global _fakes_registered, _missing_ops
    if not _fakes_registered:  # once per process, also when a test clears the cache of load_extension
        _missing_ops = _register_fakes()
        _fakes_registered = True
    if _missing_ops:  # the sources gained ops since this build (e.g. after a git pull without a rebuild)
        _absent_reason = (f"built from older sources (it lacks nanotrain::{', nanotrain::'.join(_missing_ops[:3])}"
                          f"{', ...' if len(_missing_ops) > 3 else ''})")
        return None
    return module


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.nanotrain, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def extension_status() -> str:
    """One line for the startup report, e.g. 'built with CUDA 13.0 for sm_80+sm_90a (torch 2.14.1)'."""
    module = load_extension()
    if module is None:
        how = "unset NANOTRAIN_NO_EXT" if _absent_reason and DISABLE_VAR in _absent_reason else REINSTALL
        return f"absent: {_absent_reason}: {how}"
    info = build_info()
    built_for = f"torch {info['torch_version']}"
    if info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
        built_for += f", but torch {torch.__version__} runs: {REINSTALL}"
    if info["with_cuda"]:
        return f"built with CUDA {info['cuda_version']} for {info['cuda_arches']} ({built_for}); {aot_summary()}"
    return f"built CPU-only ({built_for})"


def build_info() -> dict:
    """The facts compiled into the extension: with_cuda, cuda_arches, cuda_version, torch_version ({} if absent)."""
    module = load_extension()
    if module is None:
        return {}
    return {
        "with_cuda": bool(module.WITH_CUDA),
        "cuda_arches": module.CUDA_ARCHES,
        "cuda_version": module.CUDA_VERSION,
        "torch_version": module.TORCH_VERSION,
    }


def aot_table() -> list[dict]:
    """The ahead-of-time compiled kernels nanotrain._C embeds, one dict per cubin (kernels/_aot.py generates it):
    kernel, label, arch ("80", "90a"), function, params (name, kind, hint, dtype, in the kernel's order),
    constexprs, num_warps, num_stages, shared, sha256, cubin_bytes. [] when the extension is absent or was built
    without CUDA (no nvcc, NANOTRAIN_NO_CUDA=1)."""
    module = load_extension()
    if module is None:
        return []
    return json.loads(getattr(module, "AOT_TABLE", "[]"))


def aot_summary() -> str:
    """One line on the embedded cubins, e.g. 'AOT cubins: sym_matmul x5, axpby_matmul x4 for sm_80, sm_90a'."""
    table = aot_table()
    if not table:
        return "AOT cubins: none (built without CUDA: the Triton JIT path serves the kernels)"
    kernels: dict[str, set[str]] = {}
    for row in table:
        kernels.setdefault(row["kernel"], set()).add(row["label"])
    arches = sorted({row["arch"] for row in table}, key=lambda a: (int(a.rstrip("a")), a))
    listed = ", ".join(f"{k} x{len(labels)}" for k, labels in kernels.items())
    return f"AOT cubins: {listed} for {', '.join('sm_' + a for a in arches)}"


def device_arch(device: torch.device) -> str:
    """The cubin arch that runs on a CUDA device: "90a" for compute capability 9.0 (Triton compiles sm_90a
    there), "80" for 8.0, ... (the same rule as csrc/aot/launcher.cpp's device_arch)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{10 * major + minor}" + ("a" if major == 9 else "")


def aot_unavailable(kernels: tuple[str, ...], device: torch.device, ops: tuple[str, ...] | None = None,
                    **constexprs: int) -> str | None:
    """Why the extension's ahead-of-time cubins cannot serve `kernels` on `device` (None if they can): the
    extension is absent, was built without CUDA, has no CUDA kernel for the ops (`ops`, default aot_<kernel>),
    or holds no cubin of one of the kernels for this device's architecture (with these constexpr values, e.g.
    HEAD_DIM=128)."""
    if load_extension() is None:
        return f"extension nanotrain._C {extension_status()}"
    table = aot_table()
    if not table:
        return "the extension was built without CUDA (no nvcc at build time, or NANOTRAIN_NO_CUDA=1): no cubins"
    if device.type != "cuda":
        return f"device type '{device.type}' unsupported (the cubins run on CUDA GPUs only)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    for op in ops if ops is not None else tuple(f"aot_{k}" for k in kernels):
        if not has_kernel(op, "CUDA"):
            return f"the extension has no CUDA kernel for nanotrain::{op}"
    arch = device_arch(device)
    held = sorted({row["arch"] for row in table})
    for kernel in kernels:
        if not any(row["kernel"] == kernel and row["arch"] == arch for row in table):
            return (f"no cubin of {kernel} for sm_{arch} (the extension holds sm_{', sm_'.join(held)}): rebuild with "
                    f"NANOTRAIN_CUDA_ARCHES including {arch}")
        if constexprs and not any(row["kernel"] == kernel and row["arch"] == arch and
                                  all(row["constexprs"].get(k) == v for k, v in constexprs.items()) for row in table):
            which = ", ".join(f"{k}={v}" for k, v in constexprs.items())
            return f"no cubin of {kernel} with {which} (see kernels/_aot.py VARIANTS for the compiled ones)"
    return None


def has_op(name: str) -> bool:
    """Whether torch.ops.nanotrain.<name> exists (the extension is loaded and defines it)."""
    if load_extension() is None:
        return False
    try:
        getattr(torch.ops.nanotrain, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether op nanotrain::<name> has a kernel for `dispatch_key` ("CPU", "CUDA") in this build."""
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"nanotrain::{name}", dispatch_key)


def _register_fakes() -> list[str]:
    """Shapes and dtypes of each op's outputs without computing them (torch.compile, opcheck). Returns the ops
    these sources have a fake for but the loaded build does not define (a build older than the sources)."""
    missing: list[str] = []

    def fake(name: str):
        if not _op_defined(name):
            missing.append(name)
            return lambda fn: fn
        return torch.library.register_fake(f"nanotrain::{name}")

    @fake("best_fit_pack")
    def _best_fit_pack_fake(tokens, offsets, num_rows, row_len):
        # rows: (R, row_len) with R <= num_rows known only after packing (an abandoned row ends the call).
        num_done = torch.library.get_ctx().new_dynamic_size(min=0, max=num_rows)
        rows = tokens.new_empty((num_done, row_len))
        consumed = offsets.new_empty((offsets.shape[0] - 1,), dtype=torch.bool)
        cropped = offsets.new_empty((), dtype=torch.int64)
        return rows, consumed, cropped

    # The ahead-of-time Muon products write into `out` and return nothing: the fakes only check what the C++
    # kernels check about shapes (torch.compile traces them; opcheck runs them on meta tensors).
    @fake("aot_sym_matmul")
    def _aot_sym_matmul_fake(P, S, out, alpha, Z, beta, gamma):
        torch._check(P.dim() == 3 and S.shape == P.shape, lambda: "aot_sym_matmul: S must have P's (B, M, K) shape")
        torch._check(out.shape == (P.shape[0], P.shape[1], P.shape[1]), lambda: "aot_sym_matmul: out must be (B, M, M)")
        torch._check(Z is None or Z.shape == out.shape, lambda: "aot_sym_matmul: Z must have out's shape")
        return None

    @fake("aot_attention_fwd")
    def _aot_attention_fwd_fake(q, k, v, out, lse, window, scale):
        B, T, H, D = q.shape
        torch._check(out.shape == q.shape, lambda: "aot_attention_fwd: out must have q's (B, T, H, D) shape")
        torch._check(lse.shape == (B, H, T), lambda: "aot_attention_fwd: lse must be (B, H, T)")
        torch._check(k.shape == v.shape and H % k.shape[2] == 0,
                     lambda: "aot_attention_fwd: k, v must be (B, T, Hkv, D)")
        return None

    @fake("aot_attention_bwd")
    def _aot_attention_bwd_fake(grad_out, q, k, v, out, lse, dq, dk, dv, window, scale):
        torch._check(dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape,
                     lambda: "aot_attention_bwd: dq, dk, dv must have the shapes of q, k, v")
        return None

    @fake("aot_axpby_matmul")
    def _aot_axpby_matmul_fake(B, X, out, alpha):
        torch._check(X.dim() == 3 and out.shape == X.shape, lambda: "aot_axpby_matmul: out must have X's shape")
        torch._check(B.shape == (X.shape[0], X.shape[1], X.shape[1]), lambda: "aot_axpby_matmul: B must be (B, M, M)")
        return None

    # The ahead-of-time FP8 casts and GEMM (csrc/fp8/aot_ops.cpp) allocate their outputs, as kernels/fp8.py's
    # quantize, quantize_rows_and_cols and matmul do: the same shapes and dtypes here.
    @fake("aot_fp8_quantize")
    def _aot_fp8_quantize_fake(x, fp8_dtype, mode, power_of_2, write_main, write_t):
        torch._check(x.dim() == 2, lambda: "aot_fp8_quantize: x must be 2-D (rows, cols)")
        torch._check(mode in (-1, 0, 1), lambda: "aot_fp8_quantize: mode must be -1, 0 or 1")
        R, C = x.shape
        scale_shape = () if mode == -1 else ((R, 1) if mode == 1 else (1, C))
        return (x.new_empty((R, C) if write_main else (0,), dtype=fp8_dtype),
                x.new_empty(scale_shape, dtype=torch.float32),
                x.new_empty((C, R) if write_t else (0,), dtype=fp8_dtype))

    @fake("aot_fp8_quantize_dual")
    def _aot_fp8_quantize_dual_fake(x, fp8_dtype, power_of_2):
        torch._check(x.dim() == 2, lambda: "aot_fp8_quantize_dual: x must be 2-D (rows, cols)")
        R, C = x.shape
        return (x.new_empty((R, C), dtype=fp8_dtype), x.new_empty((R, 1), dtype=torch.float32),
                x.new_empty((C, R), dtype=fp8_dtype), x.new_empty((1, C), dtype=torch.float32))

    @fake("aot_fp8_matmul")
    def _aot_fp8_matmul_fake(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                     lambda: "aot_fp8_matmul: a (M, K) and b (K, N) do not chain")
        return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)

    @fake("aot_attention_decode")
    def _aot_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, out, o_part, l_part, window, scale, block_m,
                                   split_len):
        B, Tq, H, D = q.shape
        torch._check(k_cache.dim() == 4 and k_cache.shape[0] == B and k_cache.shape[3] == D
                     and H % k_cache.shape[2] == 0, lambda: "aot_attention_decode: k_cache must be (B, Tmax, Hkv, D)")
        torch._check(v_cache.shape == k_cache.shape, lambda: "aot_attention_decode: v_cache must have k_cache's shape")
        torch._check(cache_seqlens.shape == (B,), lambda: "aot_attention_decode: cache_seqlens must be (B,)")
        torch._check(out.shape == q.shape, lambda: "aot_attention_decode: out must have q's (B, Tq, H, D) shape")
        torch._check((o_part is None) == (l_part is None),
                     lambda: "aot_attention_decode: o_part and l_part go together (a split) or not at all")
        if o_part is not None:
            Z = o_part.shape[0]
            torch._check(o_part.shape == (Z, B, H, Tq, D) and l_part.shape == (Z, B, H, Tq),
                         lambda: "aot_attention_decode: o_part must be (Z, B, H, Tq, D) and l_part (Z, B, H, Tq)")
        return None

    # The ahead-of-time Muon step stages (csrc/muon/aot_ops.cpp) write into their mutated arguments: the fakes check
    # the shapes the C++ ops check.
    def _stack_vectors(name, t, K, n):
        torch._check(t.dim() == 2 and t.shape[0] == K and t.shape[1] == n, lambda: f"{name} must be ({K}, {n})")

    @fake("aot_muon_momentum")
    def _aot_muon_momentum_fake(grads, momentum_buffer, rsq, momentum):
        torch._check(grads.dim() == 3 and momentum_buffer.shape == grads.shape,
                     lambda: "aot_muon_momentum: momentum_buffer must have grads' (K, R, C) shape")
        _stack_vectors("aot_muon_momentum: rsq", rsq, grads.shape[0], grads.shape[1])
        return None

    @fake("aot_muon_eq_scale")
    def _aot_muon_eq_scale_fake(rsq, f, norm_safety):
        torch._check(rsq.dim() == 2, lambda: "aot_muon_eq_scale: rsq must be (K, R)")
        _stack_vectors("aot_muon_eq_scale: f", f, rsq.shape[0], rsq.shape[1])
        return None

    @fake("aot_scale_cast")
    def _aot_scale_cast_fake(x, f, out):
        torch._check(x.dim() == 3 and out.shape == x.shape, lambda: "aot_scale_cast: out must have x's shape")
        torch._check(tuple(f.shape) in ((x.shape[0], x.shape[1]), (x.shape[0],)),
                     lambda: "aot_scale_cast: f must be (K, R) or (K,)")
        return None

    @fake("aot_sumsq_rows")
    def _aot_sumsq_rows_fake(x, out, round_to):
        torch._check(x.dim() == 3, lambda: "aot_sumsq_rows: x must be (K, R, C)")
        _stack_vectors("aot_sumsq_rows: out", out, x.shape[0], x.shape[1])
        return None

    @fake("aot_normuon_scale")
    def _aot_normuon_scale_fake(q, second_momentum, f, red_size, target_norm, beta2):
        torch._check(q.dim() == 2, lambda: "aot_normuon_scale: q must be (K, L)")
        _stack_vectors("aot_normuon_scale: second_momentum", second_momentum, q.shape[0], q.shape[1])
        _stack_vectors("aot_normuon_scale: f", f, q.shape[0], q.shape[1])
        return None

    @fake("aot_muon_apply")
    def _aot_muon_apply_fake(o, f, f_per_row, params, lr, weight_decay):
        torch._check(params.dim() == 3 and o.shape == params.shape, lambda: "aot_muon_apply: o must have params' shape")
        K, R, C = params.shape
        _stack_vectors("aot_muon_apply: f", f, K, R if f_per_row else C)
        return None

    return missing
