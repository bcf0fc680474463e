"""MuonAdamW against hand-written reference steps, the grouping of build_optimizer, the schedules, and a
short training run that must learn."""
import dataclasses
import math

import pytest
import torch

from nanotrain.model import GPTConfig, build_model
from nanotrain.ops.newton_schulz import muon_update_reference
from nanotrain.optim import (
    MuonAdamW,
    build_optimizer,
    lr_multiplier,
    muon_lr_scale,
    muon_momentum,
    weight_decay_multiplier,
)

torch.set_num_threads(1)

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def adamw_reference(p, grads, lr, betas, eps, wd):
    """Textbook AdamW (Loshchilov & Hutter) in float64, one step per gradient in `grads`."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_adamw_steps_equal_the_textbook_reference():
    p = torch.nn.Parameter(torch.randn(5, 7))
    start = p.detach().clone()
    grads = [torch.randn(5, 7) for _ in range(3)]
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = adamw_reference(start, grads, 0.01, (0.8, 0.95), 1e-8, 0.1)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"] == 3
    assert not torch.equal(p.detach(), start)


def test_muon_step_equals_muon_update_reference_on_the_stack():
    tall = [torch.nn.Parameter(torch.randn(12, 6)) for _ in range(3)]   # m > n: aspect factor sqrt(2)
    wide = [torch.nn.Parameter(torch.randn(6, 12)) for _ in range(2)]   # m < n: factor 1
    groups = [dict(kind="muon", params=tall, lr=0.02, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.2),
              dict(kind="muon", params=wide, lr=0.03, momentum=0.8, ns_steps=4, beta2=0.9, weight_decay=0.0)]
    opt = MuonAdamW(groups)
    refs = []
    for params, g in ((tall, groups[0]), (wide, groups[1])):
        m, n = params[0].shape
        refs.append(dict(params=torch.stack([p.detach() for p in params]).clone(),
                         mom=torch.zeros(len(params), m, n),
                         second=torch.zeros((len(params), m, 1) if m >= n else (len(params), 1, n)),
                         lr=g["lr"] * math.sqrt(max(1.0, m / n)), group=g))
    for _ in range(2):  # two steps: the momentum buffers carry over
        for params, ref in zip((tall, wide), refs):
            grads = [torch.randn_like(p) for p in params]
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            g = ref["group"]
            muon_update_reference(torch.stack(grads), ref["params"], ref["mom"], ref["second"], g["momentum"],
                                  ref["lr"], g["weight_decay"], g["beta2"], g["ns_steps"])
        opt.step()
        for params, ref in zip((tall, wide), refs):
            torch.testing.assert_close(torch.stack([p.detach() for p in params]), ref["params"], rtol=1e-5, atol=1e-6)
    state = opt.state[tall[0]]
    torch.testing.assert_close(state["momentum_buffer"], refs[0]["mom"])
    assert state["second_momentum"].shape == (3, 12, 1) and opt.state[wide[0]]["second_momentum"].shape == (2, 1, 12)
    assert muon_lr_scale((12, 6)) == pytest.approx(math.sqrt(2)) and muon_lr_scale((6, 12)) == 1.0


def test_optimizer_rejects_bad_groups():
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.ones(2))], lr=0.1)])
    with pytest.raises(ValueError, match="one shape"):
        mixed = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3, 2))]
        MuonAdamW([dict(kind="muon", params=mixed, lr=0.1, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.0)])


def test_build_optimizer_groups_every_parameter_once_with_nanochat_settings():
    cfg = dataclasses.replace(TINY, n_embd=128, n_head=4, n_kv_head=2)
    with torch.device("meta"):
        from nanotrain.model import GPT
        model = GPT(cfg)
    opt = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                          weight_decay=0.2)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    by_name = {g["name"]: g for g in opt.param_groups}
    scale = (128 / 768) ** -0.5
    assert by_name["lm_head"]["lr"] == pytest.approx(0.004 * scale)
    assert by_name["wte"]["lr"] == pytest.approx(0.3 * scale)
    assert by_name["value_embeds"]["lr"] == pytest.approx(0.15 * scale)
    assert by_name["resid_lambdas"]["lr"] == pytest.approx(0.005)
    assert by_name["x0_lambdas"]["lr"] == 0.5 and by_name["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert by_name["smear"]["lr"] == 0.2 and len(by_name["smear"]["params"]) == 3
    assert by_name["wte"]["betas"] == (0.8, 0.95)
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert len(shapes) == len(set(shapes))
    for g in muon:
        assert all(p.shape == g["params"][0].shape for p in g["params"])
        assert g["momentum"] == 0.95 and g["beta2"] == 0.9 and g["ns_steps"] == 5 and g["weight_decay"] == 0.2
    # (4C, C) c_fc x2, (C, 4C) mlp.c_proj x2, (C, C) c_q and attn.c_proj x4, (Hkv*D, C) c_k/c_v x4, ve_gate x1
    assert sorted((s, len(g["params"])) for s, g in zip(shapes, muon)) == sorted(
        [((512, 128), 2), ((128, 512), 2), ((128, 128), 4), ((64, 128), 4), ((2, 12), 1)])
    latest = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                             weight_decay=0.2, adam_betas=None, model_dim_lr_scale=False)
    named = {g["name"]: g for g in latest.param_groups}
    assert named["lm_head"]["betas"] == (0.8, 0.96) and named["wte"]["betas"] == (0.8, 0.995)
    assert named["wte"]["lr"] == 0.3


def test_lr_multiplier_at_hand_computed_points():
    # 100 steps, 10 warmup, 50 warmdown to 0.1
    f = lambda s: lr_multiplier(s, 100, 0.1, 0.5, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == 1.0
    assert f(10) == 1.0 and f(50) == 1.0
    assert f(75) == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)
    assert f(100) == pytest.approx(0.1)
    # the SPEC defaults: no warmup, half warmdown to 0
    assert lr_multiplier(0, 300, 0.0, 0.5, 0.0) == 1.0
    assert lr_multiplier(225, 300, 0.0, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(300, 300, 0.0, 0.0, 0.0) == 1.0


def test_muon_momentum_at_hand_computed_points():
    assert muon_momentum(0, 2000, 0.5) == pytest.approx(0.85)
    assert muon_momentum(200, 2000, 0.5) == pytest.approx(0.91)
    assert muon_momentum(400, 2000, 0.5) == pytest.approx(0.97)
    assert muon_momentum(999, 2000, 0.5) == pytest.approx(0.97)
    assert muon_momentum(1500, 2000, 0.5) == pytest.approx(0.935)      # halfway through the warmdown
    assert muon_momentum(2000, 2000, 0.5) == pytest.approx(0.90)
    assert muon_momentum(250, 300, 0.5) == pytest.approx(0.85 + 0.12 * 250 / 400)  # warm-up wins on short runs


def test_weight_decay_multiplier_is_a_cosine_to_zero():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0, abs=1e-12)


def test_short_training_run_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(TINY, "cpu")
    opt = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                          weight_decay=0.0)
    x = torch.randint(0, 256, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for step in range(30):
        lrm = lr_multiplier(step, 30, 0.0, 0.3, 0.0)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
            if g["kind"] == "muon":
                g["momentum"] = muon_momentum(step, 30, 0.3)
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.05)
    assert losses[-1] < 0.5, losses  # memorizes the batch (from ln 256 = 5.5)
    # checkpointing: the state round-trips and the next step is identical
    sd = opt.state_dict()
    clone = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0)
    clone.load_state_dict(sd)
    first = opt.param_groups[-1]["params"][0]
    torch.testing.assert_close(clone.state[first]["momentum_buffer"], opt.state[first]["momentum_buffer"])
