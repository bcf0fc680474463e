"""The KV-cache engine against the naive full-recompute generate, on a tiny GPT with short windows."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nanotrain.eval.engine import Engine, naive_generate, sample_next, sample_text
from nanotrain.model import GPT, GPTConfig
from tests.eval.eval_standins import ByteTokenizer

CFG = GPTConfig(sequence_len=16, vocab_size=257, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")


def tiny_gpt(config: GPTConfig = CFG, seed: int = 0) -> GPT:
    """A random GPT whose every block matters: init_weights zeroes the output projections and makes the
    head tiny, so all matrices are redrawn with a larger spread (sharp, position-dependent logits)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
        model.smear_lambda.fill_(0.5)
    return model.eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [1, 5, 9, 12, 21]  # windows (9 keys) shorter than most prompts
    return [[256] + torch.randint(0, 256, (n - 1,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt()


def test_window_is_shorter_than_the_prompts(model):
    assert model.window_sizes[:2] == [9, 9] and model.window_sizes[-1] is None
    assert sum(len(p) > 9 for p in prompts()) >= 2


@pytest.mark.parametrize("i", range(5))
def test_greedy_engine_equals_naive(model, i):
    prompt = prompts()[i]
    want = naive_generate(model, prompt, max_tokens=14, temperature=0.0)
    got = Engine(model).generate_batch(prompt, num_samples=1, max_tokens=14, temperature=0.0, stop_tokens=[])
    assert got == [want]
    # several rows decode in one batch, each the same greedy continuation
    rows = Engine(model).generate_batch(prompt, num_samples=3, max_tokens=14, temperature=0.0, stop_tokens=[])
    assert rows == [want] * 3


def test_windows_change_the_generation(model):
    """The same weights with full attention everywhere generate differently: the windows are in play."""
    full = tiny_gpt(dataclasses.replace(CFG, window_pattern="L"))
    full.load_state_dict(model.state_dict())
    differ = [naive_generate(model, p, 14, 0.0) != naive_generate(full, p, 14, 0.0) for p in prompts()]
    assert any(differ)


def test_engine_logits_match_full_forward(model):
    """Position by position, decoding with the cache gives the logits of one full forward."""
    from nanotrain.model import KVCache

    seq = prompts()[4] + prompts()[3]  # 33 tokens: beyond sequence_len and far beyond the window
    ids = torch.tensor([seq])
    full = model(ids)[0]  # (T, V)
    cache = KVCache(1, CFG.n_kv_head, len(seq), CFG.head_dim, CFG.n_layer, "cpu", torch.float32)
    step = [model(ids[:, :5], kv_cache=cache)[0]]
    for t in range(5, len(seq)):
        step.append(model(ids[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(step), full, rtol=1e-4, atol=1e-4)


def test_sampling_is_deterministic_per_seed(model):
    prompt = prompts()[3]
    engine = Engine(model)
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=3, stop_tokens=[])
    b = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=3, stop_tokens=[])
    c = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=50, seed=4, stop_tokens=[])
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1  # rows sample independently
    # one row: the engine draws the same random numbers as the naive reference
    one = engine.generate_batch(prompt, 1, 12, temperature=0.8, top_k=20, seed=11, stop_tokens=[])
    assert one == [naive_generate(model, prompt, 12, temperature=0.8, top_k=20, seed=11)]
    # top_k=1 is greedy whatever the temperature
    assert engine.generate_batch(prompt, 2, 12, temperature=1.5, top_k=1, seed=5, stop_tokens=[]) == \
        [naive_generate(model, prompt, 12, temperature=0.0)] * 2


def test_sample_next_top_k_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, g)) for _ in range(200)}
    assert draws == {1, 2}  # only the two largest survive top-2, and both get drawn
    assert int(sample_next(logits, 0.0, None, None)) == 1
    with pytest.raises(ValueError):
        sample_next(logits, -1.0, None, None)


def test_stop_token_and_sample_text(model):
    prompt = prompts()[2]
    greedy = naive_generate(model, prompt, 14, 0.0)
    stop = greedy[5]
    first = greedy.index(stop)
    assert Engine(model).generate_batch(prompt, 1, 14, 0.0, stop_tokens=[stop]) == [greedy[:first]]
    tok = ByteTokenizer()
    texts = sample_text(model, tok, prompts=["The capital of France is", "ab"], max_tokens=6)
    for text, p in zip(texts, ["The capital of France is", "ab"]):
        ids = tok.encode(p, prepend=256)
        completion = [t for t in naive_generate(model, ids, 6, 0.0)]
        completion = completion[:completion.index(256)] if 256 in completion else completion
        assert text == tok.decode(ids[1:] + completion)


def test_top_k_zero_or_negative_means_no_restriction():
    """top_k=0 (and below) switches top-k off, as in nanochat: the same draws as top_k=None, not a crash."""
    logits = torch.randn(3, 11)
    for k in (0, -1):
        a = [sample_next(logits, 0.9, k, torch.Generator().manual_seed(s)).tolist() for s in range(20)]
        b = [sample_next(logits, 0.9, None, torch.Generator().manual_seed(s)).tolist() for s in range(20)]
        assert a == b
