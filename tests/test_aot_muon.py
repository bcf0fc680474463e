"""The whole Muon step from ahead-of-time cubins (kernels/_aot.py MUON_STEP_VARIANTS, csrc/muon/aot_ops.cpp,
nanotrain/ops/newton_schulz.py AotKernels / muon_step / aot_update_check).

On the CPU: a cubin per variant and target; the blocks and warps are the JIT launchers'; for every Muon stack of
the d4..d26 models and of their self-checks, the launcher (nanotrain._C.aot_select, the C++ `find`) takes a row
whose specialization is exactly the one Triton's JIT gives the call (so the cubin is the JIT's: the reductions add
in the same order); uncompiled blocks are refused by the launcher and, beforehand, by the backend's check; the
ops' fakes pass opcheck on meta tensors; the Python glue (AotKernels through muon_step) launches what the Triton
backend launches (the ops emulated on the CPU by the Triton kernels under the interpreter).
On a GPU: the AOT step equals the Triton step bit for bit, and the registry resolves aot after its self-check."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nanotrain.ops import _ext, registry
from nanotrain.ops import newton_schulz as ns
from tests.test_aot import assert_aot_refused_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = _ext.aot_table()
with_cubins = pytest.mark.skipif(not TABLE, reason=f"no AOT cubins: nanotrain._C is {_ext.extension_status()}")
STEP_KERNELS = ("muon_momentum", "muon_eq_scale", "scale_cast", "sumsq_rows", "normuon_scale", "muon_apply")
ROWS_KERNELS = ("muon_momentum", "scale_cast", "sumsq_rows", "muon_apply")
REDUCING_KERNELS = ("muon_momentum", "muon_eq_scale", "sumsq_rows", "normuon_scale")


def _aot():
    from kernels import _aot

    return _aot


def _built_arches() -> list[str]:
    return _aot().parse_arches(os.environ.get("NANOTRAIN_CUDA_ARCHES", _aot().DEFAULT_ARCHES))


def _model_stacks() -> dict[str, tuple[int, int, int]]:
    """{"d12 mlp.c_fc": (K, m, n), ...}: the stacks the optimizer updates for every depth 4..26 under TrainConfig's
    defaults, read off meta-device models (benchmarks/shapes.py, build_optimizer's grouping)."""
    bench = os.path.join(ROOT, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import shapes

    return {f"d{d} {name}": kmn for d in range(4, 27) for name, kmn in shapes.model_shape(d).muon_groups().items()}


def _served_shapes() -> set[tuple[int, int]]:
    """Every (m, n) the AOT step runs in training: the model stacks, the small stacks their self-checks run, and
    check_all's cases."""
    out = set()
    for _, m, n in _model_stacks().values():
        out |= {(m, n), ns._check_shape((m, n))}
    return out | {ns._check_shape(case["shape"]) for case in ns._CASES}


def _jit_class(value) -> tuple[str, str, str]:
    """(kind, hint, dtype) Triton's launcher gives an argument, by kernels/_compile.py _arg_spec (the rule the AOT
    compile uses; checked against Triton's own specializer below): a pointer (dtype, address)."""
    from kernels._compile import _arg_spec

    if isinstance(value, tuple):
        return "ptr", "div16" if value[1] % 16 == 0 else "", value[0]
    kind, _, div16 = _arg_spec(value, False)
    return ("one", "", "") if kind == "constexpr" else (kind, "div16" if div16 else "", "")


def _row(index: int) -> str:
    return f"{TABLE[index]['kernel']} [{TABLE[index]['label']}]"


def test_the_jit_class_rule_is_tritons():
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    for v in (0, 1, 2, 12, 16, 17, 48, 72, 768, 2**31 - 16, 2**31 + 16, 0.5):
        kind, hint = native_specialize_impl(BaseBackend, v, False, True, True)
        want = ("one", "", "") if kind == "constexpr" else (kind, "div16" if hint == "D" else "", "")
        assert _jit_class(v) == want and ns.jit_class(v) == want  # ns's: the run-time copy (no Triton import)


@with_cubins
def test_a_cubin_per_step_variant_and_target(tmp_path):
    """Every MUON_STEP_VARIANTS entry for every target is embedded, an ELF for that SM; one cubin per kernel goes
    through cuobjdump (the SM and the function it holds)."""
    import nanotrain._C as C

    from kernels._compile import _cuobjdump

    aot = _aot()
    expected = {(e.kernel, e.label, arch) for e in aot.MUON_STEP_VARIANTS for arch in _built_arches()}
    rows = {(r["kernel"], r["label"], r["arch"]): i for i, r in enumerate(TABLE) if r["kernel"] in STEP_KERNELS}
    assert set(rows) == expected
    assert {e.kernel for e in aot.MUON_STEP_VARIANTS} == set(STEP_KERNELS)
    tool = _cuobjdump()
    seen: set[str] = set()
    for (kernel, _, arch), i in rows.items():
        cubin = C.aot_cubin(i)
        assert cubin[:4] == b"\x7fELF" and len(cubin) == TABLE[i]["cubin_bytes"]
        if tool is not None and kernel not in seen:
            seen.add(kernel)
            path = tmp_path / f"{kernel}.cubin"
            path.write_bytes(cubin)
            listed = subprocess.run([tool, "-lelf", str(path)], capture_output=True, text=True, check=True).stdout
            res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
            assert f".sm_{arch}.cubin" in listed and f"Function {TABLE[i]['function']}:" in res


def test_blocks_and_warps_are_the_jit_launchers(monkeypatch):
    """Each entry's blocks and warps are what kernels/newton_schulz.py's launchers use on a GPU for a size that
    maps to that block, and the Python mirror of the C++ block rule (aot_launches' flags) is _rows_cfg's."""
    from kernels import newton_schulz as nsk

    monkeypatch.setattr(nsk, "interpreting", lambda: False)
    for e in _aot().MUON_STEP_VARIANTS:
        row = _aot().describe(e, "90a")
        c = row["constexprs"]
        if e.kernel in ROWS_KERNELS:
            assert nsk._rows_cfg(c["BLOCK_C"]) == (c["BLOCK_R"], c["BLOCK_C"], row["num_warps"]), e.label
        else:
            assert row["num_warps"] == nsk._vector_warps(c["BLOCK"]), e.label
        assert row["num_stages"] == 3  # the launchers pass no num_stages: Triton's default
    for size in [*range(1, 300), 767, 768, 1024, 1025, 1664, 3072, 4096, 4097, 6656, 20000]:
        br, bc, _ = nsk._rows_cfg(size)
        assert ns._rows_blocks(size) == {"BLOCK_R": br, "BLOCK_C": bc}
        assert ns._vector_block(size) == {"BLOCK": min(4096, 1 << (size - 1).bit_length())}


def test_launches_mirror_the_kernel_signatures():
    """aot_launches names every runtime parameter of each kernel (what the C++ op fills), no more."""
    aot = _aot()
    for update in (True, False):
        for kernel, flags, named in ns.aot_launches(768, 3072, update):
            params = [n for n, is_constexpr in aot.signature(aot._kernel_fn(kernel)) if not is_constexpr]
            assert sorted(named) == sorted(params), kernel
            assert set(flags) <= {n for n, is_constexpr in aot.signature(aot._kernel_fn(kernel)) if is_constexpr}


@with_cubins
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_every_training_launch_takes_the_jit_specialization(arch):
    """For every stack of d4..d26 (and their self-checks), each of the 6 launches finds a row of its block; for the
    four kernels that reduce (whose order of additions follows the loads' vectorization, hence the hints) the
    row's parameter classes are exactly the JIT's for that call: the embedded cubin is the one Triton would
    compile. scale_cast and muon_apply compute each element alone, the same whatever the vectorization: the
    small stacks take their generic rows, the large ones their exact rows (the JIT's vectorized loads)."""
    if arch not in {r["arch"] for r in TABLE}:
        pytest.skip(f"built without sm_{arch}")
    shapes = _served_shapes()
    assert (768, 768) in shapes and (6, 12) in shapes and (8, 8) in shapes and (32, 128) in shapes
    for m, n in sorted(shapes):
        for kernel, flags, named in ns.aot_launches(m, n):
            i = ns.aot_row(kernel, arch, flags, named)
            assert i >= 0, f"({m}, {n}) {kernel} {flags}: no row"
            row = TABLE[i]
            assert all(row["constexprs"][k] == v for k, v in flags.items())
            got = [(p["kind"], p["hint"], p["dtype"]) for p in row["params"]]
            want = [_jit_class(named[p["name"]]) for p in row["params"]]
            if kernel in REDUCING_KERNELS or min(m, n) >= 256:
                assert got == want, f"({m}, {n}) {kernel}: row [{row['label']}] is not the JIT's specialization"


def _covers(a: dict, b: dict) -> bool:
    """Whether parameter class a admits every value class b admits (the launcher's `admits`)."""
    if a["kind"] == "ptr" or b["kind"] == "ptr":
        return a["kind"] == b["kind"] and a["dtype"] == b["dtype"] and (not a["hint"] or bool(b["hint"]))
    if a["kind"] == "one":
        return b["kind"] == "one"
    if a["kind"] == "i32" and b["kind"] in ("one", "i32"):
        return not a["hint"] or (b["kind"] == "i32" and bool(b["hint"]))
    return a["kind"] == b["kind"] and not a["hint"]


def test_step_rows_are_most_specialized_first_and_all_used():
    """Within a kernel's rows of the same blocks, no row comes after one that admits every call it admits (it
    would never be taken); and every row is taken by some training or self-check launch, or is a generic
    scale_cast row (orthogonalize of any shape): nothing is compiled that training does not use."""
    aot = _aot()
    rows = [aot.describe(e, "90a") for e in aot.MUON_STEP_VARIANTS]
    for i, b in enumerate(rows):
        for a in rows[:i]:
            if a["kernel"] == b["kernel"] and a["constexprs"] == b["constexprs"]:
                assert not all(_covers(pa, pb) for pa, pb in zip(a["params"], b["params"])), \
                    f"{b['kernel']} [{b['label']}] comes after [{a['label']}], which admits all its calls"
    if not TABLE:
        return
    used = {_row(ns.aot_row(k, "90a", flags, named)) for m, n in _served_shapes()
            for k, flags, named in ns.aot_launches(m, n)}
    compiled = {f"{e.kernel} [{e.label}]" for e in aot.MUON_STEP_VARIANTS}
    generic_scale_cast = {r for r in compiled if r.startswith("scale_cast") and r.endswith(" any]")}
    assert compiled - generic_scale_cast <= used and used <= compiled
    assert len(compiled) == len(aot.MUON_STEP_VARIANTS) == 62


@with_cubins
def test_the_launcher_picks_the_intended_rows_for_d12_and_d26():
    if "90a" not in {r["arch"] for r in TABLE}:
        pytest.skip("built without sm_90a")

    def picked(m: int, n: int) -> list[str]:
        return [_row(ns.aot_row(k, "90a", flags, named)) for k, flags, named in ns.aot_launches(m, n)]

    assert _model_stacks()["d12 attn.c_q attn.c_k attn.c_v attn.c_proj"] == (48, 768, 768)
    assert _model_stacks()["d12 mlp.c_fc"] == (12, 3072, 768) and _model_stacks()["d12 attn.ve_gate"] == (6, 6, 12)
    assert picked(768, 768) == [
        "muon_momentum [fp32 BLOCK_C=1024 row]", "muon_eq_scale [fp32 BLOCK=1024 row]",
        "scale_cast [fp32->bf16 BLOCK_C=1024 row]", "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=1024 row]",
        "normuon_scale [fp32 BLOCK=1024 row]", "muon_apply [bf16,fp32 BLOCK_C=1024 per-row]"]
    assert picked(3072, 768) == [  # mlp.c_fc: tall, one second moment per row
        "muon_momentum [fp32 BLOCK_C=1024 row]", "muon_eq_scale [fp32 BLOCK=4096 row]",
        "scale_cast [fp32->bf16 BLOCK_C=1024 row]", "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=1024 row]",
        "normuon_scale [fp32 BLOCK=4096 row]", "muon_apply [bf16,fp32 BLOCK_C=1024 per-row]"]
    assert picked(768, 3072) == [  # mlp.c_proj: wide, per column (sumsq_rows on the transposed view)
        "muon_momentum [fp32 BLOCK_C=1024 row]", "muon_eq_scale [fp32 BLOCK=1024 row]",
        "scale_cast [fp32->bf16 BLOCK_C=1024 row]", "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=1024 col]",
        "normuon_scale [fp32 BLOCK=4096 row]", "muon_apply [bf16,fp32 BLOCK_C=1024 col]"]
    assert picked(6, 12) == [  # attn.ve_gate (n_head, 12): plain ints, the transposed view's column sums
        "muon_momentum [fp32 BLOCK_C=16 small]", "muon_eq_scale [fp32 BLOCK=8 small]",
        "scale_cast [fp32->bf16 BLOCK_C=16 any]", "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=16 smallcol]",
        "normuon_scale [fp32 BLOCK=16 small]", "muon_apply [bf16,fp32 BLOCK_C=16 any]"]
    assert _model_stacks()["d26 attn.c_q attn.c_k attn.c_v attn.c_proj"] == (104, 1664, 1664)
    assert picked(1664, 1664) == [
        "muon_momentum [fp32 BLOCK_C=1024 row]", "muon_eq_scale [fp32 BLOCK=2048 row]",
        "scale_cast [fp32->bf16 BLOCK_C=1024 row]", "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=1024 row]",
        "normuon_scale [fp32 BLOCK=2048 row]", "muon_apply [bf16,fp32 BLOCK_C=1024 per-row]"]
    assert picked(6656, 1664)[1::3] == ["muon_eq_scale [fp32 BLOCK=4096 row]",
                                        "normuon_scale [fp32 BLOCK=4096 row]"]
    assert picked(13, 12)[3] == "sumsq_rows [bf16 ROUND_TO=fp32 BLOCK_C=16 small]"  # d26 ve_gate: m >= n
    assert picked(8, 8)[0] == "muon_momentum [fp32 BLOCK_C=16 small16]"  # the batch stride 64: a multiple of 16
    # orthogonalize's per-matrix factor (stride 1, row stride 0) takes the generic scale_cast row of any block
    for n, block in ((768, 1024), (300, 512), (50, 64)):
        [(kernel, flags, named)] = ns.aot_launches(100, n, update=False)
        assert _row(ns.aot_row(kernel, "90a", flags, named)) == f"scale_cast [fp32->bf16 BLOCK_C={block} any]"


@with_cubins
def test_the_launcher_refuses_uncompiled_blocks_and_classes():
    """A block without cubins (C = 300 -> BLOCK_C 512 with plain ints; R = 20 -> BLOCK 32 not a multiple of 16),
    a dtype not compiled (bf16 parameters), a flag value never compiled: no row (the op then fails naming triton)."""
    launches = {k: (flags, named) for k, flags, named in ns.aot_launches(100, 300)}
    flags, named = launches["muon_momentum"]
    assert ns.aot_row("muon_momentum", "90a", flags, named) == -1
    flags, named = ns.aot_launches(20, 64)[1][1:]
    assert flags == {"BLOCK": 32} and ns.aot_row("muon_eq_scale", "90a", flags, named) == -1
    flags, named = {k: (f, a) for k, f, a in ns.aot_launches(768, 768)}["muon_momentum"]
    assert ns.aot_row("muon_momentum", "90a", flags, named) >= 0
    assert ns.aot_row("muon_momentum", "90a", flags, {**named, "G_ptr": ("bf16", 4096)}) == -1
    assert ns.aot_row("muon_momentum", "90a", {"BLOCK_R": 2, "BLOCK_C": 2048}, named) == -1
    assert ns.aot_row("muon_momentum", "86", flags, named) == -1


@with_cubins
def test_the_checks_refuse_shapes_without_cubins(monkeypatch):
    """On a GPU with cubins (simulated: sm_90), the muon_update check refuses a shape whose blocks were not
    compiled, naming the kernel and block, and dtypes other than float32; orthogonalize serves any shape."""
    monkeypatch.setattr(_ext, "aot_unavailable", lambda *args, **kw: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    for shape in _served_shapes():
        assert ns.aot_update_check(cuda, torch.float32, shape=shape) is None, shape
    why = ns.aot_update_check(cuda, torch.float32, shape=(100, 300))
    assert why == ("no cubin of muon_momentum with BLOCK_R=8, BLOCK_C=512 for (100, 300) stacks on sm_90a "
                   "(kernels/_aot.py MUON_STEP_VARIANTS lists the compiled blocks and layouts)")
    # m = 16: eq_scale's BLOCK 16 row takes R as a plain int (the ve_gate rows); the JIT hints 16 as a multiple
    # of 16, vectorizing the reduction's loads: another order of additions, so the check refuses it
    assert ns.aot_row("muon_eq_scale", "90a", {"BLOCK": 16}, ns.aot_launches(16, 64)[1][2]) >= 0
    assert ns.aot_update_check(cuda, torch.float32, shape=(16, 64)).startswith(
        "no cubin of muon_eq_scale with BLOCK=16 in the JIT specialization for (16, 64) stacks on sm_90a")
    # (768, 48) has its blocks, the (128, 8) stacks its self-check runs do not (R = 128 in a BLOCK_C 16 row)
    assert all(ns.aot_row(k, "90a", f, a) >= 0 for k, f, a in ns.aot_launches(768, 48))
    assert ns.aot_update_check(cuda, torch.float32, shape=(768, 48)).startswith(
        "its self-check's (128, 8) stacks: no cubin of muon_momentum with BLOCK_R=256, BLOCK_C=16 in the JIT")
    assert "float32 stacks" in ns.aot_update_check(cuda, torch.bfloat16, shape=(768, 768))
    assert "2^31" in ns.aot_update_check(cuda, torch.float32, shape=(65536, 32768))
    for shape in ((100, 300), (768, 3072), (5, 3)):
        assert ns.aot_check(cuda, torch.bfloat16, shape=shape) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "sm_86" in ns.aot_update_check(cuda, torch.float32, shape=(768, 768))


def test_the_registry_lists_the_aot_step_and_says_why_not_on_cpu():
    backend, reasons = registry.explain("muon_update", "cpu", torch.float32, shape=(768, 768))
    assert backend.name == "reference"
    assert_aot_refused_here(dict(reasons)["aot"])
    aot = next(b for b in registry.backends("muon_update") if b.name == "aot")
    assert aot.fn is ns.muon_update_aot and aot.check is ns.aot_update_check


@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_step_ops_pass_opcheck_on_meta_tensors():
    meta = {"device": "meta"}
    f32 = {**meta, "dtype": torch.float32}
    K, m, n = 3, 48, 80
    g, mb, p = (torch.empty(K, m, n, **f32) for _ in range(3))
    o = torch.empty(K, m, n, **meta, dtype=torch.bfloat16)
    rsq, f = torch.empty(K, m, **f32), torch.empty(K, m, **f32)
    ops = torch.ops.nanotrain
    torch.library.opcheck(ops.aot_muon_momentum.default, (g, mb, rsq, 0.95))
    torch.library.opcheck(ops.aot_muon_eq_scale.default, (rsq, f, 1.01))
    torch.library.opcheck(ops.aot_scale_cast.default, (g, f, o))
    torch.library.opcheck(ops.aot_scale_cast.default, (g, torch.empty(K, **f32), o))
    torch.library.opcheck(ops.aot_sumsq_rows.default, (o, torch.empty(K, m, **f32), torch.float32))
    torch.library.opcheck(ops.aot_sumsq_rows.default, (o.mT, torch.empty(K, n, **f32), torch.float32))
    sm = torch.empty(K, 1, n, **f32).squeeze(-2)
    torch.library.opcheck(ops.aot_normuon_scale.default, (torch.empty(K, n, **f32), sm, torch.empty(K, n, **f32),
                                                           48.0, 48 ** 0.5, 0.95))
    torch.library.opcheck(ops.aot_muon_apply.default, (o, torch.empty(K, n, **f32), False, p, 0.02, 0.2))
    torch.library.opcheck(ops.aot_muon_apply.default, (o, f, True, p, 0.02, 0.2))
    second = torch.empty(K, 1, n, **f32)
    torch.library.opcheck(ns.muon_update_aot, (g, p, mb, second, 0.95, 0.02, 0.2, 0.9, 5),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="rsq must be"):
        ops.aot_muon_momentum(g, mb, torch.empty(K, n, **f32), 0.95)
    with pytest.raises(RuntimeError, match="f must be"):
        ops.aot_muon_apply(o, f, False, p, 0.02, 0.2)  # per column: (K, n) factors
    with pytest.raises(RuntimeError, match="f must be"):
        ops.aot_scale_cast(g, torch.empty(K, n, **f32), o)


class _Emulated:
    """The extension's aot_* step ops emulated on the CPU by kernels/newton_schulz.py's launchers (the Triton
    kernels under the interpreter), with the ops' signatures: the AOT path's Python glue can then run here."""

    def __init__(self):
        from kernels import newton_schulz as nsk

        self.nsk = nsk
        self.calls: list[str] = []

    def aot_muon_momentum(self, grads, momentum_buffer, rsq, momentum):
        self.calls.append("muon_momentum")
        rsq.copy_(self.nsk.muon_momentum(grads, momentum_buffer, momentum))

    def aot_muon_eq_scale(self, rsq, f, norm_safety):
        self.calls.append("muon_eq_scale")
        f.copy_(self.nsk.muon_eq_scale(rsq, norm_safety))

    def aot_scale_cast(self, x, f, out):
        self.calls.append("scale_cast")
        self.nsk.scale_cast(x, f, out)

    def aot_sumsq_rows(self, x, out, round_to):
        self.calls.append("sumsq_rows")
        out.copy_(self.nsk.sumsq_rows(x, round_to))

    def aot_normuon_scale(self, q, second_momentum, f, red_size, target_norm, beta2):
        self.calls.append("normuon_scale")
        f.copy_(self.nsk.normuon_scale(q, second_momentum, red_size, target_norm, beta2))

    def aot_muon_apply(self, o, f, f_per_row, params, lr, weight_decay):
        self.calls.append("muon_apply")
        self.nsk.muon_apply(o, f, f_per_row, params, lr, weight_decay)

    def aot_sym_matmul(self, P, S, out, alpha, Z, beta, gamma):
        self.calls.append("sym_matmul")
        self.nsk.sym_matmul(P, S, out, alpha, Z, beta, gamma)

    def aot_axpby_matmul(self, B, X, out, alpha):
        self.calls.append("axpby_matmul")
        self.nsk.axpby_matmul(B, X, out, alpha)


@pytest.mark.parametrize("shape", [(2, 24, 40), (2, 40, 24)])
def test_the_aot_glue_launches_what_the_triton_backend_launches(shape, monkeypatch):
    """muon_update_aot (AotKernels through the shared muon_step) with the ops emulated by the Triton launchers:
    the same 7 + 3-per-step launches and the same bits as muon_update_triton (a swapped argument in AotKernels,
    e.g. the reduced size or the per-row flag, changes the result); orthogonalize_aot likewise."""
    emulated = _Emulated()
    for name in dir(_Emulated):
        if name.startswith("aot_"):
            monkeypatch.setattr(torch.ops.nanotrain, name, getattr(emulated, name), raising=False)
    gen = torch.Generator().manual_seed(0)
    K, m, n = shape
    state = [torch.randn(K, m, n, generator=gen), torch.randn(K, m, n, generator=gen) * 0.1,
             torch.randn(K, m, n, generator=gen) * 0.5,
             torch.rand((K, m, 1) if m >= n else (K, 1, n), generator=gen) * 1e-2]
    hp = (0.95, 0.02, 0.2, 0.9, 2)
    jit = [t.clone() for t in state]
    ns.muon_update_triton(*jit, *hp)
    aot = [t.clone() for t in state]
    ns.muon_update_aot(*aot, *hp)
    assert emulated.calls == ["muon_momentum", "muon_eq_scale", "scale_cast", *["sym_matmul", "sym_matmul",
                              "axpby_matmul"] * 2, "sumsq_rows", "normuon_scale", "muon_apply"]
    for a, b in zip(aot, jit):
        assert torch.equal(a, b)
    assert not torch.equal(aot[1], state[1]) and not torch.equal(aot[3], state[3])
    G = torch.randn(K, m, n, generator=gen)
    assert torch.equal(ns.orthogonalize_aot(G, 2), ns.orthogonalize_triton(G, 2))


# ------------------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------------------

def _gpu_has_cubins() -> None:
    why = _ext.aot_unavailable(ns.AOT_STEP_KERNELS, torch.device("cuda"))
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("kmn", [(48, 768, 768), (12, 3072, 768), (12, 768, 3072), (6, 6, 12), (13, 13, 12),
                                 (3, 8, 8), (2, 1664, 6656)])
def test_aot_muon_update_equals_triton_bit_for_bit(kmn, monkeypatch):
    """Two steps of the AOT Muon step against the Triton step (NANOTRAIN_AUTOTUNE=first: the products' first
    configs, which the cubins hold): params, momentum buffer, second momentum and the consumed grads, bit for bit.
    The d12 stacks, the ve_gate stacks (wide and tall), the self-checks' (8, 8) and a d26 MLP stack."""
    _gpu_has_cubins()
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    from kernels import newton_schulz as nsk

    K, m, n = kmn
    assert ns.aot_update_check(torch.device("cuda"), torch.float32, shape=(m, n)) is None
    nsk._tuned.cache_clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = torch.randn(K, m, n, device="cuda", generator=gen) * 0.02
    states = {name: [params.clone(), torch.zeros_like(params),
                     torch.zeros((K, m, 1) if m >= n else (K, 1, n), device="cuda")] for name in ("aot", "triton")}
    for step in range(2):
        grads = torch.randn(K, m, n, device="cuda", generator=gen)
        for name, fn in (("aot", ns.muon_update_aot), ("triton", ns.muon_update_triton)):
            p, mb, sm = states[name]
            g = grads.clone()
            fn(g, p, mb, sm, 0.95, 0.02, 0.2, 0.95, 5)
            states[name].append(g)
        for a, b in zip(states["aot"], states["triton"]):
            assert torch.equal(a, b), f"step {step}"
        del states["aot"][3:], states["triton"][3:]
    assert not torch.equal(states["aot"][0], params)
    nsk._tuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((768, 3072), torch.float32), ((3072, 768), torch.bfloat16),
                                         ((100, 300), torch.float16), ((6, 12), torch.float32)])
def test_aot_orthogonalize_equals_triton_bit_for_bit(shape, dtype, monkeypatch):
    """The AOT scale-and-cast (from G's float32 copy) and products against orthogonalize_triton (G's dtype)."""
    _gpu_has_cubins()
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    from kernels import newton_schulz as nsk

    nsk._tuned.cache_clear()
    G = torch.randn(3, *shape, device="cuda").to(dtype)
    assert torch.equal(ns.orthogonalize_aot(G, 5), ns.orthogonalize_triton(G, 5))
    nsk._tuned.cache_clear()


@pytest.mark.gpu
def test_aot_step_op_refuses_an_uncompiled_block_clearly():
    _gpu_has_cubins()
    g = torch.randn(2, 100, 300, device="cuda")
    with pytest.raises(RuntimeError, match="no ahead-of-time cubin serves muon_momentum .*BLOCK_C=512.*triton"):
        ns.AotKernels.muon_momentum(g, torch.zeros_like(g), 0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(768, 3072), (6, 12)])
def test_registry_resolves_the_aot_step_after_its_self_check(shape):
    _gpu_has_cubins()
    registry.clear_cache()
    backend = registry.resolve("muon_update", "cuda", torch.float32, shape=shape)
    assert backend.name == "aot"
    row = registry.run_self_check(backend, "cuda", torch.float32, shape=shape)
    assert row.passed, row
    assert ns.resolve_update("cuda", torch.float32, shape) is ns.muon_update_aot
    assert registry.resolve("muon_update", "cuda", torch.bfloat16, shape=shape).name == "triton"
