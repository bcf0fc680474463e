"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

Triton ships ptxas (and cuobjdump), so a CPU machine can compile a kernel for sm_80 or sm_90a without
running it. That catches what the CPU interpreter cannot: type errors in the compiled path, shared
memory over the per-block limit of the target, register spills. CI compiles each kernel family this
way (tests/ops/test_{attention,newton_schulz,fp8}.py, slow-marked).

`compile_kernel` takes an *example call*: a value for every parameter of the kernel, specialized the
way Triton's launcher specializes a real call, so the compiled code is the one a GPU would run:
  - "*bf16", "*fp32", "*fp8e4nv", ... : a pointer (16-byte aligned, as torch allocations are);
  - an int: 1 becomes the constant 1 (Triton specializes unit strides), a multiple of 16 gets the
    divisibility-by-16 hint (vectorized, pipelined loads), any other int is a plain i32;
  - a float: an fp32 scalar;
  - anything for a tl.constexpr parameter: that constant (bools, ints, tl.dtype, strings).

Needs TRITON_INTERPRET unset in the process (the interpreter replaces @triton.jit functions by Python
ones that cannot be compiled). This module never imports nanotrain.

It also holds `autotune_configs`, the one place where the kernels' autotune lists meet NANOTRAIN_AUTOTUNE
(`first`: only each list's first config, the one these compiles check first; the GPU check's first call).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

AUTOTUNE_ENV = "NANOTRAIN_AUTOTUNE"


def autotune_configs(configs: list) -> list:
    """The launch configs a kernel's autotuner may try: all of `configs`, or only the first one when
    NANOTRAIN_AUTOTUNE=first (read when a kernel's autotuned wrapper is built, at its first launch).

    Why: autotuning tries every config of every kernel at every new key; in a timed GPU session (the first
    call of benchmarks/gpu_check.sh) that is minutes of compiles and benchmarks spent on tuning instead of
    on checks. The first entry of each list is the one chosen to compile without spills (see each kernel's
    list), so `first` keeps correctness checks meaningful while skipping the search. Any other value
    raises ValueError naming the two accepted ones (this module never imports nanotrain, so not UserError).
    """
    mode = os.environ.get(AUTOTUNE_ENV, "all").strip().lower() or "all"
    if mode == "all":
        return list(configs)
    if mode == "first":
        return list(configs[:1])
    raise ValueError(f"{AUTOTUNE_ENV}={mode!r} is not understood: set it to 'first' (one config per kernel) "
                     "or 'all' (autotune over every config), or unset it.")


# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 9): 101376, (8, 6): 101376}


def shared_limit(capability: tuple[int, int]) -> int:
    """Bytes of shared memory one block can use on a GPU of `capability` (227 KB sm90, 163 KB sm80)."""
    return SHARED_LIMIT.get(tuple(capability), 101376)


def _arg_spec(value, is_constexpr: bool) -> tuple[str, object, bool]:
    """(signature type, constant or None, divisible by 16) of one example argument, as the launcher would."""
    if is_constexpr:
        return "constexpr", value, False
    if isinstance(value, str):
        assert value.startswith("*"), f"pointer types are written '*bf16', got {value!r}"
        return value, None, True
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot describe example argument {value!r}")


def compile_kernel(fn, capability: tuple[int, int], args: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile the @triton.jit `fn` for compute capability `capability` from an example call `args`
    (parameter name -> example value, see the module doc). Returns a dict: name, shared (bytes), regs,
    spill_stores / spill_loads / stack (bytes, from the cubin), cubin (bytes), ptx (str), global_scratch_size /
    profile_scratch_size (bytes per program the launcher must provide; 0 for most kernels).

    Raises whatever Triton raises when the kernel does not compile for that target.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    missing = set(names) - set(args)
    extra = set(args) - set(names)
    assert not missing and not extra, f"{fn.__name__}: missing {sorted(missing)}, unknown {sorted(extra)}"
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        kind, const, div16 = _arg_spec(args[name], param.is_constexpr)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = const
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    major, minor = capability
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 10 * major + minor, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = compiled.asm["cubin"]
    md = compiled.metadata
    return {"name": md.name, "shared": md.shared, "cubin": cubin, "ptx": compiled.asm["ptx"],
            "global_scratch_size": getattr(md, "global_scratch_size", 0),
            "profile_scratch_size": getattr(md, "profile_scratch_size", 0), **resource_usage(cubin)}


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _spill_bytes(sass: str, op: str) -> int:
    """Bytes moved by the local-memory instructions `op` (STL: spill stores, LDL: spill loads) in SASS text;
    the width suffix (.64, .128, .U8, ...) gives the size, 32 bits without one (what ptxas -v reports)."""
    total = 0
    for suffixes in re.findall(rf"\b{op}((?:\.\w+)*)\s", sass):
        bits = [int(w) for w in re.findall(r"\.U?S?(\d+)", suffixes)]
        total += (bits[0] if bits else 32) // 8
    return total


def resource_usage(cubin: bytes) -> dict:
    """regs, stack (bytes of stack frame) from `cuobjdump -res-usage`, and spill_stores / spill_loads (bytes,
    the local-memory STL/LDL instructions of the SASS, as ptxas -v counts them) of the kernel in `cubin`.
    Empty dict where cuobjdump is missing."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK):(\d+)", res))
    return {"regs": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "spill_stores": _spill_bytes(sass, "STL"), "spill_loads": _spill_bytes(sass, "LDL")}


def compile_cases(compile_for, cases: list, isolate: bool = True) -> list:
    """Compile each (capability, kernel, kwargs, label) case with `compile_for(kernel, capability, **kwargs)`.

    One row per case, in the order of `cases`: [capability, kernel, label, shared bytes, spill bytes, uses wgmma],
    or the traceback's tail in place of the shared bytes (and None, None) when the compile fails.

    isolate (default): each capability's cases compile in a fresh process (spawned; `compile_for` must be a
    module-level function). Why: Triton 3.6 (the GPU image's) keeps process-wide state from the first target that
    lowers an fp8 conversion: after an sm_89 compile of the e5m2 cast, an sm_80 compile of it emitted sm_89-only
    `cvt ... e5m2x2` instructions and ptxas refused it, and in the other order sm_89 lost its hardware conversion
    (the GPU rehearsal, benchmarks/gpu_rehearsal.sh, found it; Triton 3.8 is order-independent). A compile's
    result must not depend on what was compiled before it in the same process.
    """
    if not isolate:
        return _compile_cases_here(compile_for, cases)
    import concurrent.futures
    import multiprocessing

    by_capability: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        by_capability.setdefault(tuple(case[0]), []).append(i)
    rows: list = [None] * len(cases)
    ctx = multiprocessing.get_context("spawn")
    for indices in by_capability.values():
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            got = pool.submit(_compile_cases_in_child, compile_for.__module__, compile_for.__qualname__,
                              [cases[i] for i in indices]).result()
        for i, row in zip(indices, got):
            rows[i] = row
    return rows


def _compile_cases_in_child(module: str, name: str, cases: list) -> list:
    import importlib

    return _compile_cases_here(getattr(importlib.import_module(module), name), cases)


def _compile_cases_here(compile_for, cases: list) -> list:
    import traceback

    rows = []
    for cap, kernel, kw, what in cases:
        try:
            r = compile_for(kernel, cap, **kw)
            spills = r["spill_stores"] + r["spill_loads"]
            rows.append([list(cap), kernel, what, r["shared"], spills, "wgmma" in r["ptx"]])
        except Exception:
            rows.append([list(cap), kernel, what, traceback.format_exc()[-1500:], None, None])
    return rows
