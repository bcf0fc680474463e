"""The ahead-of-time kernels in nanotrain._C (kernels/_aot.py, csrc/aot/, csrc/muon/aot_ops.cpp): the build embeds a
cubin per variant and target, the embedded table matches the kernels' current signatures, the ops' schemas and
fakes pass opcheck, the registry's `aot` backend says why it cannot serve, and a CPU-only build still works.
On a GPU: the AOT products and orthogonalization equal the Triton path's bit for bit, and the first call's time
(no compile, no autotune) is recorded against the JIT path's."""
from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
import time

import pytest
import torch

from nanotrain.ops import _ext, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = _ext.aot_table()
with_cubins = pytest.mark.skipif(not TABLE, reason=f"no AOT cubins: nanotrain._C is {_ext.extension_status()}")


def assert_aot_refused_here(why: str | None) -> None:
    """An aot backend's reason on this CPU machine: the device type where the build holds cubins, else the build
    (no CUDA at build time, no extension, or disabled)."""
    if TABLE:
        assert why == "device type 'cpu' unsupported (the cubins run on CUDA GPUs only)"
    else:
        assert why is not None and ("without CUDA" in why or "absent" in why or "disabled" in why), why


def _aot():
    from kernels import _aot

    return _aot


def _built_arches() -> list[str]:
    return _aot().parse_arches(os.environ.get("NANOTRAIN_CUDA_ARCHES", _aot().DEFAULT_ARCHES))


def _elf_sm(cubin: bytes) -> int:
    """The SM number in a CUDA ELF's e_flags: bits 8-15 from ELF ABI version 8 (nvcc 13), bits 0-7 before
    (the ptxas Triton bundles, CUDA 12.x: measured on both here)."""
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == 190, "not a CUDA ELF"
    flags = struct.unpack_from("<I", cubin, 48)[0]
    return (flags >> 8) & 0xFF if cubin[8] >= 8 else flags & 0xFF


@with_cubins
def test_the_build_embeds_one_cubin_per_variant_and_target(tmp_path):
    """Every entry of kernels/_aot.py's VARIANTS for every NANOTRAIN_CUDA_ARCHES target, each an ELF for that SM
    holding the named kernel (cuobjdump -lelf names the SM; -res-usage the function), bytes as the table says."""
    import nanotrain._C as C

    from kernels._compile import _cuobjdump

    aot = _aot()
    expected = {(e.kernel, e.label, arch) for arch in _built_arches() for e in aot.entries_for(arch)}  # min_arch
    assert {(r["kernel"], r["label"], r["arch"]) for r in TABLE} == expected
    assert len(TABLE) == len(expected)
    tool = _cuobjdump()
    for i, row in enumerate(TABLE):
        cubin = C.aot_cubin(i)
        assert len(cubin) == row["cubin_bytes"] and hashlib.sha256(cubin).hexdigest() == row["sha256"]
        assert _elf_sm(cubin) == int(row["arch"].rstrip("a"))
        if tool is not None and i in (0, len(TABLE) - 1):  # two rows through cuobjdump (a process each)
            path = tmp_path / f"{i}.cubin"
            path.write_bytes(cubin)
            listed = subprocess.run([tool, "-lelf", str(path)], capture_output=True, text=True, check=True).stdout
            assert f".sm_{row['arch']}.cubin" in listed, listed
            res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
            assert f"Function {row['function']}:" in res, res
    with pytest.raises(IndexError):
        C.aot_cubin(len(TABLE))


@with_cubins
def test_embedded_argument_packing_matches_the_kernels_signatures():
    """The parameter lists (names, kinds, hints, dtypes), constexprs and launch shapes the extension packs by are
    those kernels/_aot.py derives from the kernels as they are now: a kernel whose signature (or config table)
    changed after the build fails here until the extension is rebuilt."""
    aot = _aot()
    entries = {(e.kernel, e.label): e for e in aot.VARIANTS}
    for row in TABLE:
        now = aot.describe(entries[(row["kernel"], row["label"])], row["arch"])
        for key in ("params", "constexprs", "num_warps", "num_stages"):
            assert row[key] == now[key], f"{row['kernel']} [{row['label']}] sm_{row['arch']}: {key} changed"
    header = os.path.join(ROOT, "build", "aot", "aot_args.h")
    if os.path.exists(header):  # the in-place build's generated argument structs
        assert open(header).read() == aot.generate_header()


def test_generated_packing_follows_a_signature_change(monkeypatch):
    """The generator reads the signature from the kernel: an added parameter shows up in describe() (so the
    comparison above fails against an older build) and in the generated struct (so the C++ op no longer
    compiles until it fills it)."""
    aot = _aot()
    entry = aot.VARIANTS[0]
    before = aot.describe(entry, "80")
    real = aot.signature
    sym = aot._kernel_fn(entry.kernel)
    monkeypatch.setattr(aot, "signature",
                        lambda fn: real(fn)[:4] + [("extra", False)] + real(fn)[4:] if fn is sym else real(fn))
    changed = dict(entry.args, extra=ANY_INT)
    monkeypatch.setattr(aot, "VARIANTS", [aot.Entry(entry.kernel, entry.label, changed)] + aot.VARIANTS[1:])
    after = aot.describe(aot.VARIANTS[0], "80")
    assert after["params"] != before["params"] and after["params"][4]["name"] == "extra"
    assert "  int64_t extra;" in aot.generate_header()


ANY_INT = 17


def _select(kernel: str, arch: str, flags: dict, named: dict) -> str | None:
    """The label of the row the C++ launcher takes for a call (nanotrain._C.aot_select), or None."""
    import nanotrain._C as C

    aot = _aot()
    args = [named[n] for n, is_constexpr in aot.signature(aot._kernel_fn(kernel)) if not is_constexpr]
    row = C.aot_select(kernel, arch, flags, args)
    return None if row < 0 else f"{TABLE[row]['kernel']} [{TABLE[row]['label']}] sm_{TABLE[row]['arch']}"


def _ptr(t: torch.Tensor, offset: int = 0) -> tuple[str, int]:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names[t.dtype], t.data_ptr() + offset


def _sym_call(P: torch.Tensor, S: torch.Tensor, out: torch.Tensor, Z: torch.Tensor | None = None, **over) -> dict:
    """The arguments nanotrain::aot_sym_matmul passes (csrc/muon/aot_ops.cpp), by name."""
    zz = out if Z is None else Z
    named = {"P_ptr": _ptr(P), "S_ptr": _ptr(S), "Z_ptr": _ptr(zz), "C_ptr": _ptr(out), "M": P.shape[1],
             "K": P.shape[2], "alpha": 1.0, "beta": 0.0, "gamma": 0.0}
    for prefix, t, dims in (("p", P, "mk"), ("s", S, "mk"), ("z", zz, "mn"), ("c", out, "mn")):
        named.update({f"stride_{prefix}b": t.stride(0), f"stride_{prefix}{dims[0]}": t.stride(1),
                      f"stride_{prefix}{dims[1]}": t.stride(2)})
    return {**named, **over}


@with_cubins
def test_the_launcher_picks_the_most_specialized_row_that_admits_the_call():
    """csrc/aot/launcher.cpp find, through nanotrain._C.aot_select (no GPU needed): the training layouts take
    their specialized rows, odd sizes the generic one, and a call no cubin can take (fp16, a misaligned pointer,
    a 64-bit int, an arch without cubins, an uncompiled head_dim) none."""
    if "90a" not in {r["arch"] for r in TABLE}:
        pytest.skip("built without sm_90a")
    bf = {"dtype": torch.bfloat16}
    X, A, Z = torch.empty(3, 64, 256, **bf), torch.empty(3, 64, 64, **bf), torch.empty(3, 64, 64, **bf)
    T = torch.empty(3, 256, 64, **bf).mT  # a tall matrix's transpose view, as polar_express_triton iterates it
    no_z = {"HAS_Z": 0, "HAS_I": 0}
    assert _select("sym_matmul", "90a", no_z, _sym_call(X, X, A)) == "sym_matmul [bf16 HAS_Z=0 row] sm_90a"
    assert _select("sym_matmul", "80", no_z, _sym_call(X, X, A)) == "sym_matmul [bf16 HAS_Z=0 row] sm_80"
    assert _select("sym_matmul", "90a", no_z, _sym_call(T, T, A)) == "sym_matmul [bf16 HAS_Z=0 col] sm_90a"
    assert _select("sym_matmul", "90a", {"HAS_Z": 1, "HAS_I": 0}, _sym_call(A, A, X[:, :, :64].contiguous(), Z)) \
        == "sym_matmul [bf16 HAS_Z=1 row] sm_90a"
    odd, odd_a = torch.empty(3, 50, 300, **bf), torch.empty(3, 50, 50, **bf)
    assert _select("sym_matmul", "90a", no_z, _sym_call(odd, odd, odd_a)) == "sym_matmul [bf16 HAS_Z=0 any] sm_90a"
    assert _select("sym_matmul", "90a", no_z, _sym_call(X, X, A, P_ptr=_ptr(X, 2))) is None  # misaligned
    half = X.half()
    assert _select("sym_matmul", "90a", no_z, _sym_call(half, half, A.half())) is None
    assert _select("sym_matmul", "90a", no_z, _sym_call(odd, odd, odd_a, stride_pb=2**31 + 1)) is None
    assert _select("sym_matmul", "86", no_z, _sym_call(X, X, A)) is None
    assert _select("sym_matmul", "90a", {"HAS_Z": 0, "HAS_I": 1}, _sym_call(X, X, A)) is None  # not compiled

    q, kv = torch.empty(2, 256, 8, 128, **bf), torch.empty(2, 256, 2, 128, **bf)
    lse = torch.empty(2, 8, 256, dtype=torch.float32)

    def fwd(q, kv, lse, **over):
        named = {"Q": _ptr(q), "K": _ptr(kv), "V": _ptr(kv), "OUT": _ptr(q), "LSE": _ptr(lse),
                 "stride_lb": lse.stride(0), "stride_lh": lse.stride(1), "T": q.shape[1], "H": q.shape[2],
                 "GROUPS": q.shape[2] // kv.shape[2], "window": 100, "qk_scale": 0.1, "TUNE_T": 256,
                 "TUNE_W": 128, "TUNE_BH": 16}
        for prefix, t in (("q", q), ("k", kv), ("v", kv), ("o", q)):
            named.update({f"stride_{prefix}b": t.stride(0), f"stride_{prefix}t": t.stride(1),
                          f"stride_{prefix}h": t.stride(2)})
        return {**named, **over}

    assert _select("attn_fwd", "90a", {"HEAD_DIM": 128}, fwd(q, kv, lse)) == "attn_fwd [bf16 HEAD_DIM=128 row] sm_90a"
    mha = torch.empty(2, 256, 8, 128, **bf)
    assert _select("attn_fwd", "90a", {"HEAD_DIM": 128}, fwd(q, mha, lse)) == "attn_fwd [bf16 HEAD_DIM=128 mha] sm_90a"
    q2, kv2, lse2 = torch.empty(2, 100, 8, 128, **bf), torch.empty(2, 100, 8, 128, **bf), torch.empty(2, 8, 100)
    generic = _select("attn_fwd", "90a", {"HEAD_DIM": 128}, fwd(q2, kv2, lse2))
    assert generic == "attn_fwd [bf16 HEAD_DIM=128 any] sm_90a"
    assert _select("attn_fwd", "90a", {"HEAD_DIM": 96}, fwd(q, kv, lse)) is None


def test_variant_table_is_finite_explicit_and_generic_last():
    """Each kernel's rows end with its generic rows (every int a plain i32), so any bf16 call with 32-bit ints
    finds a cubin; the specialized rows come first (the launcher takes the first that admits a call)."""
    aot = _aot()
    step = {e.kernel for e in aot.MUON_STEP_VARIANTS}  # per-block rows in the JIT's specializations of the training
    # calls, no generic row per block (tests/test_aot_muon.py); float32 pointers
    by_flags: dict[tuple, list] = {}  # rows compete only with rows of the same kernel, constexprs and pointer dtypes
    for e in aot.VARIANTS:
        if e.kernel in step:
            continue
        row = aot.describe(e, "90a")
        ptrs = tuple(p["dtype"] for p in row["params"] if p["kind"] == "ptr")
        by_flags.setdefault((e.kernel, str(sorted(row["constexprs"].items())), ptrs), []).append(row)
    assert {kernel for kernel, _, _ in by_flags} == set(aot.KERNELS) - step
    for (kernel, _, _), rows in by_flags.items():
        generic = [all(p["kind"] in ("ptr", "i32", "fp32") and (p["hint"] == "" or p["kind"] == "ptr")
                       for p in r["params"]) for r in rows]
        assert any(generic), kernel
        first_generic = generic.index(True)
        assert all(generic[first_generic:]), f"{kernel}: a specialized row after a generic one is never taken"
        if not kernel.startswith("fp8_"):  # (the FP8 kernels' dtypes: tests/test_aot_fp8.py)
            # fp32 statistics and decode partials (with SPLIT; without it they are `out`), int32 cache lengths
            fp32 = ("LSE", "DELTA") + (("OPART", "LPART") if rows[0]["constexprs"].get("SPLIT") else ())
            assert all(p["dtype"] == ("fp32" if p["name"] in fp32 else "i32" if p["name"] == "SEQLENS" else "bf16")
                       for r in rows for p in r["params"] if p["kind"] == "ptr")


def test_launch_configs_are_the_autotune_lists_first_entries():
    from kernels import attention as attn
    from kernels import newton_schulz as nsk

    aot = _aot()
    entries = {e.kernel: e for e in aot.VARIANTS}
    for arch, cap in (("80", (8, 0)), ("90a", (9, 0))):
        sym = aot.describe(entries["sym_matmul"], arch)
        first = nsk._sym_configs(cap)[0]
        assert sym["constexprs"]["BLOCK_M"] == first.kwargs["BLOCK_M"] and sym["num_warps"] == first.num_warps
        assert sym["num_stages"] == first.num_stages
        for kernel, kind in (("attn_fwd", "fwd"), ("attn_dkdv", "dkdv"), ("attn_dq", "dq")):
            row = aot.describe(entries[kernel], arch)
            bm, bn, warps, stages = attn._GPU_CONFIGS[attn.gpu_generation(cap)][kind][0]
            assert (row["constexprs"]["BLOCK_M"], row["constexprs"]["BLOCK_N"], row["num_warps"],
                    row["num_stages"]) == (bm, bn, warps, stages)


@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_aot_ops_pass_opcheck_on_meta_tensors():
    meta = {"device": "meta", "dtype": torch.bfloat16}
    P, A, Z = torch.empty(2, 64, 128, **meta), torch.empty(2, 64, 64, **meta), torch.empty(2, 64, 64, **meta)
    X, Y = torch.empty(2, 64, 96, **meta), torch.empty(2, 64, 96, **meta)
    for args in [(P, P, A, 1.0, None, 0.0, 0.0), (A, A, Z, -0.5, A.clone(), 2.0, 0.0)]:
        torch.library.opcheck(torch.ops.nanotrain.aot_sym_matmul.default, args)
    for alpha in (None, 1.5):
        torch.library.opcheck(torch.ops.nanotrain.aot_axpby_matmul.default, (A, X, Y, alpha))
    q, kv = torch.empty(2, 32, 4, 64, **meta), torch.empty(2, 32, 2, 64, **meta)
    lse = torch.empty(2, 4, 32, device="meta", dtype=torch.float32)
    for window in (None, 8):
        torch.library.opcheck(torch.ops.nanotrain.aot_attention_fwd.default, (q, kv, kv, q.clone(), lse, window, 0.125))
        torch.library.opcheck(torch.ops.nanotrain.aot_attention_bwd.default,
                              (q, q, kv, kv, q, lse, q.clone(), kv.clone(), kv.clone(), window, 0.125))
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.nanotrain.aot_attention_fwd(q, kv, kv, q.clone(), lse[:, :2], None, 0.125)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.nanotrain.aot_sym_matmul(P, P, X, 1.0, None, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="B must be"):
        torch.ops.nanotrain.aot_axpby_matmul(X, X, Y, None)


@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_aot_python_ops_pass_opcheck_on_meta_tensors():
    from nanotrain.ops import attention as at
    from nanotrain.ops import newton_schulz as ns

    G = torch.empty(3, 64, 128, device="meta", dtype=torch.float32)
    torch.library.opcheck(ns.orthogonalize_aot, (G, 5), test_utils=("test_schema", "test_faketensor"))
    q, kv = (torch.empty(2, 32, h, 64, device="meta", dtype=torch.bfloat16) for h in (4, 2))
    lse = torch.empty(2, 4, 32, device="meta", dtype=torch.float32)
    torch.library.opcheck(at._aot_attention_fwd, (q, kv, kv, 16, 0.125), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(at._aot_attention_bwd, (q, q, kv, kv, q, lse, 16, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_aot_backend_is_preferred_and_says_why_it_cannot_serve():
    from nanotrain.ops import attention, newton_schulz  # noqa: F401  (registers the backends)

    for op in ("muon", "muon_update", "attention"):
        names = [b.name for b in registry.backends(op)]
        assert names.index("aot") < names.index("triton") < names.index("reference")
        aot = next(b for b in registry.backends(op) if b.name == "aot")
        assert aot.fused
    assert_aot_refused_here(dict(registry.explain("muon", "cpu", torch.float32, shape=(64, 64))[1])["aot"])
    assert registry.explain("muon", "cpu", torch.float32, shape=(64, 64))[0].name == "reference"


def test_aot_attention_check_names_dtype_and_head_dim(monkeypatch):
    from nanotrain.ops import attention as at

    monkeypatch.setattr(_ext, "aot_unavailable", lambda *args, **kw: None)  # as on a GPU with cubins
    cuda = torch.device("cuda", 0)
    assert at.aot_check(cuda, torch.bfloat16, head_dim=128) is None
    assert "bfloat16 only" in at.aot_check(cuda, torch.float16, head_dim=64)
    assert "head_dim 96" in at.aot_check(cuda, torch.bfloat16, head_dim=96)


def test_aot_check_names_the_missing_arch(monkeypatch):
    """On a GPU whose architecture the build did not target, the aot backend is unavailable and says which
    arches the extension holds (simulated: a fake device capability)."""
    if not TABLE:
        pytest.skip("no AOT cubins in this build")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(_ext, "has_kernel", lambda name, key: True)
    why = _ext.aot_unavailable(("sym_matmul",), torch.device("cuda", 0))
    assert why is not None and "no cubin of sym_matmul for sm_86" in why and "sm_80" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _ext.aot_unavailable(("sym_matmul", "axpby_matmul"), torch.device("cuda", 0)) is None
    assert _ext.aot_unavailable(("attn_fwd", "attn_dq"), torch.device("cuda", 0), HEAD_DIM=128) is None
    why = _ext.aot_unavailable(("attn_fwd",), torch.device("cuda", 0), HEAD_DIM=32)
    assert why is not None and "HEAD_DIM=32" in why


def test_extension_status_lists_the_cubins():
    status = _ext.extension_status()
    if TABLE:
        counts: dict[str, int] = {}
        for e in _aot().VARIANTS:
            if any(_aot().built_for(e, arch) for arch in _built_arches()):  # min_arch: FP8 only on sm89+ targets
                counts[e.kernel] = counts.get(e.kernel, 0) + 1
        listed = re.search(r"AOT cubins: (.*) for ", status)[1]  # in table order: sm_80's kernels first
        assert dict(re.findall(r"(\w+) x(\d+)", listed)) == {k: str(n) for k, n in counts.items()}
        assert all(f"sm_{a}" in status for a in {r["arch"] for r in TABLE})


@pytest.mark.slow
@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_cpu_only_build_imports_and_the_aot_backend_says_why(tmp_path):
    """NANOTRAIN_NO_CUDA=1 (what a machine without nvcc gets): the C++ part alone builds, imports, packs, and the
    aot backend reports itself unavailable with the reason; the AOT compile is not attempted."""
    env = {**os.environ, "NANOTRAIN_NO_CUDA": "1", "MAX_JOBS": "2"}
    env.pop("TRITON_INTERPRET", None)
    lib, tmp = tmp_path / "lib", tmp_path / "tmp"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "CPU-only (NANOTRAIN_NO_CUDA=1)" in build.stderr and "ahead-of-time" not in build.stderr
    so = next((lib / "nanotrain").glob("_C*.so"))
    code = (f"import importlib.util, sys, torch\n"
            f"spec = importlib.util.spec_from_file_location('nanotrain._C', {str(so)!r})\n"
            "C = importlib.util.module_from_spec(spec); sys.modules['nanotrain._C'] = C; spec.loader.exec_module(C)\n"
            "from nanotrain.ops import _ext, registry, newton_schulz\n"
            "print(C.WITH_CUDA, C.AOT_TABLE, _ext.aot_table())\n"
            "print(dict(registry.explain('muon', 'cpu', torch.float32, shape=(64, 64))[1])['aot'])\n"
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('nanotrain::aot_sym_matmul', 'CUDA'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "0 [] []"
    assert lines[1] == "the extension was built without CUDA (no nvcc at build time, or NANOTRAIN_NO_CUDA=1): no cubins"
    assert lines[2] == "False"


# ------------------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------------------

def _gpu_has_cubins() -> None:
    why = _ext.aot_unavailable(("sym_matmul", "axpby_matmul"), torch.device("cuda"))
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 768), (768, 256), (100, 300), (512, 512)])
def test_aot_equals_triton_bit_for_bit(shape, monkeypatch):
    """Same kernels, same configs (the Triton path limited to its autotune lists' first entries): same bits, for
    the products and the whole orthogonalization, row-major, transposed-view and generic (odd sizes) layouts."""
    _gpu_has_cubins()
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    from kernels import newton_schulz as nsk
    from nanotrain.ops import newton_schulz as ns

    nsk._tuned.cache_clear()
    G = torch.randn(3, *shape, device="cuda")
    assert torch.equal(ns.orthogonalize_aot(G, 5), ns.orthogonalize_triton(G, 5))
    X = torch.randn(3, *shape, device="cuda").bfloat16()
    for cur in (X, X.mT):
        s = cur.shape[1]
        a_aot, a_jit = (torch.empty(3, s, s, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ns.AotProducts.sym_matmul(cur, cur, a_aot)
        nsk.sym_matmul(cur, cur, a_jit)
        assert torch.equal(a_aot, a_jit)
        y_aot, y_jit = torch.empty_like(cur), torch.empty_like(cur)
        ns.AotProducts.axpby_matmul(a_aot, cur, y_aot, 0.5)
        nsk.axpby_matmul(a_jit, cur, y_jit, 0.5)
        assert torch.equal(y_aot, y_jit)
    nsk._tuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,window,heads", [(128, None, (6, 6)), (64, 100, (8, 2)), (128, 512, (4, 1))])
def test_aot_attention_equals_triton_bit_for_bit(head_dim, window, heads, monkeypatch):
    """Forward and backward (dq, dk, dv) of the AOT attention against the Triton path with its first configs."""
    _gpu_has_cubins()
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    from kernels import attention as attn
    from nanotrain.ops import attention as at

    if at.aot_check(torch.device("cuda"), torch.bfloat16, head_dim=head_dim):
        pytest.skip(at.aot_check(torch.device("cuda"), torch.bfloat16, head_dim=head_dim))
    attn._tuned.cache_clear()
    h, hkv = heads
    q = torch.randn(2, 1024, h, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 1024, hkv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    g = torch.randn(2, 1024, h, head_dim, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for name, fn in (("aot", at.aot_attention), ("triton", at.triton_attention)):
        out = fn(q, k, v, window)
        grads[name] = (out, *torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(grads["aot"], grads["triton"]):
        assert torch.equal(a, b)
    attn._tuned.cache_clear()


@pytest.mark.gpu
def test_aot_first_call_time_against_the_jit_path(tmp_path):
    """The first orthogonalization of a fresh process: AOT (module load, no compile) against Triton JIT (compile
    of every variant, NANOTRAIN_AUTOTUNE=first, an empty Triton cache). Prints both; the AOT one must be faster."""
    _gpu_has_cubins()
    code = ("import os, time, torch\nfrom nanotrain.ops import newton_schulz as ns\n"
            "G = torch.randn(4, 768, 3072, device='cuda'); torch.cuda.synchronize()\n"
            "t = time.perf_counter(); getattr(ns, os.environ['WHICH'])(G, 5); torch.cuda.synchronize()\n"
            "print(time.perf_counter() - t)\n")
    times = {}
    for which in ("orthogonalize_aot", "orthogonalize_triton"):
        env = {**os.environ, "WHICH": which, "NANOTRAIN_AUTOTUNE": "first", "TRITON_CACHE_DIR": str(tmp_path / which)}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        times[which] = float(out.stdout.split()[-1])
    print(f"first orthogonalize (4 x 768 x 3072, 5 steps): aot {times['orthogonalize_aot']:.3f} s, "
          f"triton JIT {times['orthogonalize_triton']:.3f} s")
    assert times["orthogonalize_aot"] < times["orthogonalize_triton"]


@pytest.mark.gpu
def test_aot_backend_serves_muon_after_its_self_check():
    _gpu_has_cubins()
    registry.clear_cache()
    backend = registry.resolve("muon", "cuda", torch.float32, shape=(256, 768))
    assert backend.name == "aot"
    start = time.perf_counter()
    row = registry.run_self_check(backend, "cuda", torch.float32, shape=(256, 768))
    assert row.passed, row
    assert time.perf_counter() - start < 5


def test_the_compile_is_dealt_to_one_target_processes_that_cover_each_entry_once():
    """MAX_JOBS processes at a time, each compiling for one target only (triton 3.6 compiles a target differently
    after another in the same process), together every entry built for each target exactly once."""
    for arches, jobs in ((["80", "90a"], 2), (["90a"], 16), (["80", "90a"], 1), (["80", "89", "90a"], 8)):
        tasks = _aot().compile_tasks(arches, jobs)
        assert len(tasks) == len(arches) * max(1, jobs // len(arches))
        for arch in arches:
            mine = sorted(i for a, indices in tasks if a == arch for i in indices)
            assert mine == [i for i, e in enumerate(_aot().VARIANTS) if _aot().built_for(e, arch)]
