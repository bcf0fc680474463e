"""The GPT: construction, shapes, windows, FLOPs, GQA, losses, KV-cache decoding, determinism, gradients."""
import dataclasses
import json
import math

import pytest
import torch

from nanotrain.model import GPT, GPTConfig, KVCache, build_model, compute_window_sizes

torch.set_num_threads(1)

TINY = GPTConfig(sequence_len=32, vocab_size=250, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, window_pattern="SL")


def tiny(**overrides) -> GPT:
    return build_model(dataclasses.replace(TINY, **overrides), "cpu")


def test_meta_construction_then_init_gives_real_finite_tensors():
    with torch.device("meta"):
        model = GPT(TINY)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    # the explicit init values nanochat uses
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.05)
    bound = (3 / TINY.n_embd) ** 0.5
    assert model.transformer.h[0].attn.c_q.weight.abs().max() <= bound
    assert model.transformer.h[0].mlp.c_fc.weight.abs().max() <= 0.4 * bound
    # rotary tables: 10x the context, position p rotates channel 0 by angle p
    assert model.cos.shape == (1, 320, 1, TINY.head_dim // 2)
    assert torch.allclose(model.cos[0, :, 0, 0], torch.cos(torch.arange(320.0)), atol=1e-4)
    # the config round-trips through JSON (checkpoints store it)
    assert GPTConfig(**json.loads(json.dumps(dataclasses.asdict(TINY)))) == TINY


def test_logits_shape_and_padded_vocab_sliced_off():
    model = tiny()
    assert model.padded_vocab_size == 256 and model.lm_head.weight.shape == (256, 64)
    assert model.transformer.wte.weight.shape == (256, 64)
    idx = torch.randint(0, 250, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 250) and logits.dtype == torch.float32
    # padded rows never get probability: make them huge, the output must not change
    with torch.no_grad():
        model.lm_head.weight[250:] = 100.0
    assert torch.equal(model(idx), logits)
    assert logits.abs().max() <= 15.0  # softcap


def test_loss_at_init_is_ln_vocab_and_reductions():
    model = tiny()
    idx = torch.randint(0, 250, (2, 32))
    targets = torch.randint(0, 250, (2, 32))
    loss = model(idx, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(250), abs=0.02)
    targets[0, :5] = -1
    per_pos = model(idx, targets, loss_reduction="none")
    assert per_pos.shape == (2, 32)
    assert (per_pos[0, :5] == 0).all() and (per_pos[0, 5:] > 0).all()
    mean = model(idx, targets)
    assert mean.item() == pytest.approx(per_pos.sum().item() / (64 - 5), rel=1e-5)
    # equals a hand cross-entropy on the returned logits
    logits = model(idx)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 250), targets.view(-1), ignore_index=-1)
    assert mean.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("pattern,n_layer,expected", [
    ("SSSL", 6, [17, 17, 17, None, 17, None]),
    ("L", 3, [None, None, None]),
    ("SL", 4, [17, None, 17, None]),
    ("S", 3, [17, 17, None]),          # the last layer is always full context
    ("ssl", 3, [17, 17, None]),        # case-insensitive
])
def test_window_sizes_from_pattern(pattern, n_layer, expected):
    cfg = dataclasses.replace(TINY, window_pattern=pattern, n_layer=n_layer)
    assert compute_window_sizes(cfg) == expected  # S = sequence_len // 2 look-back + the query itself
    with torch.device("meta"):
        assert GPT(cfg).window_sizes == expected


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)


def test_estimate_flops_and_scaling_params_against_hand_count():
    cfg = dataclasses.replace(TINY, window_pattern="SL", n_layer=2, n_kv_head=2)  # windows [17, None]
    with torch.device("meta"):
        model = GPT(cfg)
    C, V, L, H, Hkv, D, T = 64, 256, 2, 4, 2, 16, 32
    attn = C * H * D + 2 * C * Hkv * D + C * C
    mlp = 2 * 4 * C * C
    ve_gates = 12 * Hkv * 1          # value embedding (and its gate) on layer 1 only (alternating, last included)
    counts = model.num_scaling_params()
    assert counts == {
        "wte": V * C, "value_embeds": V * Hkv * D, "lm_head": V * C,
        "transformer_matrices": L * (attn + mlp) + ve_gates, "scalars": 2 * L + 24 + 1 + 1,
        "total": V * C + V * Hkv * D + V * C + L * (attn + mlp) + ve_gates + 2 * L + 26,
    }
    matmul = L * (attn + mlp) + ve_gates + V * C
    attention_flops = 12 * H * D * 16 + 12 * H * D * T     # sliding layer looks back T//2 = 16 tokens
    assert model.estimate_flops() == 6 * matmul + attention_flops


def test_gqa_runs_and_matches_an_equivalent_full_head_model():
    torch.manual_seed(0)
    gqa = tiny(n_kv_head=2)
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (32, 64)
    # give the projections nonzero weights so attention matters
    with torch.no_grad():
        for block in gqa.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
    mha = tiny(n_kv_head=4)
    state = {k: v.clone() for k, v in gqa.state_dict().items()}
    # expand each kv head to the 2 query heads it serves (head h reads kv head h // 2)
    for key in list(state):
        if key.endswith(("attn.c_k.weight", "attn.c_v.weight")):
            state[key] = state[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
        elif key.startswith("value_embeds."):
            state[key] = state[key].view(256, 2, 16).repeat_interleave(2, dim=1).reshape(256, 64)
        elif key.endswith("ve_gate.weight"):
            state[key] = state[key].repeat_interleave(2, dim=0)
    mha.load_state_dict(state)
    idx = torch.randint(0, 250, (2, 20))
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


def _randomize(model: GPT, scale: float = 0.3) -> None:
    """Every parameter random (the zero-initialized projections and gates included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decode_equals_full_recompute(n_kv_head):
    torch.manual_seed(0)
    model = tiny(n_kv_head=n_kv_head, sequence_len=16, n_layer=3, window_pattern="SSL")  # windows [9, 9, None]
    _randomize(model)
    model.eval()
    tokens = torch.randint(0, 250, (1, 20))
    prompt_len = 12                                              # longer than the sliding window
    full = model(tokens)                                         # (1, 20, V)
    cache = KVCache(1, n_kv_head, 24, 16, 3, "cpu", torch.float32)
    out = [model(tokens[:, :prompt_len], kv_cache=cache)]
    assert cache.get_pos() == prompt_len and cache.cache_seqlens.tolist() == [prompt_len]
    for t in range(prompt_len, 20):
        out.append(model(tokens[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-4, atol=1e-4)
    # chunked continuation (several tokens after a prefill) also matches
    cache.reset()
    chunks = [model(tokens[:, :7], kv_cache=cache), model(tokens[:, 7:15], kv_cache=cache),
              model(tokens[:, 15:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_prefill_once_then_expand_to_a_batch():
    torch.manual_seed(0)
    model = tiny(sequence_len=16, n_layer=3, window_pattern="SSL")
    _randomize(model)
    model.eval()
    prompt = torch.randint(0, 250, (1, 11))
    one = model.new_kv_cache(1, 11)
    last = model(prompt, kv_cache=one)[:, -1]
    batch = model.new_kv_cache(3, 16)
    batch.prefill(one)
    assert batch.get_pos() == 11 and batch.prev_embedding.shape == (3, 1, 64)
    nxt = torch.tensor([[5], [77], [200]])
    step = model(nxt, kv_cache=batch)[:, 0]                      # (3, V)
    for b in range(3):
        full = model(torch.cat([prompt, nxt[b:b + 1]], dim=1))
        torch.testing.assert_close(step[b], full[0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full[0, -2], last[0], rtol=1e-4, atol=1e-4)
    # greedy generate (KV-cached) equals greedy argmax over full recomputes
    gen = list(model.generate(prompt[0].tolist(), max_tokens=4, temperature=0.0))
    ids = prompt
    for _ in range(4):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert gen == ids[0, 11:].tolist()


def test_init_is_deterministic_given_the_seed():
    torch.manual_seed(7)
    a = tiny()
    torch.manual_seed(7)
    b = tiny()
    torch.manual_seed(8)
    c = tiny()
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_gradients_reach_every_parameter():
    model = tiny(n_layer=3, window_pattern="SSL")
    _randomize(model, scale=0.2)
    idx = torch.randint(0, 250, (2, 32))
    model(idx, torch.randint(0, 250, (2, 32))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.startswith(("transformer.wte", "value_embeds", "lm_head")):
            continue  # lookup tables and the padded head: only used rows get gradient
        assert p.grad.abs().sum() > 0, name
    used = idx.unique()
    assert (model.transformer.wte.weight.grad[used].abs().sum(-1) > 0).all()
    assert (model.lm_head.weight.grad[:250].abs().sum(-1) > 0).all()
    assert (model.lm_head.weight.grad[250:] == 0).all()   # padding rows are sliced away
