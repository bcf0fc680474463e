"""Sampling from a base model: a KV-cache engine and the naive full-recompute reference it must equal.

The engine runs the prompt once (prefill, batch 1), copies that cache to `num_samples` rows, then feeds
one token per step; each step costs one token's worth of compute instead of the whole sequence.
Sliding-window layers are handled by the model's decoding attention (`ops.attention_decode` masks keys
older than the window), so the cache simply keeps every position. `naive_generate` recomputes the
full sequence every step: slow, obviously right, and the reference the engine is tested against.

Sampling: temperature 0 is greedy argmax (deterministic); otherwise logits / temperature, optionally
restricted to the top_k largest (top_k None or <= 0: no restriction), sampled with a torch.Generator
seeded by `seed`, so a given seed always draws the same tokens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager

import torch
from torch import Tensor

from nanotrain.model import KVCache

# nanochat's sample prompts: facts, arithmetic and lists a base model gets right as it learns.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next tokens from last-position logits. logits: (B, V) -> (B,) int64."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # top_k <= 0 means no restriction (nanochat's rule)
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _check_length(model: torch.nn.Module, total: int) -> None:
    limit = getattr(model, "rotary_seq_len", None)
    if limit is not None and total > limit:
        raise ValueError(f"prompt + max_tokens = {total} tokens exceeds the model's {limit} positions; "
                         f"use fewer max_tokens or a shorter prompt")


@torch.no_grad()
def naive_generate(model: torch.nn.Module, tokens: Sequence[int], max_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, seed: int = 42,
                   autocast_ctx: Callable[[], ContextManager] | None = None) -> list[int]:
    """Reference sampler: re-run the whole sequence for every new token. Returns the generated tokens."""
    device = next(model.parameters()).device
    _check_length(model, len(tokens) + max_tokens)
    make_ctx = autocast_ctx or contextlib.nullcontext
    generator = _generator(device, seed)
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
    out: list[int] = []
    for _ in range(max_tokens):
        with make_ctx():
            logits = model(ids)[:, -1, :]  # (1, V)
        nxt = sample_next(logits, temperature, top_k, generator)
        out.append(int(nxt.item()))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


class Engine:
    """Batched sampling with a KV cache. `tokenizer` is optional (its BOS is the default stop token)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None,
                 autocast_ctx: Callable[[], ContextManager] | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.make_ctx = autocast_ctx or contextlib.nullcontext
        self.kv_dtype = kv_dtype  # default: the model's parameter dtype

    def _new_cache(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        cfg = self.model.config
        return KVCache(batch_size=batch, num_heads=cfg.n_kv_head, seq_len=length, head_dim=cfg.head_dim,
                       num_layers=cfg.n_layer, device=device, dtype=dtype)

    @torch.no_grad()
    def generate(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42) -> Iterator[list[int]]:
        """Yield, per step, the next token of each of the num_samples rows (a list of num_samples ids).

        All rows continue from the same prompt; with temperature > 0 they differ through the sampling.
        Runs exactly max_tokens steps (stopping on an end token is generate_batch's job).
        """
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the BOS token)")
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"need num_samples >= 1 and max_tokens >= 0, got {num_samples}, {max_tokens}")
        if max_tokens == 0:
            return
        param = next(self.model.parameters())
        device, dtype = param.device, self.kv_dtype or param.dtype
        total = len(tokens) + max_tokens
        _check_length(self.model, total)
        generator = _generator(device, seed)
        prompt = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
        # Prefill once with batch 1; the last step's token needs no cache slot (it is never fed back).
        cache = self._new_cache(1, total - 1, device, dtype)
        with self.make_ctx():
            logits = self.model(prompt, kv_cache=cache)[:, -1, :]  # (1, V)
        if num_samples > 1:
            rows = self._new_cache(num_samples, total - 1, device, dtype)
            rows.prefill(cache)
            cache = rows
            logits = logits.expand(num_samples, -1)
        for step in range(max_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # (N,)
            yield nxt.tolist()
            if step + 1 == max_tokens:
                break
            with self.make_ctx():
                logits = self.model(nxt.view(-1, 1), kv_cache=cache)[:, -1, :]  # (N, V)

    def generate_batch(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                       stop_tokens: Sequence[int] | None = None) -> list[list[int]]:
        """The completions (prompt excluded) of num_samples rows, each cut before its first stop token.

        stop_tokens default: the tokenizer's BOS (a base model emits it where a new document starts).
        """
        if stop_tokens is None:
            stop_tokens = [self.tokenizer.bos_token_id] if self.tokenizer is not None else []
        stops = set(stop_tokens)
        out: list[list[int]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, t in enumerate(column):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    out[i].append(t)
            if all(done):
                break
        return out


def sample_text(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str] | None = None, max_tokens: int = 16,
                temperature: float = 0.0, top_k: int | None = None, seed: int = 42,
                autocast_ctx: Callable[[], ContextManager] | None = None) -> list[str]:
    """Prompt + completion text for each prompt (greedy by default): the trainer's periodic samples."""
    engine = Engine(model, tokenizer, autocast_ctx=autocast_ctx)
    texts = []
    for prompt in SAMPLE_PROMPTS if prompts is None else prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        completion = engine.generate_batch(ids, 1, max_tokens, temperature, top_k, seed)[0]
        texts.append(tokenizer.decode(ids[1:] + completion))
    return texts
