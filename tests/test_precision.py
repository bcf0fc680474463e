"""The precision policy per device (nanotrain/precision.py): autocast dtype, the fp16 gradient scaler's
skip-count-lower logic, its checkpointed state, and the MPS probe."""
import contextlib

import pytest
import torch

from nanotrain import precision as P


def _fp16(init_scale: float = 1024.0) -> P.Precision:
    return P.Precision(torch.device("cpu"), torch.float16, torch.amp.GradScaler("cpu", init_scale=init_scale),
                       reason="test")


def test_cpu_trains_in_float32_without_autocast():
    p = P.choose(torch.device("cpu"))
    assert p.dtype is None and p.scaler is None and p.name == "float32"
    assert isinstance(p.autocast(), contextlib.nullcontext)
    assert "Precision: float32" in p.describe()


@pytest.mark.parametrize("capability, dtype, scaled", [((9, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                                                       ((7, 5), torch.float16, True), ((7, 0), torch.float16, True)])
def test_cuda_bf16_from_ampere_and_fp16_with_a_scaler_before(monkeypatch, capability, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = P.choose(torch.device("cuda"))
    assert p.dtype == dtype and (p.scaler is not None) == scaled
    assert ("gradient scaler" in p.describe()) == scaled and f"{capability[0]}.{capability[1]}" in p.describe()


def test_mps_uses_bf16_only_where_the_probe_says_torch_supports_it():
    mps = torch.device("mps")
    yes, no = P.choose(mps, mps_probe=lambda: True), P.choose(mps, mps_probe=lambda: False)
    assert yes.dtype == torch.bfloat16 and yes.scaler is None and "bf16 autocast" in yes.describe()
    assert no.dtype is None and "float32" in no.describe() and "no bf16 autocast on MPS" in no.describe()


def _param_and_optimizer():
    w = torch.nn.Parameter(torch.ones(4))
    return w, torch.optim.SGD([w], lr=0.5)


def test_scaler_skips_an_overflowing_step_counts_it_and_lowers_the_scale():
    p = _fp16(init_scale=1024.0)
    w, opt = _param_and_optimizer()
    p.backward((w * torch.tensor([1.0, float("inf"), 0.0, 0.0])).sum())  # an overflowing gradient
    assert p.step(opt) is False
    assert torch.equal(w.detach(), torch.ones(4)), "a skipped step must leave the weights alone"
    assert p.skipped_steps == 1 and p.scaler.get_scale() == 512.0
    # a finite (scaled) gradient is unscaled and applied
    opt.zero_grad()
    p.backward((w * torch.tensor([2.0, 0.0, 0.0, 0.0])).sum())
    assert w.grad[0] == 2.0 * 512.0
    assert p.step(opt) is True
    assert w[0].item() == pytest.approx(1.0 - 0.5 * 2.0) and p.skipped_steps == 1


def test_scaler_state_round_trips_so_a_resume_continues_the_scale():
    p = _fp16(init_scale=1024.0)
    w, opt = _param_and_optimizer()
    p.backward((w * float("nan")).sum())
    p.step(opt)
    state = p.state_dict()
    assert state["skipped_steps"] == 1 and state["scaler"]["scale"] == 512.0
    q = _fp16(init_scale=1024.0)
    q.load_state_dict(state)
    assert q.skipped_steps == 1 and q.scaler.get_scale() == 512.0
    fresh = _fp16()
    fresh.load_state_dict(None)  # an older checkpoint, or one from a device without a scaler
    assert fresh.skipped_steps == 0 and fresh.scaler.get_scale() == 1024.0


def test_without_a_scaler_step_always_applies():
    p = P.choose(torch.device("cpu"))
    w, opt = _param_and_optimizer()
    w.grad = torch.ones(4)
    assert p.step(opt) is True and w[0].item() == 0.5 and p.state_dict() == {"skipped_steps": 0}


def test_fp16_autocast_runs_on_cpu():
    # the end-to-end fp16 + scaler training test (tests/test_train_robust.py) relies on this
    with _fp16().autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.float16


@pytest.mark.gpu
def test_the_gpu_gets_bf16_from_ampere_and_a_working_fp16_scaler_before():
    device = torch.device("cuda")
    p = P.choose(device)
    major, _ = torch.cuda.get_device_capability(device)
    assert p.dtype == (torch.bfloat16 if major >= 8 else torch.float16) and (p.scaler is not None) == (major < 8)
    layer = torch.nn.Linear(64, 64, device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    with p.autocast():
        loss = layer(torch.randn(8, 64, device=device)).float().square().mean()
    p.backward(loss)
    assert p.step(opt) and not torch.equal(layer.weight, before) and p.skipped_steps == 0
