"""Ahead-of-time build of the Triton kernels into nanotrain._C: the variant table, the compiles, the C++ it generates.

At build time (setup.py, when nvcc is found) `python -m kernels._aot --arches "80;90a" --out DIR` compiles every
entry of VARIANTS for every target with kernels/_compile.py (no GPU needed) and writes into DIR:
  - aot_table.cpp: the cubins (string literals), one `Variant` row per (entry, target) with the compiled
    kernel's parameter list (kind, divisibility hint, pointee dtype), launch shape (warps, shared bytes),
    constexpr values and the count of trailing pointers Triton adds (read from the PTX entry), and
    `nanotrain_aot_table_json()`, the same table as JSON for Python (nanotrain.ops._ext.aot_table);
  - aot_args.h: per kernel, a struct with one field per parameter in the kernel's order and the function
    that turns it into launcher values. The C++ ops fill these structs by field name, so a kernel whose
    signature changes no longer compiles against its op until the op is updated: the argument packing is
    generated from the kernels, never written by hand twice.

Specialization: Triton's JIT compiles a kernel per call *class*: an int equal to 1 becomes the constant 1
(dropped from the parameters), a multiple of 16 gets a divisibility hint, pointers are 16-byte aligned. A
cubin compiled for a class serves exactly the calls of that class or of a narrower one; the launcher
(csrc/aot/launcher.cpp) takes the first row of the table whose classes admit the call, so each kernel's list
ends with a generic row (every int a plain i32) that serves any call whose ints fit in 32 bits (the Muon
step's kernels excepted: see below).

Launch configurations are FIXED per architecture: each kernel's autotune list's first entry for that
architecture (what NANOTRAIN_AUTOTUNE=first picks), until a GPU has measured better ones. With the same
config and the same Triton, the cubin computes what the JIT path's does (the JIT may specialize a call more
narrowly, e.g. GROUPS == 1 as a constant, which changes the code but not the arithmetic), so the outputs are
expected bit for bit equal to the Triton backend's: NOT yet verified on a GPU (tests/test_aot.py and
tests/test_aot_decode.py, gpu-marked).
A call that no row admits (an unaligned pointer, an int past 32 bits, a flag combination not compiled) is
refused by the op with an error naming the triton backend; the backends' availability checks (dtype,
head_dim, arch) keep training calls from getting there.

The variants compiled (the training-critical ones; any other dtype or head_dim resolves to the Triton JIT backend):
  Attention (kernels/attention.py: forward, backward preprocess, dK/dV, dQ), bfloat16, HEAD_DIM 64 and 128,
  each with training-layout rows (without GQA: GROUPS the constant 1, as the JIT compiles it; with GQA) and a
  generic row. The window (full or sliding) is a runtime int, so every window kind is served by the same
  cubins.
  Muon products (kernels/newton_schulz.py), bfloat16 only (the iteration's compute dtype on the GPU),
  DOT_PRECISION tf32 (ignored for 16-bit operands), HAS_I False:
    sym_matmul   HAS_Z False: row-major, column-major (a tall matrix's transpose view), generic
                 HAS_Z True: row-major, generic
    axpby_matmul ADD_X True: row-major, column-major, generic;  ADD_X False (the Gram path): generic
  FP8 (kernels/fp8.py: amax, cast, GEMM), for sm89+ targets only (Entry.min_arch: the default "80;90a" build
  embeds them for sm_90a; Ada users add 89 to NANOTRAIN_CUDA_ARCHES), each flag combination with a training-
  layout row (contiguous, dims multiples of 16) and a generic row:
    fp8_cast     the casts of nanotrain/ops/fp8.py's recipes and self-checks (FP8_CASTS): tensorwise mode -1
                 with both copies of bf16 x / dy (e4m3 / e5m2) and of the fp32 weight; rowwise mode 2 (pow2) of
                 bf16 x and dy, fp32 weight mode 1 (main copy) and mode 0 (transposed copy); self-check modes 1
                 and 0 on bf16 with both copies. BLOCK 64 x 64 as _launch on a GPU.
    fp8_amax     the (x dtype, mode) pairs of those casts; BLOCK_C 256 for every C (a max is exact, whatever the
                 blocking: see _fp8_amax_config).
    fp8_matmul   a e4m3 or e5m2 x b e4m3 -> bf16 or fp32, FAST_ACCUM 0 and 1 (the autotune list's first config
                 for each: it differs on Hopper); the row variant is a row-major, b column-major, c row-major.
  A call with another flag combination (e.g. a custom Float8Config's e5m2 weights, or fp16 inputs) has no
  cubin: nanotrain/ops/fp8.py's aot wrappers send it to the Triton backend (aot_serves). The generic rows
  serve awkward shapes correctly, not fast: on sm_90a the GEMM's spill 1.3-2.8 KB per thread at the first
  configs (ptxas, measured; the unit-stride specialization the JIT would compile for such a call spills 3-6.4
  KB), the mode-2 amax's and cast's 152 and 16 bytes. Training's linears (dims multiples of 16) take the 'row'
  variants, none of which spills on sm_90a (sm_89 not measured).
  KV-cache decode (kernels/attention.py _attention_decode_kernel, launched through run_decode: the length
  checks, the split plan and the combine of the splits are the Python ones both backends share), bfloat16,
  HEAD_DIM 64 and 128, SPLIT False and True, per BLOCK_M (the call's, from Tq): 16: the sampling step (TQ the
  constant 1), the prompt (any TQ), generic; 32: generic; 64: the prompt, generic. MHA and GQA share the rows
  (GROUPS runtime), and so does every window kind (the window is runtime).
  Muon step (kernels/newton_schulz.py: momentum, eq_scale, scale_cast, sumsq_rows, normuon_scale, apply; see
  MUON_STEP_VARIANTS), float32 parameters/gradients/buffers and the bfloat16 iterate. The launchers derive block
  sizes from the shape, so the blocks are constexpr flags the op matches (csrc/muon/aot_ops.cpp), one cubin per
  block the d4..d26 stacks and their self-checks need, in the JIT's exact specialization of those calls (the
  reductions' order depends on it). scale_cast also has a generic row for every BLOCK_C from 16 to 1024 (any
  orthogonalize shape). A muon_update shape whose blocks have no cubin is refused by the aot backend's check.

This module never imports nanotrain.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field

DEFAULT_ARCHES = "80;90a"
CACHE_FORMAT = 2  # bump when the generated files change shape

# An example value per class of int argument (see the module doc).
ONE, DIV16, ANY = 1, 16, 17


@dataclass(frozen=True)
class Entry:
    """One specialization of one kernel: `args` are example values of its runtime parameters (classes: ONE,
    DIV16, ANY for ints, "*bf16" for pointers, a float for fp32) and of its flag constexprs; the block sizes
    and warps come from the per-architecture config table. `min_arch`: the lowest compute capability the entry
    is compiled for (FP8 needs sm89+); targets below it get no cubin of it (see `built_for`)."""
    kernel: str  # name in KERNELS
    label: str
    args: dict = field(hash=False)
    min_arch: tuple[int, int] = (0, 0)
    num_warps: int = 0  # 0: the config table's; else this entry's (a launcher that derives warps from a block size)


def _module(name: str):
    import importlib

    return importlib.import_module(f"kernels.{name}")


def _ns():
    return _module("newton_schulz")


def _sym_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    c = _ns()._sym_configs(capability)[0]
    return dict(c.kwargs), c.num_warps, c.num_stages


def _axpby_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    c = _ns()._axpby_configs(capability)[0]
    return dict(c.kwargs), c.num_warps, c.num_stages


def _attention_config(kind: str):
    def config(capability: tuple[int, int]) -> tuple[dict, int, int]:
        attn = _module("attention")
        bm, bn, warps, stages = attn._GPU_CONFIGS[attn.gpu_generation(capability)][kind][0]
        return {"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages
    return config


def _decode_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    # attention_decode's autotune list: BLOCK_N and the launch shape (its BLOCK_M is the call's, from Tq)
    attn = _module("attention")
    _, bn, warps, stages = attn._GPU_CONFIGS[attn.gpu_generation(capability)]["decode"][0]
    return {"BLOCK_N": bn}, warps, stages


def _preprocess_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    # attention_bwd launches it with BLOCK_M=64 and Triton's default launch shape (4 warps, 3 stages)
    return {"BLOCK_M": 64}, 4, 3


# The FP8 kernels (kernels/fp8.py) as kernels/fp8.py `_launch` and `matmul` launch them on a GPU. The two casts'
# block sizes are _launch's GPU values (fixed there, not tuned) and Triton's default launch shape (4 warps, 3
# stages, as a launch without num_warps gets); tests/test_aot_fp8.py checks them against _launch's launches.
FP8_AMAX_BLOCK_R, FP8_AMAX_BLOCK_C, FP8_CAST_TILE = 32, 256, 64


def _fp8_amax_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    # _launch takes BLOCK_C = min(256, next_pow2(C)): 256 for every C >= 129 (each training linear), smaller for
    # narrow tensors (the self-checks' C = 80 gets 128). One BLOCK_C serves every C here: the kernel's result is a
    # max (of |x|, per row, per column or of all), exact and independent of how the columns are blocked (NaN
    # included: every NaN becomes the same canonical NaN), so the amax, the scales and the fp8 bytes are the
    # JIT path's bit for bit whatever C is. (The grid, cdiv(R, BLOCK_R), does not depend on BLOCK_C.)
    return {"BLOCK_R": FP8_AMAX_BLOCK_R, "BLOCK_C": FP8_AMAX_BLOCK_C}, 4, 3


def _fp8_cast_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    return {"BLOCK_R": FP8_CAST_TILE, "BLOCK_C": FP8_CAST_TILE}, 4, 3


def _fp8_matmul_config(capability: tuple[int, int], args: dict) -> tuple[dict, int, int]:
    # kernels/fp8.py matmul autotunes over gpu_configs(capability, fast_accum) (Hopper's list for sm90+, Ada's for
    # sm89); NANOTRAIN_AUTOTUNE=first keeps the first entry, which depends on FAST_ACCUM on Hopper
    c = _module("fp8").gpu_configs(capability, bool(args["FAST_ACCUM"]))[0]
    return dict(c.kwargs), c.num_warps, c.num_stages
def _muon_step_config(capability: tuple[int, int]) -> tuple[dict, int, int]:
    # The Muon step's launchers (kernels/newton_schulz.py _rows_cfg, muon_eq_scale, normuon_scale) derive the block
    # sizes from the shape, the same on every architecture: each entry carries its blocks (flags the op matches)
    # and warps; 4 warps and Triton's default 3 stages otherwise.
    return {}, 4, 3


# kernel name -> (module in kernels/, function attribute, config of a capability -> (constexprs, warps, stages))
KERNELS = {
    "sym_matmul": ("newton_schulz", "_sym_matmul_kernel", _sym_config),
    "axpby_matmul": ("newton_schulz", "_axpby_matmul_kernel", _axpby_config),
    "attn_fwd": ("attention", "_attention_fwd_kernel", _attention_config("fwd")),
    "attn_preprocess": ("attention", "_attention_bwd_preprocess_kernel", _preprocess_config),
    "attn_dkdv": ("attention", "_attention_bwd_dkdv_kernel", _attention_config("dkdv")),
    "attn_dq": ("attention", "_attention_bwd_dq_kernel", _attention_config("dq")),
    "fp8_amax": ("fp8", "_fp8_amax_kernel", _fp8_amax_config),
    "fp8_cast": ("fp8", "_fp8_cast_kernel", _fp8_cast_config),
    "fp8_matmul": ("fp8", "_fp8_matmul_kernel", _fp8_matmul_config),
    "attn_decode": ("attention", "_attention_decode_kernel", _decode_config),
    # the Muon step around the iteration: block sizes and warps are per entry (see _muon_step_config)
    "muon_momentum": ("newton_schulz", "_muon_momentum_kernel", _muon_step_config),
    "muon_eq_scale": ("newton_schulz", "_muon_eq_scale_kernel", _muon_step_config),
    "scale_cast": ("newton_schulz", "_scale_cast_kernel", _muon_step_config),
    "sumsq_rows": ("newton_schulz", "_sumsq_rows_kernel", _muon_step_config),
    "normuon_scale": ("newton_schulz", "_normuon_scale_kernel", _muon_step_config),
    "muon_apply": ("newton_schulz", "_muon_apply_kernel", _muon_step_config),
}


def _kernel_fn(kernel: str):
    module, attr, _ = KERNELS[kernel]
    return getattr(_module(module), attr)


def _config(kernel: str, capability: tuple[int, int], args: dict | None = None) -> tuple[dict, int, int]:
    """A kernel's launch config for a target; a config function of two parameters also gets the entry's args
    (whose flags may choose the config: the FP8 GEMM's FAST_ACCUM)."""
    import inspect

    fn = KERNELS[kernel][2]
    if len(inspect.signature(fn).parameters) == 2:
        return fn(capability, args or {})
    return fn(capability)


def _strides(layout: str, prefix: str, rows: str, cols: str) -> dict:
    """Example strides of a (batch, rows, cols) operand: 'row' (cols contiguous), 'col' (rows contiguous), 'any'."""
    b, r, c = f"stride_{prefix}b", f"stride_{prefix}{rows}", f"stride_{prefix}{cols}"
    if layout == "row":
        return {b: DIV16, r: DIV16, c: ONE}
    if layout == "col":
        return {b: DIV16, r: ONE, c: DIV16}
    return {b: ANY, r: ANY, c: ANY}


def _sym_entry(has_z: bool, layout: str) -> Entry:
    square = "row" if layout != "any" else "any"  # Z and C: (M, M) buffers the op allocates row-major
    dim = ANY if layout == "any" else DIV16
    args = {"P_ptr": "*bf16", "S_ptr": "*bf16", "Z_ptr": "*bf16", "C_ptr": "*bf16", "M": dim, "K": dim,
            **_strides(layout, "p", "m", "k"), **_strides(layout, "s", "m", "k"),
            **_strides(square, "z", "m", "n"), **_strides(square, "c", "m", "n"),
            "alpha": 1.0, "beta": 0.0, "gamma": 0.0, "HAS_Z": has_z, "HAS_I": False, "DOT_PRECISION": "tf32"}
    return Entry("sym_matmul", f"bf16 HAS_Z={int(has_z)} {layout}", args)


def _axpby_entry(add_x: bool, layout: str) -> Entry:
    dim = ANY if layout == "any" else DIV16
    args = {"B_ptr": "*bf16", "X_ptr": "*bf16", "Y_ptr": "*bf16", "M": dim, "N": dim,
            **_strides("row" if layout != "any" else "any", "b", "m", "k"),
            **_strides(layout, "x", "m", "n"), **_strides(layout, "y", "m", "n"),
            "alpha": 1.0, "ADD_X": add_x, "DOT_PRECISION": "tf32"}
    return Entry("axpby_matmul", f"bf16 ADD_X={int(add_x)} {layout}", args)


def signature(fn) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each parameter of a @triton.jit kernel, in order; also under TRITON_INTERPRET=1,
    where the kernel is an InterpretedFunction without Triton's parameter objects (the tests run there)."""
    if hasattr(fn, "params"):
        return [(n, bool(p.is_constexpr)) for n, p in zip(fn.arg_names, fn.params)]
    import inspect

    params = inspect.signature(fn.fn).parameters
    return [(n, "constexpr" in str(params[n].annotation)) for n in fn.arg_names]


# The attention kernels' pointers: (B, T, H, D) tensors in bfloat16, (B, H, T) float32 statistics.
_ATTENTION_POINTERS = {**{n: "*bf16" for n in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")},
                       "LSE": "*fp32", "DELTA": "*fp32"}


def _attention_entry(kernel: str, head_dim: int, layout: str) -> Entry:
    """An attention kernel's entry: 'row' is training's layout ((B, T, H, D) tensors with D = head_dim, so every
    stride a multiple of 16; T a multiple of 16; H, GROUPS and the window any value); 'mha' the same without
    GQA (GROUPS the constant 1); 'any' the generic one."""
    fn = _kernel_fn(kernel)
    args: dict = {}
    for name, is_constexpr in signature(fn):
        if is_constexpr:
            continue
        if name in _ATTENTION_POINTERS:
            args[name] = _ATTENTION_POINTERS[name]
        elif name in ("qk_scale", "sm_scale"):
            args[name] = 1.0
        elif name == "GROUPS" and layout == "mha":
            args[name] = ONE  # no GQA: the JIT compiles the constant 1 too (measured: dK/dV at D=128 on sm_90a
            # spills 440 bytes with a runtime GROUPS, none with the constant)
        elif layout == "any" or name in ("H", "H_KV", "GROUPS", "window"):
            args[name] = ANY
        else:  # strides, T, and the autotuner's buckets TUNE_* (powers of 2 >= 16, or 0: unused by the math)
            args[name] = DIV16
    args["HEAD_DIM"] = head_dim
    return Entry(kernel, f"bf16 HEAD_DIM={head_dim} {layout}", args)


# ---- FP8 (kernels/fp8.py): sm89+ targets only (FP8 tensor cores and conversions) --------------------------------
FP8_MIN_ARCH = (8, 9)
FP8_POINTERS = {"e4m3": "*fp8e4nv", "e5m2": "*fp8e5"}  # Triton's names of torch.float8_e4m3fn / float8_e5m2


def _fp8_x(layout: str) -> dict:
    """The cast's input (R, C): 'row' a contiguous tensor with R, C multiples of 16 (every training linear's x, dy
    and weight); 'any' the generic row."""
    if layout == "row":
        return {"R": DIV16, "C": DIV16, "stride_xr": DIV16, "stride_xc": ONE}
    return {"R": ANY, "C": ANY, "stride_xr": ANY, "stride_xc": ANY}


def _fp8_amax_entry(x: str, mode: int, layout: str) -> Entry:
    args = {"x_ptr": f"*{x}", "amax_ptr": "*fp32", "amax_col_ptr": "*fp32", **_fp8_x(layout), "MODE": mode}
    return Entry("fp8_amax", f"{x} MODE={mode} {layout}", args, FP8_MIN_ARCH)


def _fp8_cast_entry(x: str, fp8: str, mode: int, pow2: bool, write_main: bool, write_t: bool, layout: str) -> Entry:
    import torch

    fp8_module = _module("fp8")
    dtype = fp8_module._TORCH_FP8[fp8]
    mant, min_exp = fp8_module.FP8_FORMATS[dtype]
    args = {"x_ptr": f"*{x}", "amax_ptr": "*fp32", "amax_col_ptr": "*fp32", "out_ptr": FP8_POINTERS[fp8],
            "out_t_ptr": FP8_POINTERS[fp8], "scale_ptr": "*fp32", "scale_col_ptr": "*fp32", **_fp8_x(layout),
            "MODE": mode, "FP8_MAX": float(torch.finfo(dtype).max), "EPS_": fp8_module.EPS, "POW2": pow2,
            "MANT_BITS": mant, "MIN_EXP": min_exp, "WRITE_MAIN": write_main, "WRITE_T": write_t}
    writes = "+".join(w for w, on in (("main", write_main), ("t", write_t)) if on)
    return Entry("fp8_cast", f"{x}->{fp8} MODE={mode} POW2={int(pow2)} {writes} {layout}", args, FP8_MIN_ARCH)


def _fp8_matmul_entry(a: str, out: str, fast_accum: bool, layout: str) -> Entry:
    """a (M, K) in `a` x b (K, N) in e4m3 -> out (M, N): 'row' is the recipes' layout (a row-major, b column-major:
    the .t() of a row-major (N, K) copy, out row-major; M, N, K multiples of 16), 'any' the generic row. The
    scale strides (0: one scale per tensor, 1: per row / column) are plain ints in both, so one cubin serves the
    tensorwise and the rowwise recipes."""
    if layout == "row":
        ints = {"M": DIV16, "N": DIV16, "K": DIV16, "stride_am": DIV16, "stride_ak": ONE, "stride_bk": ONE,
                "stride_bn": DIV16, "stride_cm": DIV16, "stride_cn": ONE}
    else:
        ints = {n: ANY for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
                                 "stride_cn")}
    args = {"a_ptr": FP8_POINTERS[a], "b_ptr": FP8_POINTERS["e4m3"], "c_ptr": f"*{out}", "sa_ptr": "*fp32",
            "sb_ptr": "*fp32", **ints, "stride_sa": ANY, "stride_sb": ANY, "FAST_ACCUM": fast_accum}
    return Entry("fp8_matmul", f"{a} x e4m3 -> {out} FAST_ACCUM={int(fast_accum)} {layout}", args, FP8_MIN_ARCH)


# The casts nanotrain/ops/fp8.py makes, (x dtype, fp8 format, mode, power_of_2, write_main, write_t):
FP8_CASTS = [
    ("bf16", "e4m3", -1, False, True, True),   # tensorwise: x (and the self-check's mode -1)
    ("bf16", "e5m2", -1, False, True, True),   # tensorwise: dy
    ("fp32", "e4m3", -1, False, True, True),   # tensorwise: the fp32 master weight
    ("bf16", "e4m3", 2, True, True, True),     # rowwise: x and dy (quantize_dual), and its self-check
    ("fp32", "e4m3", 1, True, True, False),    # rowwise: the weight per row (forward)
    ("fp32", "e4m3", 0, True, False, True),    # rowwise: the weight per column, transposed (grad-input)
    ("bf16", "e4m3", 1, True, True, True),     # self_check_cast, mode 1
    ("bf16", "e4m3", 0, True, True, True),     # self_check_cast, mode 0
]
FP8_AMAX = sorted({(x, mode) for x, _, mode, _, _, _ in FP8_CASTS}, key=lambda k: (k[0], -k[1]))
# The GEMMs, (a format, out dtype, FAST_ACCUM); b is e4m3 in every recipe: e4m3 x e4m3 (forward, rowwise
# backward, self-check) and e5m2 x e4m3 (tensorwise dy times W or x), into bf16 (y, dx) or fp32 (dW: the
# weight's dtype), with and without fast accumulation (tensorwise forward / backward, rowwise all fast, the
# self-check both): all eight, so a custom Float8Config's choice of accumulation also has a cubin.
FP8_GEMMS = [(a, out, fast) for a in ("e4m3", "e5m2") for out in ("bf16", "fp32") for fast in (True, False)]

def _decode_entry(head_dim: int, block_m: int, split: bool, layout: str) -> Entry:
    """A decode kernel's entry (kernels/attention.py run_decode: the constexprs HEAD_DIM, BLOCK_M from Tq, SPLIT
    from the plan): 'step' is a sampling step (TQ the constant 1, as the JIT compiles it) on the model's
    layout (q, caches and out with D = head_dim contiguous, so every stride a multiple of 16); 'row' the same
    layout with any TQ (prefill); 'any' the generic one. H, GROUPS (MHA or GQA alike: it only picks the kv
    head) and the window are runtime ints in every row; SPLIT_LEN (a multiple of 128) and the TUNE_* buckets
    are multiples of 16 in the specialized rows. Without SPLIT the partial-output pointers are `out`, as the
    Triton launcher passes them (the code that reads them is compiled out)."""
    fn = _kernel_fn("attn_decode")
    part = "*fp32" if split else "*bf16"
    pointers = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "SEQLENS": "*i32", "OUT": "*bf16",
                "OPART": part, "LPART": part}
    args: dict = {}
    for name, is_constexpr in signature(fn):
        if is_constexpr:
            continue
        if name in pointers:
            args[name] = pointers[name]
        elif name == "qk_scale":
            args[name] = 1.0
        elif name == "TQ" and layout == "step":
            args[name] = ONE
        elif layout == "any" or name in ("TQ", "H", "GROUPS", "window"):
            args[name] = ANY
        else:  # strides, SPLIT_LEN, TUNE_*
            args[name] = DIV16
    args.update(HEAD_DIM=head_dim, BLOCK_M=block_m, SPLIT=split)
    return Entry("attn_decode", f"bf16 HEAD_DIM={head_dim} BLOCK_M={block_m} SPLIT={int(split)} {layout}", args)


# The decode rows per (HEAD_DIM, SPLIT): BLOCK_M 16 serves the sampling steps (Tq = 1) and short prompts,
# BLOCK_M 64 prompts over 32 tokens (the prefill's work grows with Tq^2), BLOCK_M 32 prompts of 17..32 tokens
# (little work: the generic row serves them).
_DECODE_LAYOUTS = {16: ("step", "row", "any"), 32: ("any",), 64: ("row", "any")}
# ---------------------------------------------------------------------------------------------------------------
# The Muon step (kernels/newton_schulz.py: momentum, eq_scale, scale_cast, sumsq_rows, normuon_scale, apply) on
# float32 stacks (K, m, n) (the optimizer's master weights, gradients and buffers; the iterate bfloat16).
# The launchers derive the blocks from the shape: the row-tiled kernels BLOCK_C = min(1024, next_pow2(max(C, 16)))
# with BLOCK_R = 4096 // BLOCK_C and 4 warps; eq_scale and normuon_scale BLOCK = min(4096, next_pow2(R or L)) with
# _vector_warps(BLOCK) warps. A cubin is compiled for each block the d4..d26 stacks and their self-checks need, in
# the exact specialization the JIT gives those calls (the reductions' order follows the loads' vectorization,
# which follows the divisibility hints: bit-for-bit equality with the JIT needs the same hints).
# "row": ints multiples of 16 and a unit column stride (a contiguous (K, m, n) stack with m, n multiples of 16);
# "col": its transposed view; "small"/"smallcol": the same with plain ints (the (n_head, 12) ve_gate stacks and
# the (8, 8) self-check); "16": with a batch stride multiple of 16; "any": every int plain (elementwise kernels
# only, whose result does not depend on the vectorization).
# ---------------------------------------------------------------------------------------------------------------
_OPERAND = {"row": (DIV16, DIV16, ONE), "col": (DIV16, ONE, DIV16), "small": (ANY, ANY, ONE),
            "small16": (DIV16, ANY, ONE), "smallcol": (ANY, ONE, ANY), "smallcol16": (DIV16, ONE, ANY),
            "any": (ANY, ANY, ANY)}


def _operand(layout: str, *names: str) -> dict:
    """Example strides (batch, row, column) of a (K, R, C) operand in `layout` (see _OPERAND)."""
    return dict(zip(names, _OPERAND[layout]))


def _rows_blocks(block_c: int) -> dict:
    return {"BLOCK_R": max(1, 4096 // block_c), "BLOCK_C": block_c}


def _size(layout: str) -> int:
    return DIV16 if layout in ("row", "col") else ANY


def _momentum_entry(layout: str, block_c: int) -> Entry:
    args = {"G_ptr": "*fp32", "MB_ptr": "*fp32", "RSQ_ptr": "*fp32", "R": _size(layout), "C": _size(layout),
            **_operand(layout, "stride_gb", "stride_gr", "stride_gc"),
            **_operand(layout, "stride_mb", "stride_mr", "stride_mc"), "momentum": 0.95, **_rows_blocks(block_c)}
    return Entry("muon_momentum", f"fp32 BLOCK_C={block_c} {layout}", args)


def _scale_cast_entry(layout: str, block_c: int) -> Entry:
    """'row': muon_update's call (per-row factors F (K, R)); 'any': any call (orthogonalize's per-matrix factor)."""
    f = {"stride_fb": DIV16, "stride_fr": ONE} if layout == "row" else {"stride_fb": ANY, "stride_fr": ANY}
    args = {"X_ptr": "*fp32", "F_ptr": "*fp32", "Y_ptr": "*bf16", "R": _size(layout), "C": _size(layout),
            **_operand(layout, "stride_xb", "stride_xr", "stride_xc"), **f,
            **_operand(layout, "stride_yb", "stride_yr", "stride_yc"), **_rows_blocks(block_c)}
    return Entry("scale_cast", f"fp32->bf16 BLOCK_C={block_c} {layout}", args)


def _sumsq_entry(layout: str, block_c: int) -> Entry:
    """The iterate (bf16) rounded to the parameters' dtype (fp32); 'col' layouts: a wide stack's column sums."""
    import triton.language as tl

    args = {"X_ptr": "*bf16", "OUT_ptr": "*fp32", "R": _size(layout), "C": _size(layout),
            **_operand(layout, "stride_xb", "stride_xr", "stride_xc"), "ROUND_TO": tl.float32,
            **_rows_blocks(block_c)}
    return Entry("sumsq_rows", f"bf16 ROUND_TO=fp32 BLOCK_C={block_c} {layout}", args)


def _apply_entry(layout: str, block_c: int) -> Entry:
    """'row': factors per row (stride_fc 0), 'col': per column (stride_fr 0) of a contiguous stack; 'any'."""
    if layout == "any":
        f = {"stride_fb": ANY, "stride_fr": ANY, "stride_fc": ANY}
    else:
        f = {"stride_fb": DIV16, "stride_fr": ONE if layout == "row" else DIV16,
             "stride_fc": DIV16 if layout == "row" else ONE}
    operand = "any" if layout == "any" else "row"
    args = {"O_ptr": "*bf16", "F_ptr": "*fp32", "P_ptr": "*fp32", "R": _size(operand), "C": _size(operand),
            **_operand(operand, "stride_ob", "stride_or", "stride_oc"), **f,
            **_operand(operand, "stride_pb", "stride_pr", "stride_pc"), "lr": 0.02, "lr_wd": 0.004,
            **_rows_blocks(block_c)}
    return Entry("muon_apply", f"bf16,fp32 BLOCK_C={block_c} {'per-row' if layout == 'row' else layout}", args)


def _eq_scale_entry(block: int) -> Entry:
    """R (the rows) a multiple of 16 from BLOCK 32 up, a plain int below (the ve_gate stacks' n_head rows)."""
    r = DIV16 if block >= 32 else ANY
    args = {"RSQ_ptr": "*fp32", "F_ptr": "*fp32", "R": r, "norm_safety": 1.01, "BLOCK": block}
    return Entry("muon_eq_scale", f"fp32 BLOCK={block} {'row' if r == DIV16 else 'small'}", args,
                 num_warps=_ns()._vector_warps(block))


def _normuon_entry(block: int) -> Entry:
    """L (the neurons) a multiple of 16 from BLOCK 32 up, plain below; second_momentum a (K, L) view (unit stride)."""
    n = DIV16 if block >= 32 else ANY
    args = {"Q_ptr": "*fp32", "SM_ptr": "*fp32", "F_ptr": "*fp32", "L": n, "red_size": 768.0, "target_norm": 27.7,
            "beta2": 0.95, "stride_smb": n, "stride_sml": ONE, "BLOCK": block}
    return Entry("normuon_scale", f"fp32 BLOCK={block} {'row' if n == DIV16 else 'small'}", args,
                 num_warps=_ns()._vector_warps(block))


# The blocks: d4..d26 stacks are (K, d, d), (K, d, 4d), (K, 4d, d) with d = 256..1664 (multiples of 128) and
# (K, n_head, 12) with n_head = 2..13 (ve_gate); the self-checks run (128, 128), (128, 32), (32, 128), (8, 8) for
# those and (64, 64) for check_all's square case. tests/test_aot_muon.py derives every call of every model shape
# and checks it finds a row of its exact specialization.
_MUON_ROW_BLOCKS = (32, 64, 128, 256, 512, 1024)  # BLOCK_C for C a multiple of 16 (row layout)
MUON_STEP_VARIANTS: list[Entry] = [
    *[_momentum_entry("row", bc) for bc in _MUON_ROW_BLOCKS],
    _momentum_entry("small16", 16), _momentum_entry("small", 16),
    *[_eq_scale_entry(b) for b in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)],
    *[e for bc in (16, 32, 64, 128, 256, 512, 1024)
      for e in ([_scale_cast_entry("row", bc)] if bc >= 256 else []) + [_scale_cast_entry("any", bc)]],
    *[_sumsq_entry("row", bc) for bc in _MUON_ROW_BLOCKS],
    *[_sumsq_entry("col", bc) for bc in (32, 256, 512, 1024)],
    *[_sumsq_entry(layout, 16) for layout in ("small16", "small", "smallcol16", "smallcol")],
    *[_normuon_entry(b) for b in (8, 16, 64, 128, 256, 512, 1024, 2048, 4096)],
    *[_apply_entry("row", bc) for bc in _MUON_ROW_BLOCKS],
    *[_apply_entry("col", bc) for bc in (128, 1024)],
    _apply_entry("any", 16),
]


# Per kernel, the most specialized first: the launcher takes the first row that admits a call.
VARIANTS: list[Entry] = [
    _sym_entry(False, "row"), _sym_entry(False, "col"), _sym_entry(True, "row"),
    _sym_entry(False, "any"), _sym_entry(True, "any"),
    _axpby_entry(True, "row"), _axpby_entry(True, "col"), _axpby_entry(True, "any"), _axpby_entry(False, "any"),
    *[_attention_entry(kernel, head_dim, layout) for kernel in ("attn_fwd", "attn_dkdv", "attn_dq")
      for head_dim in (64, 128) for layout in ("mha", "row", "any")],
    *[_attention_entry("attn_preprocess", head_dim, layout) for head_dim in (64, 128) for layout in ("row", "any")],
    # FP8 (sm89+ only)
    *[_fp8_amax_entry(x, mode, layout) for x, mode in FP8_AMAX for layout in ("row", "any")],
    *[_fp8_cast_entry(*cast, layout) for cast in FP8_CASTS for layout in ("row", "any")],
    *[_fp8_matmul_entry(a, out, fast, layout) for a, out, fast in FP8_GEMMS for layout in ("row", "any")],
    # KV-cache decode (sampling, evaluation): see _decode_entry and _DECODE_LAYOUTS
    *[_decode_entry(head_dim, block_m, split, layout) for head_dim in (64, 128) for split in (False, True)
      for block_m, layouts in _DECODE_LAYOUTS.items() for layout in layouts],
    *MUON_STEP_VARIANTS,
]


def parse_arches(spec: str) -> list[str]:
    """'80;90a' -> ['80', '90a'] (separators ; , or space)."""
    arches = [a.strip() for a in re.split(r"[;, ]+", spec) if a.strip()]
    for a in arches:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise ValueError(f"NANOTRAIN_CUDA_ARCHES entry {a!r} is not an sm number such as 80 or 90a")
    return arches


def capability_of(arch: str) -> tuple[int, int]:
    n = int(arch.rstrip("a"))
    return n // 10, n % 10


def built_for(entry: Entry, arch: str) -> bool:
    """Whether target `arch` gets a cubin of `entry` (its compute capability is at least the entry's min_arch)."""
    return capability_of(arch) >= tuple(entry.min_arch)


def entries_for(arch: str) -> list[Entry]:
    """The VARIANTS entries compiled for target `arch`, in table order."""
    return [e for e in VARIANTS if built_for(e, arch)]


def describe(entry: Entry, arch: str) -> dict:
    """The launcher's view of one compiled variant, derived from the kernel's current signature and the
    entry (no compile): parameters in kernel order with kind ('ptr', 'i32', 'i64', 'fp32', 'one': the
    constant 1, not passed), hint ('div16' or ''), pointee dtype; the constexprs; warps and stages."""
    from kernels._compile import _arg_spec

    fn = _kernel_fn(entry.kernel)
    if not built_for(entry, arch):
        raise ValueError(f"{entry.kernel} [{entry.label}] needs sm_{entry.min_arch[0]}{entry.min_arch[1]}+, "
                         f"not sm_{arch}")
    config, warps, stages = _config(entry.kernel, capability_of(arch), entry.args)
    warps = entry.num_warps or warps
    params, constexprs = [], {}
    for name, is_constexpr in signature(fn):
        if is_constexpr:
            value = config[name] if name in config else entry.args[name]
            constexprs[name] = value if isinstance(value, (bool, int)) else str(value)
            continue
        if name not in entry.args:
            raise KeyError(f"{entry.kernel}: parameter {name!r} of {fn.__name__} has no example value in "
                           f"kernels/_aot.py's entry [{entry.label}]: the kernel's signature changed, update VARIANTS")
        value = entry.args[name]
        kind, _, div16 = _arg_spec(value, False)
        if kind.startswith("*"):
            params.append({"name": name, "kind": "ptr", "hint": "div16", "dtype": kind[1:]})
        elif kind == "constexpr":
            params.append({"name": name, "kind": "one", "hint": "", "dtype": ""})
        else:
            params.append({"name": name, "kind": kind, "hint": "div16" if div16 else "", "dtype": ""})
    return {"kernel": entry.kernel, "label": entry.label, "arch": arch, "params": params,
            "constexprs": constexprs, "num_warps": warps, "num_stages": stages}


def compile_entry(entry: Entry, arch: str) -> dict:
    """describe(entry, arch) plus the compile: function name, shared bytes, the cubin, its sha256."""
    from kernels._compile import compile_kernel

    row = describe(entry, arch)
    fn = _kernel_fn(entry.kernel)
    args = {n: entry.args[n] if n in entry.args else row["constexprs"][n] for n in fn.arg_names}
    cap = capability_of(arch)
    out = compile_kernel(fn, cap, args, num_warps=row["num_warps"], num_stages=row["num_stages"])
    scratch = {k: out[k] for k in ("global_scratch_size", "profile_scratch_size") if out.get(k)}
    if scratch:
        raise RuntimeError(f"{entry.kernel} [{entry.label}] sm_{arch} needs scratch memory {scratch}, which the "
                           "AOT launcher does not allocate")
    entry_params = re.search(r"\.entry\s+\w+\s*\((.*?)\)", out["ptx"], re.S)
    passed = sum(p["kind"] != "one" for p in row["params"])
    hidden = len(re.findall(r"\.param\s", entry_params.group(1))) - passed if entry_params else -1
    if hidden < 0:
        raise RuntimeError(f"{entry.kernel} [{entry.label}] sm_{arch}: the PTX entry does not take the {passed} "
                           "parameters the table lists")
    row.update(function=out["name"], shared=int(out["shared"]), cubin=out["cubin"], hidden_params=hidden,
               sha256=hashlib.sha256(out["cubin"]).hexdigest(), regs=out.get("regs"),
               spills=out.get("spill_stores", 0) + out.get("spill_loads", 0))
    return row


def _compile_arch(arch: str, indices: list[int]) -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    return [compile_entry(VARIANTS[i], arch) for i in indices]


def compile_tasks(arches: list[str], jobs: int) -> list[tuple[str, list[int]]]:
    """The processes of compile_all: (target, VARIANTS indices), each target's entries dealt round-robin (the costly
    kernels spread out) to jobs // len(arches) processes, at least one per target."""
    per_arch = max(1, jobs // max(1, len(arches)))
    tasks = []
    for arch in arches:
        indices = [i for i, e in enumerate(VARIANTS) if built_for(e, arch)]
        n = max(1, min(per_arch, len(indices)))
        tasks += [(arch, indices[k::n]) for k in range(n)]
    return tasks


def compile_all(arches: list[str], jobs: int = 2) -> list[dict]:
    """Every VARIANTS entry for every arch it is built for (min_arch), in table order per arch. The compiles run in
    `jobs` processes at a time, each a fresh process (max_tasks_per_child=1) that compiles for ONE target (see
    compile_cases: a compile must not depend on what the same process compiled before for another target); with
    more jobs than targets each target's entries are dealt round-robin to jobs // len(arches) processes (a GPU
    machine building for sm_90a alone uses all its cores)."""
    tasks = compile_tasks(arches, jobs)
    ctx = multiprocessing.get_context("spawn")
    rows: dict[tuple[str, int], dict] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx,
                                                max_tasks_per_child=1) as pool:
        futures = [(arch, indices, pool.submit(_compile_arch, arch, indices)) for arch, indices in tasks]
        for arch, indices, future in futures:
            rows.update({(arch, i): row for i, row in zip(indices, future.result())})
    return [rows[(arch, i)] for arch in arches for i in range(len(VARIANTS)) if (arch, i) in rows]


# ---------------------------------------------------------------------------------------------------------------
# Generated C++
# ---------------------------------------------------------------------------------------------------------------

_KIND = {"ptr": "Kind::Ptr", "i32": "Kind::I32", "i64": "Kind::I64", "fp32": "Kind::F32", "one": "Kind::One",
         "i1": "Kind::I32"}


def _struct_name(kernel: str) -> str:
    return "".join(part.capitalize() for part in kernel.split("_")) + "Args"


def generate_header() -> str:
    """aot_args.h: per kernel, the argument struct (fields in the kernel's parameter order) and its values()."""
    lines = ["// Generated by kernels/_aot.py from the Triton kernels' signatures. Do not edit.",
             "#pragma once", "#include <array>", "#include <cstdint>", '#include "aot/launcher.h"', "",
             "namespace nanotrain::aot {", ""]
    for kernel in KERNELS:
        fn = _kernel_fn(kernel)
        runtime = [n for n, is_constexpr in signature(fn) if not is_constexpr]
        example = next(e for e in VARIANTS if e.kernel == kernel)
        s = _struct_name(kernel)
        lines.append(f"// {KERNELS[kernel][1]}: the runtime parameters, in order (constexprs are the variant's).")
        lines.append(f"struct {s} {{")
        types = {}
        for n in runtime:
            v = example.args[n]
            types[n] = ("Tensorish" if isinstance(v, str) else "double" if isinstance(v, float) else "int64_t")
            lines.append(f"  {types[n]} {n};")
        lines.append("};")
        lines.append(f"constexpr const char* k{s[:-4]}Kernel = \"{kernel}\";")
        lines.append(f"inline std::array<Value, {len(runtime)}> values(const {s}& a) {{")
        lines.append("  return {{" + ", ".join(
            f"Value::of(a.{n})" for n in runtime) + "}};")
        lines.append("}")
        lines.append("")
    lines.append("}  // namespace nanotrain::aot")
    return "\n".join(lines) + "\n"


def _c_string(s: str) -> str:
    return json.dumps(s)


def generate_table(rows: list[dict]) -> str:
    """aot_table.cpp: the cubins and the Variant rows (see csrc/aot/launcher.h) and the table as JSON."""
    out = ["// Generated by kernels/_aot.py: the ahead-of-time compiled Triton kernels. Do not edit.",
           '#include "aot/launcher.h"', "", "namespace nanotrain::aot {", "namespace {"]
    for i, r in enumerate(rows):
        data = r["cubin"]
        # a string literal (octal escapes: unambiguous, and far faster to compile than a list of integers);
        # one byte more than the cubin for the literal's terminating NUL
        out.append(f"alignas(16) const unsigned char kCubin{i}[{len(data) + 1}] =")
        for k in range(0, len(data), 64):
            out.append('  "' + "".join(f"\\{b:03o}" for b in data[k:k + 64]) + '"')
        out[-1] += ";"
        params = ", ".join(f"{{{_c_string(p['name'])}, {_KIND[p['kind']]}, {str(p['hint'] == 'div16').lower()}, "
                           f"{_c_string(p['dtype'])}}}" for p in r["params"])
        out.append(f"const Param kParams{i}[] = {{{params}}};")
        consts = ", ".join(f"{{{_c_string(k)}, {int(v) if isinstance(v, (bool, int)) else 0}}}"
                           for k, v in r["constexprs"].items() if isinstance(v, (bool, int)))
        out.append(f"const Constexpr kConsts{i}[] = {{{consts}}};")
    out.append("}  // namespace")
    out.append("")
    out.append(f"extern const int kNumVariants = {len(rows)};")
    out.append("extern const Variant kVariants[] = {")
    if not rows:
        out.append("  {},")
    for i, r in enumerate(rows):
        n_consts = sum(isinstance(v, (bool, int)) for v in r["constexprs"].values())
        out.append(f"  {{{_c_string(r['kernel'])}, {_c_string(r['label'])}, {_c_string(r['arch'])}, "
                   f"{_c_string(r['function'])}, kCubin{i}, {len(r['cubin'])}, {r['num_warps']}, {r['shared']}, "
                   f"kParams{i}, {len(r['params'])}, kConsts{i}, {n_consts}, {r['hidden_params']}}},")
    out.append("};")
    table = [{k: v for k, v in r.items() if k != "cubin"} | {"cubin_bytes": len(r["cubin"])} for r in rows]
    blob = json.dumps(table, sort_keys=True)
    out.append("")
    out.append("}  // namespace nanotrain::aot")
    out.append("")
    out.append("// The table above as JSON (without the cubins), for nanotrain.ops._ext.aot_table().")
    out.append('extern "C" const char* nanotrain_aot_table_json() {')
    out.append("  static const char kJson[] = " + " ".join(
        _c_string(blob[k:k + 2000]) for k in range(0, max(len(blob), 1), 2000)) + ";")
    out.append("  return kJson;")
    out.append("}")
    return "\n".join(out) + "\n"


def source_digest(arches: list[str]) -> str:
    """What the generated files depend on: these sources, the Triton version, the arches."""
    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(f"{CACHE_FORMAT} {triton.__version__} {';'.join(arches)}".encode())
    for name in ("_aot.py", "_compile.py", *sorted({f"{module}.py" for module, _, _ in KERNELS.values()})):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _per_arch(arches: list[str]) -> str:
    """'31 variants for sm_80, 77 for sm_90a' (entries below a target's min_arch are not built for it)."""
    counts = [f"{len(entries_for(a))} {'variants for ' if i == 0 else 'for '}sm_{a}" for i, a in enumerate(arches)]
    return ", ".join(counts)


def build(out_dir: str, arches: list[str], jobs: int = 2, log=print) -> bool:
    """Write aot_table.cpp and aot_args.h into out_dir unless a build of the same sources is there (cache).
    Returns True when it compiled."""
    os.makedirs(out_dir, exist_ok=True)
    digest = source_digest(arches)
    stamp = os.path.join(out_dir, "aot.stamp")
    files = [os.path.join(out_dir, f) for f in ("aot_table.cpp", "aot_args.h")]
    if os.path.exists(stamp) and open(stamp).read() == digest and all(os.path.exists(f) for f in files):
        log(f"AOT kernels: up to date in {out_dir} ({_per_arch(arches)})")
        return False
    start = time.time()
    rows = compile_all(arches, jobs)
    for path, text in zip(files, (generate_table(rows), generate_header())):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    with open(stamp, "w") as f:
        f.write(digest)
    log(f"AOT kernels: compiled {len(rows)} cubins ({_per_arch(arches)}) in {time.time() - start:.0f} s into {out_dir}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arches", default=os.environ.get("NANOTRAIN_CUDA_ARCHES", DEFAULT_ARCHES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--header-only", action="store_true", help="write aot_args.h only (no compiles)")
    a = parser.parse_args(argv)
    if a.header_only:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "aot_args.h"), "w") as f:
            f.write(generate_header())
        return 0
    build(a.out, parse_arches(a.arches), a.jobs, log=lambda m: print(m, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
