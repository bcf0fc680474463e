"""The ahead-of-time FP8 kernels in nanotrain._C (kernels/_aot.py's FP8 block, csrc/fp8/aot_ops.cpp, the `aot`
backends of nanotrain/ops/fp8.py): cubins for sm89+ targets only, launch configs equal to the Triton path's, the
launcher's row for the recipes' calls, the ops' fakes, the backend order and messages, and the routing of a call
no cubin serves to the Triton backend. On a GPU: aot == triton bit for bit (NANOTRAIN_AUTOTUNE=first), the
registry's aot backends pass their self-checks, a Float8Linear trains the same through both."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from nanotrain.ops import _ext, registry
from nanotrain.ops import fp8 as F8
from tests.test_aot import assert_aot_refused_here

TABLE = _ext.aot_table()
with_cubins = pytest.mark.skipif(not TABLE, reason=f"no AOT cubins: nanotrain._C is {_ext.extension_status()}")
FP8_KERNELS = ("fp8_amax", "fp8_cast", "fp8_matmul")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _aot():
    from kernels import _aot

    return _aot


def _built_arches() -> list[str]:
    return _aot().parse_arches(os.environ.get("NANOTRAIN_CUDA_ARCHES", _aot().DEFAULT_ARCHES))


def _table_arches() -> set[str]:
    return {r["arch"] for r in TABLE}


# ------------------------------------------------------------------------------------------------------------------
# The variant table
# ------------------------------------------------------------------------------------------------------------------

def test_fp8_entries_need_sm89_and_are_skipped_below():
    """Entry.min_arch: the FP8 entries are built for sm_89 and sm_90a, never sm_80 (no FP8 conversions there);
    describe refuses them for a target below it; every other entry is built for every target."""
    aot = _aot()
    fp8 = [e for e in aot.VARIANTS if e.kernel in FP8_KERNELS]
    assert fp8 and {e.kernel for e in fp8} == set(FP8_KERNELS)
    assert all(e.min_arch == (8, 9) for e in fp8)
    assert not any(e.kernel in FP8_KERNELS for e in aot.entries_for("80"))
    assert aot.entries_for("90a") == aot.VARIANTS and aot.entries_for("89") == aot.VARIANTS
    assert [e for e in aot.entries_for("80")] == [e for e in aot.VARIANTS if e.kernel not in FP8_KERNELS]
    with pytest.raises(ValueError, match="needs sm_89"):
        aot.describe(fp8[0], "80")
    assert "variants for sm_80" in aot._per_arch(["80", "90a"])


def test_each_fp8_flag_combination_has_a_training_row_then_a_generic_row():
    """Per kernel and flags: the 'row' variant first (contiguous operands, dims multiples of 16), then a generic one
    (every int a plain i32), so any call of a compiled combination with 32-bit ints has a cubin."""
    aot = _aot()
    groups: dict[tuple, list[dict]] = {}
    for e in aot.VARIANTS:
        if e.kernel in FP8_KERNELS:
            row = aot.describe(e, "90a")
            ptrs = tuple(p["dtype"] for p in row["params"] if p["kind"] == "ptr")
            groups.setdefault((e.kernel, ptrs, str(sorted(row["constexprs"].items()))), []).append((e.label, row))
    for key, rows in groups.items():
        assert [label.rsplit(" ", 1)[1] for label, _ in rows] == ["row", "any"], key
        generic = rows[1][1]["params"]
        assert all(p["kind"] in ("ptr", "i32") and (p["kind"] == "ptr" or not p["hint"]) for p in generic), key
    casts = {k[1:] for k in groups if k[0] == "fp8_cast"}
    assert len(casts) == len(aot.FP8_CASTS)
    assert len([k for k in groups if k[0] == "fp8_matmul"]) == 8  # e4m3/e5m2 x e4m3 -> bf16/fp32, fast or not


def _fake_cuda(R: int, C: int):
    class X:  # what kernels/fp8.py _launch reads of x on a GPU
        shape, is_cuda = (R, C), True

        def stride(self, i):
            return (C, 1)[i]
    return X()


class _Recorder:
    """Stands in for a @triton.jit kernel: records `kernel[grid](*args, **constexprs)`."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((tuple(grid), kw))


@pytest.mark.parametrize("R,C", [(16384, 768), (3072, 768), (48, 80), (100, 300)])
def test_cast_configs_are_the_triton_launchers(R, C, monkeypatch):
    """kernels/fp8.py _launch on a GPU (simulated: a stand-in x and recording kernels): the cast's tile and grid
    are the AOT config's, the amax's BLOCK_R and grid too; its BLOCK_C is min(256, next_pow2(C)), the AOT rows'
    256 for every C > 128 (a max is exact whatever the blocking, so narrower C lose nothing: see
    kernels/_aot.py _fp8_amax_config); no num_warps (Triton's default 4, as the rows)."""
    from nanotrain.kernels import fp8 as kfp8

    aot = _aot()
    amax, cast = _Recorder(), _Recorder()
    monkeypatch.setattr(kfp8, "_fp8_amax_kernel", amax)
    monkeypatch.setattr(kfp8, "_fp8_cast_kernel", cast)
    kfp8._launch(_fake_cuda(R, C), *[None] * 6, -1, 448.0, False, 3, -6, True, True)
    (amax_grid, amax_kw), (cast_grid, cast_kw) = amax.calls[0], cast.calls[0]
    entries = {e.kernel: e for e in aot.VARIANTS}
    for arch in ("89", "90a"):
        a_row, c_row = aot.describe(entries["fp8_amax"], arch), aot.describe(entries["fp8_cast"], arch)
        assert amax_kw["BLOCK_R"] == a_row["constexprs"]["BLOCK_R"]
        assert amax_grid == (-(-R // a_row["constexprs"]["BLOCK_R"]),)
        assert amax_kw["BLOCK_C"] == a_row["constexprs"]["BLOCK_C"] or C <= 128
        tile = (c_row["constexprs"]["BLOCK_R"], c_row["constexprs"]["BLOCK_C"])
        assert (cast_kw["BLOCK_R"], cast_kw["BLOCK_C"]) == tile
        assert cast_grid == (-(-R // cast_kw["BLOCK_R"]), -(-C // cast_kw["BLOCK_C"]))
        assert "num_warps" not in amax_kw and "num_warps" not in cast_kw
        assert (a_row["num_warps"], c_row["num_warps"]) == (4, 4)


def test_gemm_configs_are_the_autotune_lists_first_entries():
    """The GEMM rows take gpu_configs(capability, fast_accum)[0], what NANOTRAIN_AUTOTUNE=first launches: on Hopper
    the first config differs with FAST_ACCUM (128x256 fast, 128x128 precise), on Ada it does not."""
    from kernels import fp8 as kfp8

    aot = _aot()
    for e in (e for e in aot.VARIANTS if e.kernel == "fp8_matmul"):
        for arch, cap in (("89", (8, 9)), ("90a", (9, 0))):
            row = aot.describe(e, arch)
            first = kfp8.gpu_configs(cap, e.args["FAST_ACCUM"])[0]
            assert {k: row["constexprs"][k] for k in first.kwargs} == first.kwargs
            assert (row["num_warps"], row["num_stages"]) == (first.num_warps, first.num_stages)
    fast, precise = (aot.describe(next(e for e in aot.VARIANTS if e.kernel == "fp8_matmul" and
                                       e.args["FAST_ACCUM"] == f), "90a") for f in (True, False))
    assert fast["constexprs"]["BLOCK_N"] == 256 and precise["constexprs"]["BLOCK_N"] == 128


@with_cubins
def test_the_build_embeds_fp8_cubins_for_sm89_plus_targets_only(tmp_path):
    """One cubin per FP8 entry for each built target of sm89+, none for sm_80; an ELF for that SM (cuobjdump)."""
    import nanotrain._C as C

    from kernels._compile import _cuobjdump

    aot = _aot()
    fp8_rows = [(i, r) for i, r in enumerate(TABLE) if r["kernel"] in FP8_KERNELS]
    expected = {(e.kernel, e.label, a) for a in _built_arches() for e in aot.entries_for(a) if e.kernel in FP8_KERNELS}
    assert {(r["kernel"], r["label"], r["arch"]) for _, r in fp8_rows} == expected
    assert len(fp8_rows) == len(expected)
    assert not any(r["arch"] == "80" for _, r in fp8_rows)
    if "90a" in _built_arches():
        assert len([r for _, r in fp8_rows if r["arch"] == "90a"]) == len(
            [e for e in aot.VARIANTS if e.kernel in FP8_KERNELS])
    tool = _cuobjdump()
    if tool is not None and fp8_rows:
        i, row = fp8_rows[-1]
        path = tmp_path / "fp8.cubin"
        path.write_bytes(C.aot_cubin(i))
        listed = subprocess.run([tool, "-lelf", str(path)], capture_output=True, text=True, check=True).stdout
        assert f".sm_{row['arch']}.cubin" in listed, listed


# ------------------------------------------------------------------------------------------------------------------
# The launcher's rows for the calls the ops make (csrc/fp8/aot_ops.cpp packs these arguments)
# ------------------------------------------------------------------------------------------------------------------

_TRITON = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", E4M3: "fp8e4nv", E5M2: "fp8e5"}
_ADDR = 1 << 20  # a 16-byte aligned address (nothing is dereferenced)


def _select(kernel: str, arch: str, flags: dict, named: dict) -> str | None:
    import nanotrain._C as C

    aot = _aot()
    args = [named[n] for n, is_constexpr in aot.signature(aot._kernel_fn(kernel)) if not is_constexpr]
    row = C.aot_select(kernel, arch, flags, args)
    return None if row < 0 else TABLE[row]["label"]


def _cast_rows(x_dtype, shape, fp8_dtype, mode, pow2, write_main, write_t, arch="90a", strides=None,
               offset=0) -> tuple[str | None, str | None]:
    """The (amax, cast) rows aot_fp8_quantize / aot_fp8_quantize_dual launch for x of `shape` (contiguous unless
    `strides`), as csrc/fp8/aot_ops.cpp fills Fp8AmaxArgs and Fp8CastArgs."""
    R, C = shape
    sr, sc = strides or (C, 1)
    x, f32, q = (_TRITON[x_dtype], _ADDR + offset), ("fp32", _ADDR), (_TRITON[fp8_dtype], _ADDR)
    common = {"x_ptr": x, "amax_ptr": f32, "amax_col_ptr": f32, "R": R, "C": C, "stride_xr": sr, "stride_xc": sc}
    mant, min_exp = {E4M3: (3, -6), E5M2: (2, -14)}[fp8_dtype]
    amax = _select("fp8_amax", arch, {"MODE": mode}, common)
    cast = _select("fp8_cast", arch, {"MODE": mode, "POW2": int(pow2), "MANT_BITS": mant, "MIN_EXP": min_exp,
                                      "WRITE_MAIN": int(write_main), "WRITE_T": int(write_t)},
                   {**common, "out_ptr": q, "out_t_ptr": q, "scale_ptr": f32, "scale_col_ptr": f32})
    return amax, cast


def _mm_row(a_dtype, a_shape, a_strides, b_strides, N, out_dtype, fast, rowwise=False, arch="90a") -> str | None:
    """The row aot_fp8_matmul launches for a (M, K) with a_strides times b (K, N) with b_strides (b in e4m3)."""
    M, K = a_shape
    f32 = ("fp32", _ADDR)
    named = {"a_ptr": (_TRITON[a_dtype], _ADDR), "b_ptr": ("fp8e4nv", _ADDR), "c_ptr": (_TRITON[out_dtype], _ADDR),
             "sa_ptr": f32, "sb_ptr": f32, "M": M, "N": N, "K": K, "stride_am": a_strides[0],
             "stride_ak": a_strides[1], "stride_bk": b_strides[0], "stride_bn": b_strides[1], "stride_cm": N,
             "stride_cn": 1, "stride_sa": int(rowwise), "stride_sb": int(rowwise)}
    return _select("fp8_matmul", arch, {"FAST_ACCUM": int(fast)}, named)


@with_cubins
def test_the_launcher_picks_the_training_rows_for_the_recipes_calls():
    """d12 (x (B*T = 16384, 768), W (3072, 768), the MLP's dy (16384, 3072)): each cast and GEMM of both recipes
    takes its 'row' variant; awkward shapes take the generic one; an uncompiled combination, fp16, a misaligned
    pointer (the op copies it first), a 64-bit stride and sm_80 get none."""
    if "90a" not in _table_arches():
        pytest.skip("built without sm_90a")
    bf, f32 = torch.bfloat16, torch.float32
    M, K, N = 16384, 768, 3072
    # tensorwise: x, W (fp32 master), dy (e5m2), each cast once with both copies
    assert _cast_rows(bf, (M, K), E4M3, -1, False, True, True) == ("bf16 MODE=-1 row",
                                                                   "bf16->e4m3 MODE=-1 POW2=0 main+t row")
    assert _cast_rows(f32, (N, K), E4M3, -1, False, True, True) == ("fp32 MODE=-1 row",
                                                                    "fp32->e4m3 MODE=-1 POW2=0 main+t row")
    assert _cast_rows(bf, (M, N), E5M2, -1, False, True, True) == ("bf16 MODE=-1 row",
                                                                   "bf16->e5m2 MODE=-1 POW2=0 main+t row")
    # rowwise: dual casts of x and dy, the weight per row (main copy) and per column (transposed copy)
    assert _cast_rows(bf, (M, K), E4M3, 2, True, True, True) == ("bf16 MODE=2 row",
                                                                 "bf16->e4m3 MODE=2 POW2=1 main+t row")
    assert _cast_rows(f32, (N, K), E4M3, 1, True, True, False) == ("fp32 MODE=1 row",
                                                                   "fp32->e4m3 MODE=1 POW2=1 main row")
    assert _cast_rows(f32, (N, K), E4M3, 0, True, False, True) == ("fp32 MODE=0 row", "fp32->e4m3 MODE=0 POW2=1 t row")
    # GEMMs: a row-major, b the .t() of a row-major copy (column-major); y and dx in bf16, dW in fp32
    for rowwise, dy8, fast_bwd in ((False, E5M2, False), (True, E4M3, True)):
        d = "e5m2" if dy8 == E5M2 else "e4m3"
        assert _mm_row(E4M3, (M, K), (K, 1), (1, K), N, bf, True, rowwise) == "e4m3 x e4m3 -> bf16 FAST_ACCUM=1 row"
        assert _mm_row(dy8, (M, N), (N, 1), (1, N), K, bf, fast_bwd, rowwise) == \
            f"{d} x e4m3 -> bf16 FAST_ACCUM={int(fast_bwd)} row"
        assert _mm_row(dy8, (N, M), (M, 1), (1, M), K, f32, fast_bwd, rowwise) == \
            f"{d} x e4m3 -> fp32 FAST_ACCUM={int(fast_bwd)} row"
    # awkward shapes and strides: the generic rows
    assert _cast_rows(bf, (100, 300), E4M3, -1, False, True, True) == ("bf16 MODE=-1 any",
                                                                       "bf16->e4m3 MODE=-1 POW2=0 main+t any")
    assert _cast_rows(bf, (64, 64), E4M3, 2, True, True, True, strides=(1, 64)) == (
        "bf16 MODE=2 any", "bf16->e4m3 MODE=2 POW2=1 main+t any")  # a transposed view
    assert _mm_row(E4M3, (40, 72), (72, 1), (1, 72), 56, bf, False) == "e4m3 x e4m3 -> bf16 FAST_ACCUM=0 any"
    assert _mm_row(E4M3, (64, 96), (1, 64), (80, 1), 80, bf, True) == "e4m3 x e4m3 -> bf16 FAST_ACCUM=1 any"
    # none
    assert _cast_rows(bf, (M, K), E5M2, 1, True, True, True)[1] is None  # flags never compiled
    assert _cast_rows(torch.float16, (M, K), E4M3, -1, False, True, True) == (None, None)
    assert _cast_rows(bf, (M, K), E4M3, -1, False, True, True, offset=2) == (None, None)
    assert _cast_rows(bf, (100, 300), E4M3, -1, False, True, True, strides=(2**31 + 1, 1)) == (None, None)
    assert _cast_rows(bf, (M, K), E4M3, -1, False, True, True, arch="80") == (None, None)
    assert _mm_row(E4M3, (M, K), (K, 1), (1, K), N, torch.float16, True) is None


@with_cubins
def test_served_keys_cover_the_recipes_and_self_checks():
    """aot_served_keys (the routing's view of the table): every cast and GEMM the recipes and self-checks make on
    sm_90a, nothing on sm_80, and not the uncompiled combinations."""
    if "90a" not in _table_arches():
        pytest.skip("built without sm_90a")
    keys = F8.aot_served_keys(TABLE, "90a")
    for x, fp8, mode, pow2, main, t in _aot().FP8_CASTS:
        q = {"e4m3": "fp8e4nv", "e5m2": "fp8e5"}[fp8]
        assert ("fp8_amax", x, mode) in keys and ("fp8_cast", x, q, mode, pow2, main, t) in keys
    for a in ("fp8e4nv", "fp8e5"):
        for out in ("bf16", "fp32"):
            assert {("fp8_matmul", a, "fp8e4nv", out, f) for f in (True, False)} <= keys
    assert ("fp8_cast", "bf16", "fp8e5", 1, True, True, True) not in keys
    assert ("fp8_matmul", "fp8e4nv", "fp8e5", "bf16", True) not in keys
    assert F8.aot_served_keys(TABLE, "80") == frozenset()


# ------------------------------------------------------------------------------------------------------------------
# Ops, fakes, backends
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_aot_fp8_ops_pass_opcheck_on_meta_tensors():
    """Schemas and fakes: the fakes' shapes and dtypes are the Triton twins' (kernels/fp8.py under the
    interpreter), the R == 0 case included."""
    from nanotrain.kernels import fp8 as kfp8

    meta = {"device": "meta"}
    for shape in ((48, 80), (0, 16)):
        x = torch.empty(shape, dtype=torch.bfloat16, **meta)
        for mode, main, t in ((-1, True, True), (1, True, False), (0, False, True)):
            args = (x, E4M3, mode, mode != -1, main, t)
            torch.library.opcheck(torch.ops.nanotrain.aot_fp8_quantize.default, args)
            got = torch.ops.nanotrain.aot_fp8_quantize(*args)
            want = kfp8.quantize(torch.randn(shape), E4M3, mode, mode != -1, main, t)
            assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
        torch.library.opcheck(torch.ops.nanotrain.aot_fp8_quantize_dual.default, (x, E5M2, True))
        got = torch.ops.nanotrain.aot_fp8_quantize_dual(x, E5M2, True)
        want = kfp8.quantize_rows_and_cols(torch.randn(shape), E5M2, True)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
    a, b = torch.empty(40, 72, dtype=E4M3, **meta), torch.empty(56, 72, dtype=E4M3, **meta).t()
    for sa, sb in ((torch.empty((), **meta), torch.empty((), **meta)),
                   (torch.empty(40, 1, **meta), torch.empty(1, 56, **meta))):
        for out_dtype in (torch.bfloat16, torch.float32):
            torch.library.opcheck(torch.ops.nanotrain.aot_fp8_matmul.default, (a, b, sa, sb, out_dtype, True))
            out = torch.ops.nanotrain.aot_fp8_matmul(a, b, sa, sb, out_dtype, False)
            assert out.shape == (40, 56) and out.dtype == out_dtype
    with pytest.raises(RuntimeError, match="do not chain"):
        torch.ops.nanotrain.aot_fp8_matmul(a, a, sa, sb, torch.bfloat16, True)


def test_backend_order_and_why_aot_cannot_serve_here():
    for op, order in (("fp8_quantize", ["aot", "triton", "reference"]),
                      ("fp8_quantize_dual", ["aot", "triton", "reference"]),
                      ("fp8_matmul", ["scaled_mm", "aot", "triton", "reference"])):
        backends = registry.backends(op)
        assert [b.name for b in backends] == order
        assert next(b for b in backends if b.name == "aot").fused
        backend, reasons = registry.explain(op, "cpu", torch.float32)
        assert_aot_refused_here(dict(reasons)["aot"])
        assert backend.name == "reference"


def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> torch.device:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {capability}")
    monkeypatch.setattr(_ext, "has_kernel", lambda name, key: True)
    return torch.device("cuda", 0)


@with_cubins
@pytest.mark.parametrize("check", [F8.aot_check_quantize, F8.aot_check_quantize_dual, F8.aot_check_matmul])
def test_aot_checks_name_the_missing_arch_and_the_fp8_minimum(check, monkeypatch):
    """Simulated GPUs: sm_80 has no FP8 at all; an Ada GPU (sm_89) has no cubins in the default build and is told
    to add 89; fp16 has none; on a GPU of a built sm89+ arch the aot backends are available."""
    assert "FP8 cubins need CUDA sm89+" in check(_fake_gpu(monkeypatch, (8, 0)), torch.bfloat16)
    if "89" not in _table_arches():
        why = check(_fake_gpu(monkeypatch, (8, 9)), torch.bfloat16)
        assert "no cubin of fp8_" in why and "for sm_89" in why and "add 89 to NANOTRAIN_CUDA_ARCHES" in why
    if "90a" in _table_arches():
        cuda = _fake_gpu(monkeypatch, (9, 0))
        assert check(cuda, torch.bfloat16) is None and check(cuda, torch.float32) is None
        assert "has no FP8 cubins" in check(cuda, torch.float16)


# ------------------------------------------------------------------------------------------------------------------
# Routing a call with no cubin to the Triton backend (on the CPU: the aot ops emulated by the Triton kernels under
# the interpreter, registered as their CPU kernels for the test)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def emulated_aot_ops(monkeypatch):
    """CPU kernels for nanotrain::aot_fp8_* that run kernels/fp8.py under the interpreter and record each call,
    and the sm_90a table as what 'device 0' serves."""
    if "90a" not in _table_arches() or _ext.load_extension() is None:
        pytest.skip("needs an extension built with sm_90a cubins")
    from nanotrain.kernels import fp8 as kfp8

    calls: list[str] = []
    lib = torch.library.Library("nanotrain", "IMPL")

    def quantize(x, fp8_dtype, mode, power_of_2, write_main, write_t):
        calls.append(f"aot quantize {x.dtype} {fp8_dtype} {mode}")
        return kfp8.quantize(x, fp8_dtype, mode, power_of_2, write_main, write_t)

    def dual(x, fp8_dtype, power_of_2):
        calls.append(f"aot dual {x.dtype} {fp8_dtype}")
        return kfp8.quantize_rows_and_cols(x, fp8_dtype, power_of_2)

    def matmul(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        calls.append(f"aot matmul {a.dtype} {b.dtype} {out_dtype} {use_fast_accum}")
        return kfp8.matmul(a, b, scale_a, scale_b, out_dtype, use_fast_accum=use_fast_accum)

    lib.impl("aot_fp8_quantize", quantize, "CPU")
    lib.impl("aot_fp8_quantize_dual", dual, "CPU")
    lib.impl("aot_fp8_matmul", matmul, "CPU")
    monkeypatch.setitem(F8._AOT_SERVED, 0, F8.aot_served_keys(TABLE, "90a"))
    yield calls
    lib._destroy()


def test_a_call_without_a_cubin_goes_to_the_triton_backend(emulated_aot_ops):
    calls = emulated_aot_ops
    x = torch.randn(48, 80)
    out = F8.aot_quantize(x, E4M3, -1, False, True, True)  # fp32 e4m3 tensorwise: the master weight's cast
    assert calls == [f"aot quantize {torch.float32} {E4M3} -1"]
    ref = F8.triton_quantize(x, E5M2, -1, False, True, True)
    got = F8.aot_quantize(x, E5M2, -1, False, True, True)  # fp32 -> e5m2: no cubin
    assert len(calls) == 1 and all(_same(g, r) for g, r in zip(got, ref))
    assert out[0].shape == (48, 80)
    F8.aot_quantize_dual(x, E4M3, True)  # fp32 dual: no cubin (the recipes dual-cast bf16)
    a, _ = F8.quantize(torch.randn(32, 64), E4M3)
    b5, _ = F8.quantize(torch.randn(48, 64), E5M2)
    one = torch.tensor(1.0)
    F8.aot_matmul(a, b5.t(), one, one, torch.float32, False)  # e4m3 x e5m2: no cubin
    assert len(calls) == 1
    F8.aot_matmul(a, a.t(), one, one, torch.float32, False)
    assert calls[-1] == f"aot matmul {E4M3} {E4M3} {torch.float32} False"


def test_a_custom_float8_config_trains_through_the_aot_backends(emulated_aot_ops):
    """A custom Float8Config (e5m2 weights, e4m3 gradients, fast accumulation everywhere): its uncompiled casts and
    GEMMs reach the Triton backend, the compiled ones the aot ops, and the layer's forward and backward equal the
    Triton backends' bit for bit."""
    calls = emulated_aot_ops
    config = F8.Float8Config(recipe="custom", weight_dtype=E5M2, grad_dtype=E4M3, fast_accum_backward=True)
    aot = F8.Fp8Kernels(F8.aot_quantize, F8.aot_quantize_dual, F8.aot_matmul, F8.aot_matmul)
    triton = F8.Fp8Kernels(F8.triton_quantize, F8.triton_quantize_dual, F8.triton_matmul, F8.triton_matmul)
    w = torch.randn(48, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)
    g = torch.randn(32, 48)
    results = []
    for kernels in (aot, triton):
        y = F8.float8_linear(x, w, None, config, kernels)
        results.append((y, *torch.autograd.grad(y, (x, w), g)))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    # served by cubins: x's and dy's fp32 e4m3 casts (as the weight's in the recipes), dy e4m3 x W e5m2 is not
    assert calls == [f"aot quantize {torch.float32} {E4M3} -1", f"aot quantize {torch.float32} {E4M3} -1",
                     f"aot matmul {E4M3} {E4M3} {torch.float32} True"]


def test_the_routing_is_a_constant_for_torch_compile(emulated_aot_ops):
    """torch.compile traces the wrappers with the decision folded in (fullgraph: no graph break), both ways."""
    calls = emulated_aot_ops

    def f(x):
        q, s, _ = F8.aot_quantize(x, E4M3, -1, False, True, True)
        q5, s5, _ = F8.aot_quantize(x, E5M2, -1, False, True, True)
        return F8.dequantize(q, s) + F8.dequantize(q5, s5)

    x = torch.randn(32, 48)
    torch._dynamo.reset()
    try:
        got = torch.compile(f, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, f(x))
    assert calls == [f"aot quantize {torch.float32} {E4M3} -1"] * 2


def test_a_compiled_float8_linear_runs_the_aot_ops(emulated_aot_ops):
    """The tensorwise Float8Linear through the aot backends under torch.compile (aot_eager, fullgraph: the
    autograd.Function and the routing trace without a break): forward and backward equal eager's, and the compiled
    graph calls the aot ops for the compiled casts and GEMMs (fp32 inputs here: dy's fp32 -> e5m2 cast has no
    cubin and goes to Triton)."""
    calls = emulated_aot_ops
    config = F8.Float8Config.from_recipe("tensorwise")
    aot = F8.Fp8Kernels(F8.aot_quantize, F8.aot_quantize_dual, F8.aot_matmul, F8.aot_matmul)
    w = torch.randn(48, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)

    def step(fn):
        y = fn(x, w)
        return (y, *torch.autograd.grad(y.square().sum(), (x, w)))

    def f(x, w):
        return F8.float8_linear(x, w, None, config, aot)

    eager = step(f)
    calls.clear()
    torch._dynamo.reset()
    try:
        compiled = step(torch.compile(f, backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    fp32, e4, e5 = torch.float32, E4M3, E5M2
    assert calls == [f"aot quantize {fp32} {e4} -1", f"aot quantize {fp32} {e4} -1",
                     f"aot matmul {e4} {e4} {fp32} True", *[f"aot matmul {e5} {e4} {fp32} False"] * 2]


def test_cmake_rebuilds_the_cubins_when_a_kernel_module_changes():
    """CMakeLists.txt's ahead-of-time step DEPENDS on every module kernels/_aot.py compiles from (setup.py's cache
    digest reads KERNELS itself)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    depends = next(line for line in open(os.path.join(root, "CMakeLists.txt")) if "DEPENDS kernels/_aot.py" in line)
    for module in {module for module, _, _ in _aot().KERNELS.values()}:
        assert f"kernels/{module}.py" in depends.split(), module


# ------------------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------------------

def _gpu_has_fp8_cubins() -> None:
    why = F8.aot_check_matmul(torch.device("cuda"), torch.bfloat16) or F8.aot_check_quantize(torch.device("cuda"),
                                                                                            torch.bfloat16)
    if why:
        pytest.skip(why)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (fp8 and NaN included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture
def first_configs(monkeypatch):
    from nanotrain.kernels import fp8 as kfp8

    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    kfp8._fp8_matmul_tuned.cache_clear()
    yield
    kfp8._fp8_matmul_tuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 768), (3072, 768), (48, 80), (100, 300), (1, 17)])
def test_aot_casts_equal_triton_bit_for_bit(shape, first_configs):
    """Every compiled cast (FP8_CASTS) and the dual cast, on training-sized and awkward shapes, a transposed view
    and a tensor with NaN and inf: the same bytes, scales and NaNs as the Triton backend."""
    _gpu_has_fp8_cubins()
    from nanotrain.kernels import fp8 as kfp8

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    fp8s = {"e4m3": E4M3, "e5m2": E5M2}
    for x_dtype, fp8, mode, pow2, main, t in _aot().FP8_CASTS:
        x = (torch.randn(shape, device="cuda") * 5).to(dtypes[x_dtype])
        xs = [x, x.t()] if shape[0] % 16 == 0 else [x]
        bad = x.clone()
        bad.view(-1)[0], bad.view(-1)[-1] = float("nan"), float("inf")
        for inp in (*xs, bad):
            if mode == 2:
                got = F8.aot_quantize_dual(inp, fp8s[fp8], pow2)
                want = kfp8.quantize_rows_and_cols(inp, fp8s[fp8], pow2)
            else:
                got = F8.aot_quantize(inp, fp8s[fp8], mode, pow2, main, t)
                want = kfp8.quantize(inp, fp8s[fp8], mode, pow2, main, t)
            assert all(_same(g, w) for g, w in zip(got, want)), (x_dtype, fp8, mode, tuple(inp.shape))


@pytest.mark.gpu
@pytest.mark.parametrize("mkn", [(16384, 768, 3072), (768, 16384, 3072), (256, 512, 384), (100, 72, 56)])
def test_aot_matmul_equals_triton_bit_for_bit(mkn, first_configs):
    """Every compiled GEMM (a e4m3/e5m2 x b e4m3 -> bf16/fp32, fast or precise accumulation), tensorwise and rowwise
    scales, the recipes' layout (b column-major) and, for the awkward shape, a row-major b."""
    _gpu_has_fp8_cubins()
    from nanotrain.kernels import fp8 as kfp8

    M, K, N = mkn
    af, wf = torch.randn(M, K, device="cuda"), torch.randn(N, K, device="cuda")
    for a_fp8 in (E4M3, E5M2):
        for rowwise in (False, True):
            axis = -1 if rowwise else None  # per row of a and of W (a column of b = W.t()), or one per tensor
            a, sa = F8.quantize(af, a_fp8, axis)
            w, sw = F8.quantize(wf, E4M3, axis)
            sb = sw.t() if rowwise else sw
            for b in [w.t()] + ([w.t().contiguous()] if M % 16 else []):
                for out_dtype in (torch.bfloat16, torch.float32):
                    for fast in (True, False):
                        got = F8.aot_matmul(a, b, sa, sb, out_dtype, fast)
                        want = kfp8.matmul(a, b, sa, sb, out_dtype, use_fast_accum=fast)
                        assert _same(got, want), (a_fp8, rowwise, out_dtype, fast, tuple(b.stride()))


@pytest.mark.gpu
def test_registry_serves_aot_after_its_self_checks():
    _gpu_has_fp8_cubins()
    registry.clear_cache()
    for op in ("fp8_quantize", "fp8_quantize_dual"):
        backend = registry.resolve(op, "cuda", torch.bfloat16)
        assert backend.name == "aot"
        assert registry.run_self_check(backend, "cuda", torch.bfloat16).passed
    aot = next(b for b in registry.backends("fp8_matmul") if b.name == "aot")
    for rowwise in (False, True):
        assert registry.run_self_check(aot, "cuda", torch.bfloat16, rowwise=rowwise, aligned=True).passed
    with registry.forced(fp8_matmul="aot"):
        assert registry.resolve("fp8_matmul", "cuda", torch.bfloat16, rowwise=True, aligned=False).name == "aot"


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linear_through_aot_equals_triton(recipe, first_configs):
    """A d12-sized Float8Linear (x (4096, 768) bf16, fp32 master weight (3072, 768)) forward and backward: y, dx and
    dW from the aot backends equal the Triton backends' bit for bit, and no call left the cubins."""
    _gpu_has_fp8_cubins()
    config = F8.Float8Config.from_recipe(recipe)
    aot = F8.Fp8Kernels(F8.aot_quantize, F8.aot_quantize_dual, F8.aot_matmul, F8.aot_matmul)
    triton = F8.Fp8Kernels(F8.triton_quantize, F8.triton_quantize_dual, F8.triton_matmul, F8.triton_matmul)
    w = torch.randn(3072, 768, device="cuda", requires_grad=True)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    results = []
    for kernels in (aot, triton):
        with pytest.MonkeyPatch.context() as mp:
            if kernels is aot:  # every call of the recipe has a cubin: none may fall back to Triton
                for name in ("triton_quantize", "triton_quantize_dual", "triton_matmul"):
                    mp.setattr(F8, name, _no_fallback)
            y = F8.float8_linear(x, w, None, config, kernels)
            results.append((y, *torch.autograd.grad(y, (x, w), g)))
    for got, want in zip(*results):
        assert _same(got, want)


def _no_fallback(*args, **kwargs):
    raise AssertionError("an aot wrapper sent a recipe's call to the Triton backend")
