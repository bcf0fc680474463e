"""The backend registry: preference order, availability checks and their reasons, the cache, forced choices
(code, --kernels, NANOTRAIN_KERNELS), errors, the Triton-interpreter rule and the startup report.

Each test registers fake ops under names starting with `_test_` and removes them afterwards."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from nanotrain.ops import registry
from nanotrain.ops.registry import BackendUnavailable

CPU = torch.device("cpu")


class Counter:
    """An availability check that counts its calls and answers `reason` (None: available)."""

    def __init__(self, reason: str | None = None):
        self.reason = reason
        self.calls: list[tuple] = []

    def __call__(self, device, dtype, **props):
        self.calls.append((device.type, dtype, tuple(sorted(props.items()))))
        return self.reason


@pytest.fixture
def fake_op(monkeypatch):
    """Register fake ops; unregister them, the overrides and the cache afterwards."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    made: list[str] = []

    def make(op: str, *backends: tuple) -> str:
        made.append(op)
        for spec in backends:
            name, check, *rest = spec
            interpreter = bool(rest and rest[0])
            registry.register(op, name, lambda *a, _n=name: _n, check, description=f"the {name} kernel",
                              interpreter=interpreter)
        return op

    yield make
    registry.set_overrides(None)
    for op in made:
        registry.unregister(op)
    registry.clear_cache()


def test_first_available_backend_in_registration_order_wins(fake_op):
    op = fake_op("_test_order", ("fast", Counter("needs a GPU")), ("medium", Counter()), ("reference", registry.always))
    chosen = registry.select(op, CPU, torch.float32)
    assert chosen.name == "medium"
    assert chosen.fn() == "medium"
    assert [b.name for b in registry.backends(op)] == ["fast", "medium", "reference"]
    assert op in registry.ops()


def test_reregistering_a_name_moves_it_last(fake_op):
    op = fake_op("_test_rereg", ("a", Counter()), ("b", Counter()))
    registry.register(op, "a", lambda: "a2")
    assert [b.name for b in registry.backends(op)] == ["b", "a"]
    assert registry.select(op, CPU, torch.float32).name == "b"


def test_explain_gives_each_skipped_backend_its_reason(fake_op):
    op = fake_op("_test_explain", ("fast", Counter("needs sm90")), ("mid", Counter("head_dim must be 64 or 128")),
                 ("reference", registry.always))
    chosen, reasons = registry.explain(op, CPU, torch.bfloat16)
    assert chosen.name == "reference"
    assert reasons == [("fast", "needs sm90"), ("mid", "head_dim must be 64 or 128")]


def test_checks_are_cached_per_device_dtype_and_props(fake_op):
    check = Counter()
    op = fake_op("_test_cache", ("only", check))
    for _ in range(3):
        registry.select(op, CPU, torch.float32, head_dim=64)
    assert check.calls == [("cpu", torch.float32, (("head_dim", 64),))]
    registry.select(op, CPU, torch.float16, head_dim=64)
    registry.select(op, CPU, torch.float32, head_dim=128)
    assert len(check.calls) == 3
    registry.clear_cache()
    registry.select(op, CPU, torch.float32, head_dim=64)
    assert len(check.calls) == 4


def test_checks_see_the_props(fake_op):
    op = fake_op("_test_props", ("fast", lambda device, dtype, head_dim=0: None if head_dim == 128 else "needs 128"),
                 ("reference", registry.always))
    assert registry.select(op, CPU, torch.float32, head_dim=128).name == "fast"
    assert registry.select(op, CPU, torch.float32, head_dim=64).name == "reference"


def test_a_check_that_raises_is_a_reason_not_a_crash(fake_op):
    def broken(device, dtype, **props):
        raise RuntimeError("driver said no")

    op = fake_op("_test_broken", ("fast", broken), ("reference", registry.always))
    chosen, reasons = registry.explain(op, CPU, torch.float32)
    assert chosen.name == "reference"
    assert reasons == [("fast", "availability check failed: RuntimeError: driver said no")]


def test_automatic_fallback_is_logged_once_with_its_reason(fake_op, caplog):
    op = fake_op("_test_log", ("fast", Counter("no GPU here")), ("reference", registry.always))
    with caplog.at_level(logging.INFO, logger="nanotrain.ops"):
        registry.select(op, CPU, torch.float32)
        registry.clear_cache()
        registry.select(op, CPU, torch.float32)
    msgs = [r.getMessage() for r in caplog.records if op in r.getMessage()]
    assert msgs == [f"{op}: not using fast: no GPU here"]


def test_forced_context_manager_overrides_the_order_and_nests(fake_op):
    op = fake_op("_test_forced", ("fast", Counter()), ("slow", Counter()), ("reference", registry.always))
    assert registry.select(op, CPU, torch.float32).name == "fast"
    with registry.forced(**{op: "slow"}):
        assert registry.select(op, CPU, torch.float32).name == "slow"
        assert registry.forced_choice(op) == ("slow", "forced in code")
        with registry.forced(**{op: "reference"}):
            assert registry.select(op, CPU, torch.float32).name == "reference"
        assert registry.select(op, CPU, torch.float32).name == "slow"
    assert registry.select(op, CPU, torch.float32).name == "fast"
    assert registry.forced_choice(op) is None


def test_forced_is_per_thread(fake_op):
    op = fake_op("_test_thread", ("fast", Counter()), ("reference", registry.always))
    seen = []
    with registry.forced(**{op: "reference"}):
        t = threading.Thread(target=lambda: seen.append(registry.select(op, CPU, torch.float32).name))
        t.start()
        t.join()
        assert registry.select(op, CPU, torch.float32).name == "reference"
    assert seen == ["fast"]


def test_set_overrides_forces_process_wide(fake_op):
    op = fake_op("_test_cli", ("fast", Counter()), ("reference", registry.always))
    registry.set_overrides(f"{op}=reference")
    assert registry.select(op, CPU, torch.float32).name == "reference"
    assert registry.forced_choice(op) == ("reference", "--kernels")
    with registry.forced(**{op: "fast"}):  # code beats the CLI
        assert registry.select(op, CPU, torch.float32).name == "fast"
    registry.set_overrides({op: "fast"})
    assert registry.select(op, CPU, torch.float32).name == "fast"
    registry.set_overrides(None)
    assert registry.forced_choice(op) is None


def test_environment_variable_forces_and_the_cli_beats_it(fake_op, monkeypatch):
    op = fake_op("_test_env", ("fast", Counter()), ("mid", Counter()), ("reference", registry.always))
    monkeypatch.setenv(registry.ENV_VAR, f" {op} = reference , other_op=x")
    assert registry.select(op, CPU, torch.float32).name == "reference"
    assert registry.forced_choice(op) == ("reference", registry.ENV_VAR)
    registry.set_overrides(f"{op}=mid")
    assert registry.select(op, CPU, torch.float32).name == "mid"
    registry.set_overrides(None)
    monkeypatch.setenv(registry.ENV_VAR, f"{op}=fast")
    assert registry.select(op, CPU, torch.float32).name == "fast"


def test_parse_overrides():
    assert registry.parse_overrides("attention=triton, muon=reference,") == {"attention": "triton", "muon": "reference"}
    assert registry.parse_overrides(None) == {} and registry.parse_overrides("") == {}
    for bad in ("attention", "=triton", "attention=", "attention:triton"):
        with pytest.raises(BackendUnavailable, match="write OP=BACKEND"):
            registry.parse_overrides(bad)


def test_unknown_op_and_backend_are_errors_naming_the_choices(fake_op, monkeypatch):
    op = fake_op("_test_unknown", ("fast", Counter()), ("reference", registry.always))
    with pytest.raises(BackendUnavailable, match="unknown op '_test_nope'"):
        registry.select("_test_nope", CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="unknown op"):
        with registry.forced(_test_nope="fast"):
            pass
    with pytest.raises(BackendUnavailable, match=f"unknown backend 'cuda' for op '{op}'; choose one of: fast, ref"):
        registry.set_overrides(f"{op}=cuda")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        with registry.forced(**{op: "cuda"}):
            pass
    monkeypatch.setenv(registry.ENV_VAR, f"{op}=cuda")
    with pytest.raises(BackendUnavailable, match=f"{registry.ENV_VAR} asks for backend 'cuda' .* does not exist"):
        registry.select(op, CPU, torch.float32)


def test_forcing_an_unavailable_backend_is_an_error_not_a_fallback(fake_op, monkeypatch):
    op = fake_op("_test_unavail", ("fast", Counter("needs a CUDA GPU")), ("reference", registry.always))
    with registry.forced(**{op: "fast"}):
        with pytest.raises(BackendUnavailable) as e:
            registry.select(op, CPU, torch.float32)
    assert str(e.value) == (f"forced in code forces {op}=fast, but it cannot run here: needs a CUDA GPU. "
                            f"Remove {op}=fast from forced in code to let nanotrain choose.")
    monkeypatch.setenv(registry.ENV_VAR, f"{op}=fast")
    with pytest.raises(BackendUnavailable, match=f"{registry.ENV_VAR} forces {op}=fast, but it cannot run here"):
        registry.select(op, CPU, torch.float32)


def test_no_available_backend_is_an_error(fake_op):
    op = fake_op("_test_none", ("fast", Counter("needs a GPU")))
    with pytest.raises(BackendUnavailable, match=f"no backend of op '{op}' can run on cpu"):
        registry.select(op, CPU, torch.float32)


def test_triton_interpreter_backends_run_on_cpu_only_when_forced_under_the_interpreter(fake_op, monkeypatch):
    op = fake_op("_test_triton", ("triton", Counter(), True), ("reference", registry.always))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    chosen, reasons = registry.explain(op, CPU, torch.float32)
    assert chosen.name == "reference"
    assert reasons == [("triton", "Triton needs a CUDA GPU (on CPU only under TRITON_INTERPRET=1, for tests)")]
    with registry.forced(**{op: "triton"}):
        with pytest.raises(BackendUnavailable, match="Triton needs a CUDA GPU"):
            registry.select(op, CPU, torch.float32)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen, reasons = registry.explain(op, CPU, torch.float32)
    assert chosen.name == "reference"  # never picked automatically: the interpreter is for tests
    assert reasons == [("triton", "the Triton interpreter runs on CPU only when forced (it is for tests)")]
    with registry.forced(**{op: "triton"}):
        assert registry.select(op, CPU, torch.float32).name == "triton"
    # the rule is about CPU tensors only: on a CUDA device the backend's own check decides
    assert registry.select(op, torch.device("cuda"), torch.float32).name == "triton"


def test_report_lines(fake_op, monkeypatch):
    fast = fake_op("_test_rep_fast", ("cuda", Counter()), ("reference", registry.always))
    slow = fake_op("_test_rep_slow", ("cuda", Counter("needs sm90")), ("reference", registry.always))
    forced = fake_op("_test_rep_forced", ("cuda", Counter()), ("reference", registry.always))
    broken = fake_op("_test_rep_broken", ("cuda", Counter("no GPU")), ("reference", registry.always))
    monkeypatch.setenv(registry.ENV_VAR, f"{forced}=reference,{broken}=cuda")
    lines = registry.report(CPU, torch.float32)
    mine = [line for line in lines if "_test_rep_" in line or line.startswith("    ")]
    i = mine.index(f"✓ {fast}: cuda: the cuda kernel")
    assert mine[i + 1].startswith("✓ ")  # nothing skipped, no reasons under it
    i = mine.index(f"✓ {slow}: reference: the reference kernel")
    assert mine[i + 1] == "    not cuda: needs sm90"  # on CPU the reference is expected: no warning
    assert not mine[i + 2].startswith("    WARNING")
    on_gpu = registry.report(torch.device("cuda"), torch.bfloat16, only=[slow])
    assert on_gpu == [f"✓ {slow}: reference: the reference kernel", "    not cuda: needs sm90",
                      f"    WARNING: {slow} runs on the slow pure-PyTorch reference path"]
    i = mine.index(f"✓ {forced}: reference: the reference kernel (forced by {registry.ENV_VAR})")
    assert mine[i + 1] == "    not cuda: not chosen"
    assert f"✗ {broken}: {registry.ENV_VAR} forces {broken}=cuda, but it cannot run here: no GPU. " \
           f"Remove {broken}=cuda from {registry.ENV_VAR} to let nanotrain choose." in lines


def test_every_real_op_has_a_reference_that_runs_on_cpu():
    """The house rule: whatever else is registered, the pure-PyTorch reference comes last and runs anywhere."""
    for op in registry.ops():
        if op.startswith("_test_"):
            continue
        names = [b.name for b in registry.backends(op)]
        assert names[-1] == "reference", f"{op}: backends {names}"
        assert registry.backends(op)[-1].check(CPU, torch.float32) is None
