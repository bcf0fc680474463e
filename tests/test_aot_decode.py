"""The ahead-of-time KV-cache decode attention (kernels/_aot.py decode rows, csrc/attention/aot_ops.cpp
aot_attention_decode, the `aot` backend of attention_decode): the build embeds a cubin per decode variant and
target with the autotune list's first config, the launcher takes the intended row for the calls sampling and
evaluation make (the arguments captured from the Triton path's own launch), the op and its fake pass opcheck,
the Python glue plans, splits and combines as the Triton path does, the availability check names what is
missing, and the registry prefers aot. On a GPU: the AOT decode equals the Triton decode bit for bit and the
registry resolves aot after its self-check."""
from __future__ import annotations

import math
import subprocess

import pytest
import torch

from nanotrain.ops import _ext, registry
from tests.test_aot import TABLE, _elf_sm, _select, assert_aot_refused_here, with_cubins

DECODE = "attn_decode"
ROWS = [r for r in TABLE if r["kernel"] == DECODE]
BF = {"dtype": torch.bfloat16}


def _aot():
    from kernels import _aot

    return _aot


def _built_arches() -> list[str]:
    import os

    return _aot().parse_arches(os.environ.get("NANOTRAIN_CUDA_ARCHES", _aot().DEFAULT_ARCHES))


def _entries() -> list:
    return [e for e in _aot().VARIANTS if e.kernel == DECODE]


# ------------------------------------------------------------------------------------------------------------------
# The variants and their cubins
# ------------------------------------------------------------------------------------------------------------------

@with_cubins
def test_the_build_embeds_a_decode_cubin_per_variant_and_target(tmp_path):
    import nanotrain._C as C

    from kernels._compile import _cuobjdump

    expected = {(e.label, arch) for e in _entries() for arch in _built_arches()}
    assert {(r["label"], r["arch"]) for r in ROWS} == expected and len(ROWS) == len(expected)
    tool = _cuobjdump()
    for i, row in enumerate(TABLE):
        if row["kernel"] != DECODE:
            continue
        cubin = C.aot_cubin(i)
        assert len(cubin) == row["cubin_bytes"] and _elf_sm(cubin) == int(row["arch"].rstrip("a"))
        if tool is not None and row["label"].endswith("SPLIT=1 step"):  # the sampling step's rows: cuobjdump
            path = tmp_path / f"{i}.cubin"
            path.write_bytes(cubin)
            res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
            assert f"Function {row['function']}:" in res, res


def test_decode_rows_cover_every_query_tile_split_and_head_dim_with_a_generic_row_last():
    """Each (HEAD_DIM, BLOCK_M, SPLIT) the plan can choose has rows ending with a generic one; the sampling step
    (Tq = 1) has its own row (TQ the constant 1) and the prompt rows assume the model's 16-multiple strides."""
    from kernels import attention as K

    aot = _aot()
    tiles = {K.plan_decode(torch.empty(1, tq, 6, 64, device="meta"), 4096, None, 1).block_m for tq in range(1, 300)}
    assert tiles == {16, 32, 64}
    groups: dict[tuple, list[dict]] = {}
    for e in _entries():
        row = aot.describe(e, "90a")
        c = row["constexprs"]
        groups.setdefault((c["HEAD_DIM"], c["BLOCK_M"], c["SPLIT"]), []).append(row)
    assert set(groups) == {(d, m, s) for d in (64, 128) for m in tiles for s in (False, True)}
    for key, rows in groups.items():
        params = [{p["name"]: p for p in r["params"]} for r in rows]
        generic = [all(p["hint"] == "" or p["kind"] == "ptr" for p in ps.values()) and ps["TQ"]["kind"] == "i32"
                   for ps in params]
        assert generic[-1] and not any(generic[:-1]), key
        for ps in params[:-1]:  # specialized: every stride and the buckets multiples of 16; H, GROUPS, window any
            assert all(p["hint"] == "div16" for n, p in ps.items() if n.startswith(("stride_", "TUNE_", "SPLIT_LEN")))
            assert all(ps[n]["kind"] == "i32" and ps[n]["hint"] == "" for n in ("H", "GROUPS", "window"))
        part = "fp32" if key[2] else "bf16"  # the Triton launcher passes `out` as the unused partials
        assert all(ps["OPART"]["dtype"] == part and ps["SEQLENS"]["dtype"] == "i32" for ps in params)
        if key[1] == 16:
            assert params[0]["TQ"]["kind"] == "one"


def test_decode_launch_configs_are_the_autotune_lists_first_entries():
    from kernels import attention as attn

    aot = _aot()
    for arch, cap in (("80", (8, 0)), ("90a", (9, 0))):
        _, bn, warps, stages = attn._GPU_CONFIGS[attn.gpu_generation(cap)]["decode"][0]
        for e in _entries():
            row = aot.describe(e, arch)
            c = row["constexprs"]
            assert (c["BLOCK_N"], row["num_warps"], row["num_stages"]) == (bn, warps, stages)
            assert e.label.startswith(f"bf16 HEAD_DIM={c['HEAD_DIM']} BLOCK_M={c['BLOCK_M']} SPLIT={int(c['SPLIT'])} ")


# ------------------------------------------------------------------------------------------------------------------
# The launcher's choice for realistic calls: the arguments are those the Triton path passes to the kernel
# ------------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                  torch.int64: "i64"}


def _jit_call(monkeypatch, q, k_cache, v_cache, seqlens, window, num_splits=None) -> tuple[dict, dict]:
    """(flags, named arguments) of the kernel launch kernels/attention.py attention_decode makes for this call
    (captured at _launch; pointers as (dtype, address), as nanotrain._C.aot_select takes them). `num_splits`
    None plans the split as a GPU of 132 SMs would."""
    from kernels import attention as K

    seen = {}
    monkeypatch.setattr(K, "_launch", lambda kind, device, rows, cols, *args, grid_z=1, **cx: seen.update(
        args=args, constexprs=cx, grid_z=grid_z))
    if num_splits is None:
        B, Tq, H, _ = q.shape
        plan = K.plan_decode(q, k_cache.shape[1], window, 1)
        span = min(plan.window + plan.block_m + K._SPLIT_ALIGN, k_cache.shape[1])
        num_splits = K.decode_splits(math.ceil(Tq / plan.block_m) * B * H, span, 132)
    K.attention_decode(q, k_cache, v_cache, seqlens, window, 0.125, num_splits=num_splits)
    runtime = [n for n, is_constexpr in _aot().signature(K._attention_decode_kernel) if not is_constexpr]
    named = {n: (_TRITON_DTYPES[a.dtype], a.data_ptr()) if isinstance(a, torch.Tensor) else a
             for n, a in zip(runtime, seen["args"], strict=True)}
    c = seen["constexprs"]
    return {"HEAD_DIM": c["HEAD_DIM"], "BLOCK_M": c["BLOCK_M"], "SPLIT": int(c["SPLIT"])}, named


def _cache(B, Tmax, Hkv, D, dtype=torch.bfloat16):
    return torch.empty(B, Tmax, Hkv, D, dtype=dtype), torch.empty(B, Tmax, Hkv, D, dtype=dtype)


@with_cubins
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_the_launcher_takes_the_intended_decode_rows(arch, monkeypatch):
    if arch not in {r["arch"] for r in ROWS}:
        pytest.skip(f"built without sm_{arch}")

    def row(q, kc, vc, n, window=None, num_splits=None):
        flags, named = _jit_call(monkeypatch, q, kc, vc, n, window, num_splits)
        label = _select(DECODE, arch, flags, named)
        return None if label is None else label.removeprefix(f"{DECODE} [bf16 ").removesuffix(f"] sm_{arch}")

    # d12 sampling (H 6, D 128, a 2048-position cache): batch 1 splits the KV range, a full batch does not
    kc, vc = _cache(1, 2048, 6, 128)
    one = torch.tensor([1500], dtype=torch.int32)
    step = torch.empty(1, 1, 6, 128, **BF)
    assert row(step, kc, vc, one) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=1 step"
    assert row(step, kc, vc, one, window=1024) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=1 step"
    assert row(step, kc, vc, one, num_splits=1) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=0 step"
    kc32, vc32 = _cache(32, 2048, 6, 128)
    many = torch.full((32,), 700, dtype=torch.int32)
    assert row(torch.empty(32, 1, 6, 128, **BF), kc32, vc32, many) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=0 step"
    # the prompt (prefill, batch 1): a short one, one of 17..32 tokens (generic), a long one
    assert row(torch.empty(1, 9, 6, 128, **BF), kc, vc, torch.tensor([9], dtype=torch.int32), num_splits=1) \
        == "HEAD_DIM=128 BLOCK_M=16 SPLIT=0 row"
    assert row(torch.empty(1, 20, 6, 128, **BF), kc, vc, torch.tensor([20], dtype=torch.int32)) \
        == "HEAD_DIM=128 BLOCK_M=32 SPLIT=1 any"
    assert row(torch.empty(1, 300, 6, 128, **BF), kc, vc, torch.tensor([300], dtype=torch.int32)) \
        == "HEAD_DIM=128 BLOCK_M=64 SPLIT=1 row"
    assert row(torch.empty(1, 300, 6, 128, **BF), kc, vc, torch.tensor([300], dtype=torch.int32), num_splits=1) \
        == "HEAD_DIM=128 BLOCK_M=64 SPLIT=0 row"
    # GQA at head_dim 64 (8 query heads on 2 kv heads), a sliding window
    kg, vg = _cache(4, 512, 2, 64)
    lens = torch.tensor([512, 40, 300, 7], dtype=torch.int32)
    assert row(torch.empty(4, 1, 8, 64, **BF), kg, vg, lens) == "HEAD_DIM=64 BLOCK_M=16 SPLIT=1 step"
    assert row(torch.empty(4, 1, 8, 64, **BF), kg, vg, lens, window=128) == "HEAD_DIM=64 BLOCK_M=16 SPLIT=0 step"
    # awkward: a query that is a slice of wider rows (strides not multiples of 16), a cache view likewise
    wide = torch.empty(1, 1, 6, 200, **BF)[..., :128]
    assert row(wide, kc, vc, one) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=1 any"
    kw = torch.empty(1, 2048, 6, 136, **BF)[..., :128]
    assert row(step, kw, kw, one, num_splits=1) == "HEAD_DIM=128 BLOCK_M=16 SPLIT=0 any"
    # refused (the op names the triton backend): fp16, int64 lengths, a head_dim without cubins
    assert row(step.half(), kc.half(), vc.half(), one) is None
    assert row(step, kc, vc, one.long()) is None
    k96, v96 = _cache(1, 2048, 6, 96)
    assert row(torch.empty(1, 1, 6, 96, **BF), k96, v96, one) is None


# ------------------------------------------------------------------------------------------------------------------
# Schemas, fakes, glue, availability, registry
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(_ext.load_extension() is None, reason="nanotrain._C is absent")
def test_aot_decode_op_passes_opcheck_on_meta_tensors():
    meta = {"device": "meta", "dtype": torch.bfloat16}
    q, kc = torch.empty(2, 3, 8, 64, **meta), torch.empty(2, 40, 2, 64, **meta)
    n = torch.empty(2, device="meta", dtype=torch.int32)
    o_part = torch.empty(3, 2, 8, 3, 64, device="meta", dtype=torch.float32)
    l_part = torch.empty(3, 2, 8, 3, device="meta", dtype=torch.float32)
    op = torch.ops.nanotrain.aot_attention_decode.default
    for window in (None, 8):
        torch.library.opcheck(op, (q, kc, kc.clone(), n, q.clone(), None, None, window, 0.125, 16, 128))
        torch.library.opcheck(op, (q, kc, kc.clone(), n, q.clone(), o_part, l_part, window, 0.125, 16, 128))
    with pytest.raises(RuntimeError, match="out must have"):
        op(q, kc, kc, n, q[:, :2].clone(), None, None, None, 0.125, 16, 128)
    with pytest.raises(RuntimeError, match="go together"):
        op(q, kc, kc, n, q.clone(), o_part, None, None, 0.125, 16, 128)
    with pytest.raises(RuntimeError, match=r"o_part must be \(Z, B, H, Tq, D\)"):
        op(q, kc, kc, n, q.clone(), o_part[:, :, :4], l_part, None, 0.125, 16, 128)


def test_aot_decode_glue_plans_splits_and_combines_as_the_triton_path(monkeypatch):
    """The aot backend's Python around the op, with the op replaced by a CPU twin that checks what the C++ op
    checks and launches the kernel as the plan it receives says (under the interpreter): the same output as
    the Triton path for a forced split and without one, int64 lengths converted, the splits combined."""
    from kernels import attention as K
    from nanotrain.ops import attention as at

    calls = []

    def twin(q, k_cache, v_cache, seqlens, out, o_part, l_part, window, scale, block_m, split_len):
        assert seqlens.dtype == torch.int32 and seqlens.is_contiguous() and out.shape == q.shape
        assert (o_part is None) == (l_part is None)
        splits = 1 if o_part is None else o_part.shape[0]
        if o_part is not None:
            assert o_part.shape == (splits, *q.shape[:1], q.shape[2], q.shape[1], q.shape[3])
            assert l_part.shape == o_part.shape[:-1] and o_part.dtype == l_part.dtype == torch.float32
        calls.append((block_m, splits, split_len))
        plan = K.DecodePlan(block_m, K._effective_window(window, k_cache.shape[1]), splits, split_len)
        K._triton_decode_launch(plan, q, k_cache, v_cache, seqlens, out, o_part, l_part, window, scale)

    monkeypatch.setattr(torch.ops.nanotrain, "aot_attention_decode", twin, raising=False)
    B, Tmax, H, Hkv, D = 2, 300, 4, 2, 16
    q = torch.randn(B, 20, H, D)  # BLOCK_M 32
    kc, vc = torch.randn(B, Tmax, Hkv, D), torch.randn(B, Tmax, Hkv, D)
    n = torch.tensor([290, 45])
    for window, splits in ((None, 3), (20, 2), (None, 1)):
        got = K.run_decode(at.aot_decode_launch, q, kc, vc, n.int(), window, 0.25, num_splits=splits)
        want = K.attention_decode(q, kc, vc, n.int(), window, 0.25, num_splits=splits)
        assert torch.equal(got, want)
        plan = K.plan_decode(q, Tmax, window, splits)
        assert calls[-1] == (plan.block_m, plan.splits, plan.split_len) and plan.splits == splits
    got = at._aot_attention_decode(q, kc, vc, n, 20, 0.25)  # int64 lengths, planned (1 split on the CPU)
    assert torch.equal(got, K.attention_decode(q, kc, vc, n.int(), 20, 0.25)) and calls[-1][1] == 1
    with pytest.raises(ValueError, match="new queries"):
        at._aot_attention_decode(q, kc, vc, torch.tensor([19, 45]), None, 0.25)
    torch.library.opcheck(at._aot_attention_decode, (q, kc, vc, n, 20, 0.25),  # the custom op and its fake
                          test_utils=("test_schema", "test_faketensor"))


def test_aot_decode_check_names_what_is_missing(monkeypatch):
    from nanotrain.ops import attention as at

    asked = []
    monkeypatch.setattr(_ext, "aot_unavailable", lambda kernels, device, ops=None, **cx: asked.append(
        (kernels, ops, cx)))  # as on a GPU with cubins
    cuda = torch.device("cuda", 0)
    assert at.aot_decode_check(cuda, torch.bfloat16, head_dim=128) is None
    assert asked[-1] == (("attn_decode",), ("aot_attention_decode",), {"HEAD_DIM": 128})
    assert "bfloat16 only" in at.aot_decode_check(cuda, torch.float16, head_dim=64)
    assert "head_dim 96" in at.aot_decode_check(cuda, torch.bfloat16, head_dim=96)
    monkeypatch.setattr(_ext, "aot_unavailable", lambda *a, **k: "no cubin of attn_decode for sm_86")
    assert at.aot_decode_check(cuda, torch.bfloat16, head_dim=64) == "no cubin of attn_decode for sm_86"


def test_aot_decode_check_on_this_machine_and_the_head_dims_held(monkeypatch):
    from nanotrain.ops import attention as at

    assert_aot_refused_here(at.aot_decode_check(torch.device("cpu"), torch.bfloat16, head_dim=128))
    if not TABLE:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_ext, "has_kernel", lambda name, key: True)
    for d in (64, 128):
        assert _ext.aot_unavailable(("attn_decode",), torch.device("cuda", 0), HEAD_DIM=d) is None
    assert "HEAD_DIM=32" in _ext.aot_unavailable(("attn_decode",), torch.device("cuda", 0), HEAD_DIM=32)


def test_attention_decode_prefers_aot_then_triton_then_reference():
    from nanotrain.ops import attention as at

    backends = registry.backends("attention_decode")
    names = [b.name for b in backends]
    assert names.index("aot") < names.index("triton") < names.index("reference")
    aot = backends[names.index("aot")]
    assert aot.fused and aot.fn is at.aot_attention_decode and aot.check is at.aot_decode_check
    backend, reasons = registry.explain("attention_decode", "cpu", torch.float32, head_dim=64, window="full",
                                        gqa=False)
    assert backend.name == "reference" and "aot" in dict(reasons)


# ------------------------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------------------------

def _gpu_decode_cubins(head_dim: int) -> None:
    from nanotrain.ops import attention as at

    why = at.aot_decode_check(torch.device("cuda"), torch.bfloat16, head_dim=head_dim)
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads,window,batch", [(128, (6, 6), None, 1), (128, (6, 6), 256, 4),
                                                         (64, (8, 2), 100, 3)])
def test_aot_decode_equals_triton_bit_for_bit(head_dim, heads, window, batch, monkeypatch):
    """The sampling step (Tq 1), short, mid and long prompts (Tq 7, 20, 100), per-row cache lengths, the split
    the plan picks, none and a forced one: the AOT decode's bits are the Triton decode's (first configs)."""
    _gpu_decode_cubins(head_dim)
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    from kernels import attention as K
    from nanotrain.ops import attention as at

    K._tuned.cache_clear()
    H, Hkv = heads
    Tmax = 1100
    kc, vc = (torch.randn(batch, Tmax, Hkv, head_dim, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    for tq in (1, 7, 20, 100):
        q = torch.randn(batch, tq, H, head_dim, device="cuda", dtype=torch.bfloat16)
        lengths = [max(tq, (Tmax - 37 * b) if b % 2 == 0 else tq + 130 * b) for b in range(batch)]
        n = torch.tensor(lengths, device="cuda", dtype=torch.int32)
        for splits in (None, 1, 4):
            got = K.run_decode(at.aot_decode_launch, q, kc, vc, n, window, 0.125, num_splits=splits)
            want = K.attention_decode(q, kc, vc, n, window, 0.125, num_splits=splits)
            assert torch.equal(got, want), (tq, splits)
        assert torch.equal(at.aot_attention_decode(q, kc, vc, n, window), at.triton_attention_decode(q, kc, vc, n,
                                                                                                       window))
    K._tuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,window,gqa", [(128, "full", False), (64, "short", True)])
def test_registry_resolves_aot_decode_after_its_self_check(head_dim, window, gqa):
    _gpu_decode_cubins(head_dim)
    registry.clear_cache()
    props = {"head_dim": head_dim, "window": window, "gqa": gqa}
    backend = registry.resolve("attention_decode", "cuda", torch.bfloat16, **props)
    assert backend.name == "aot"
    row = registry.run_self_check(backend, "cuda", torch.bfloat16, **props)
    assert row.passed, row
