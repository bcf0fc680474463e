"""Self-checks of fused backends (registry.py), and the backend choice made once, when the model is built.

A fused backend is run once per case against its op's reference before it serves; a wrong, NaN or raising
one is skipped with one warning line (or, when forced, is an error). On CPU the checks run only where a
test asks (`registry.self_check_devices("cpu")`), as if the CPU were a GPU; on CUDA they always run.
"""
from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch

from nanotrain import optim, train
from nanotrain.errors import UserError
from nanotrain.model import GPTConfig, build_model
from nanotrain.ops import attention as A
from nanotrain.ops import fp8, registry
from nanotrain.ops import newton_schulz as ns
from nanotrain.ops.registry import BackendUnavailable

CPU = torch.device("cpu")
OP = "_test_selfcheck_attention"
CASE = {"head_dim": 16, "window": "short", "gqa": True}


def _times_1_01(q, k, v, window=None, scale=None):
    return A.reference(q, k, v, window, scale) * 1.01


def _nan(q, k, v, window=None, scale=None):
    return A.reference(q, k, v, window, scale) * float("nan")


def _raises(q, k, v, window=None, scale=None):
    raise RuntimeError("illegal memory access")


BROKEN = {"scaled": _times_1_01, "nan": _nan, "raises": _raises}


@pytest.fixture
def clean(monkeypatch):
    """No forced choices from the environment, checks on; forget fake ops, choices and verdicts afterwards."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.delenv(registry.CHECK_VAR, raising=False)
    registry.clear_cache()
    yield
    registry.unregister(OP)
    registry.unregister("attention", "_broken")
    registry.clear_cache()


def _fake_attention_op(kind: str) -> None:
    """An attention-shaped op checked by the real attention self-check: a broken fused backend, then SDPA, then
    the reference."""
    registry.register_self_check(OP, A.self_check)
    registry.register(OP, "broken", BROKEN[kind], fused=True, description="a broken kernel")
    registry.register(OP, "sdpa", A.sdpa)
    registry.register(OP, "reference", A.reference)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_fused_backend_is_skipped_with_one_warning_and_the_next_serves(clean, caplog, kind):
    _fake_attention_op(kind)
    with registry.self_check_devices("cpu"), caplog.at_level(logging.WARNING, logger="nanotrain.ops"):
        assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "sdpa"
        assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "sdpa"
        registry._state.cache.clear()  # a new choice for the same case reuses the verdict: no second line
        assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "sdpa"
        chosen, reasons = registry.explain(OP, CPU, torch.float32, **CASE)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{OP}: backend broken failed its self-check for cpu float32 gqa=True head_dim=16 "
                           "window=short: ")
    if kind == "raises":
        assert "raised RuntimeError: illegal memory access" in line
    else:  # the error and the bound are named
        assert "max error" in line and "bound <=" in line
        if kind == "nan":
            assert "nan" in line
    assert chosen.name == "sdpa" and reasons[0][0] == "broken" and reasons[0][1].startswith("self-check failed")


def test_the_error_size_is_measured(clean):
    _fake_attention_op("scaled")
    row = registry.run_self_check(registry.backends(OP)[0], CPU, torch.float32, **CASE)
    assert not row.passed and row.error is None
    # 1% of the largest output (|out| is about 1 for these inputs) against a bound near fp32 rounding
    assert 1e-3 < row.result.value < 1e-1 and row.result.bound < 1e-4


def test_a_forced_broken_backend_is_an_error(clean):
    _fake_attention_op("scaled")
    with registry.self_check_devices("cpu"), registry.forced(**{OP: "broken"}):
        with pytest.raises(BackendUnavailable, match=f"forces {OP}=broken, but it cannot run here: self-check failed"):
            registry.resolve(OP, CPU, torch.float32, **CASE)


def test_kernel_check_0_skips_the_checks(clean, monkeypatch):
    _fake_attention_op("nan")
    monkeypatch.setenv(registry.CHECK_VAR, "0")
    with registry.self_check_devices("cpu"):
        assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "broken"


def test_checks_run_on_cuda_always_and_on_cpu_only_when_a_test_asks(clean):
    _fake_attention_op("nan")
    broken = registry.backends(OP)[0]
    assert registry.self_check_applies(broken, torch.device("cuda"))
    assert not registry.self_check_applies(broken, CPU)
    assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "broken"
    with registry.self_check_devices("cpu"):
        assert registry.self_check_applies(broken, CPU)
        assert registry.resolve(OP, CPU, torch.float32, **CASE).name == "sdpa"
    # references and SDPA are never checked
    assert not any(registry.self_check_applies(b, torch.device("cuda")) for b in registry.backends(OP)[1:])


def test_the_real_triton_attention_passes_its_check_under_the_interpreter(clean):
    triton = next(b for b in registry.backends("attention") if b.name == "triton")
    row = registry.run_self_check(triton, CPU, torch.float32, **CASE)
    assert row.passed, row.describe()
    with registry.self_check_devices("cpu"), registry.forced(attention="triton"):
        assert registry.resolve("attention", CPU, torch.float32, **CASE).name == "triton"


def test_a_broken_backend_ahead_of_the_real_ones_is_skipped_when_the_model_is_built(clean, caplog):
    registry.register("attention", "_broken", _times_1_01, fused=True, before="triton")
    names = [b.name for b in registry.backends("attention")]
    assert names[names.index("triton") - 1] == "_broken"  # (after "aot", which cannot run on CPU)
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    assert build_model(cfg, "cpu").kernel_names()[0][0] == "_broken"  # unchecked on CPU
    with registry.self_check_devices("cpu"), caplog.at_level(logging.WARNING, logger="nanotrain.ops"):
        model = build_model(cfg, "cpu")
    # both cases (short window, full) skip it, with one line each; SDPA serves
    assert [names[0] for names in model.kernel_names()] == ["sdpa", "sdpa"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and all(line.startswith("attention: backend _broken failed") for line in lines)


def test_no_backend_choice_runs_inside_the_compiled_forward(monkeypatch):
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = build_model(cfg, "cpu")
    assert all(names is not None for names in model.kernel_names())

    def called_inside_forward(*args, **kwargs):
        raise AssertionError("the registry ran inside the forward")

    for name in ("resolve", "select", "forced_choice", "_why_not"):
        monkeypatch.setattr(registry, name, called_inside_forward)
    idx = torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    loss = model(idx, idx)  # eager forward and backward: the resolved callables only
    loss.backward()


def test_fp8_and_muon_checks_pass_their_references_and_catch_broken_ones():
    passing = [
        (fp8.self_check_cast, fp8.reference_cast, {}),
        (fp8.self_check_cast_dual, fp8.reference_cast_dual, {}),
        (fp8.self_check_matmul, fp8.reference_scaled_mm, {"rowwise": True}),
        (ns.self_check, ns.reference, {"shape": (96, 32)}),
        (ns.self_check_update, functools.partial(ns.muon_update_reference, ortho=ns.reference), {"shape": (32, 64)}),
    ]
    for check, fn, props in passing:
        result = check(fn, CPU, torch.float32, **props)
        assert result.passed, (check.__name__, result.describe())

    def wrong_scale(x, fp8_dtype, mode, power_of_2, write_main, write_t):  # values off by 9%: about 21 dB
        q, scale, q_t = fp8.reference_cast(x, fp8_dtype, mode, power_of_2, write_main, write_t)
        return q, scale * 1.1, q_t

    def off_by_20_percent(*args):
        return fp8.reference_scaled_mm(*args) * 1.2

    def lr_off(grads, params, mom, second, momentum, lr, *rest):
        ns.muon_update_reference(grads, params, mom, second, momentum, lr * 1.05, *rest, ortho=ns.reference)

    failing = [
        (fp8.self_check_cast, wrong_scale, {}),
        (fp8.self_check_matmul, off_by_20_percent, {}),
        (ns.self_check, lambda G, steps: ns.reference(G, steps) * 1.01, {"shape": (64, 64)}),
        (ns.self_check_update, lr_off, {"shape": (64, 64)}),
    ]
    for check, fn, props in failing:
        result = check(fn, CPU, torch.float32, **props)
        assert not result.passed, (check.__name__, result.describe())


def test_check_table_and_the_kernels_check_command(clean, monkeypatch, capsys):
    _fake_attention_op("scaled")
    registry.register(OP, "good", A.reference, fused=True, before="sdpa")
    rows, note = registry.check_all(CPU, ops_=[OP])
    assert [(r.backend, r.passed) for r in rows] == [("broken", False), ("good", True)]
    lines = registry.check_table(rows)
    assert lines[0].split() == ["op", "backend", "case", "measured", "vs", "bound", "result", "ms"]
    assert "FAIL" in lines[1] and "pass" in lines[2] and "max error" in lines[1]
    # the command on a CPU machine without the interpreter: the table of choices and a note, no crash
    registry.unregister(OP)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert train.main(["--kernels", "--check"]) == 0
    out = capsys.readouterr().out
    assert "backends on cpu" in out and "self-checks: no fused backend runs on this machine" in out
    with pytest.raises(UserError, match="goes with --kernels alone"):
        train.parse_args(["--check"])


def test_fp8_backends_are_resolved_at_conversion_and_the_compiled_forward_only_calls_them(monkeypatch):
    """The Triton FP8 ops (under the interpreter) chosen by convert_to_float8, then a fullgraph compile with the
    registry unusable: the same output and gradient as eager."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    with registry.forced(fp8_quantize="triton", fp8_quantize_dual="triton", fp8_matmul="triton"):
        assert fp8.convert_to_float8(model, fp8.Float8Config.from_recipe("rowwise")) == (2, 2)
    assert model[0].kernels.names == ("triton",) * 4
    copy.deepcopy(model)  # the resolved backends are plain functions (a custom op object cannot be copied)

    def called_inside_forward(*args, **kwargs):
        raise AssertionError("the registry ran inside the forward")

    monkeypatch.setattr(registry, "resolve", called_inside_forward)
    x = torch.randn(2, 16, 128)
    torch._dynamo.reset()
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(grad, model[0].weight.grad)


def test_the_optimizer_resolves_its_muon_step_when_built(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(16, 32)) for _ in range(2)]
    opt = optim.MuonAdamW([{"kind": "muon", "params": params, "lr": 0.02, "momentum": 0.95, "ns_steps": 5,
                            "beta2": 0.9, "weight_decay": 0.1}])

    def called_in_step(*args, **kwargs):
        raise AssertionError("the registry ran inside the optimizer step")

    monkeypatch.setattr(registry, "resolve", called_in_step)
    for p in params:
        p.grad = torch.randn_like(p)
    before = params[0].detach().clone()
    opt.step()
    assert (params[0] - before).abs().max().item() > 1e-3


@pytest.mark.gpu
def test_gpu_every_fused_backend_passes_its_self_check():
    rows, note = registry.check_all("cuda")
    print("\n".join(registry.check_table(rows)))
    assert rows, note
    assert all(r.passed for r in rows), [f"{r.op}/{r.backend} {r.case}: {r.describe()}" for r in rows if not r.passed]
