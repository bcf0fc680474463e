"""Helpers for the conversion tests: a small nanotrain model trained a few steps, saved as a checkpoint."""
from __future__ import annotations

import dataclasses

import torch

from nanotrain import paths
from nanotrain.checkpoint import save_checkpoint
from nanotrain.model import GPT, GPTConfig


def train_tiny(cfg: GPTConfig, tok, steps: int = 6, seed: int = 0) -> GPT:
    """A GPT of shape cfg after `steps` AdamW steps on the tokenizer's own training text (random batches)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    text = " ".join(f"The {w} cat writes {i} letters to the river." for i, w in enumerate(["red", "old"] * 40))
    ids = torch.tensor(tok.encode(text, prepend=tok.bos_token_id))
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (4,))
        x = torch.stack([ids[s:s + 64] for s in starts])
        y = torch.stack([ids[s + 1:s + 65] for s in starts])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():  # six small steps barely move the scalars from their inits (smear_lambda starts at 0):
        model.smear_lambda.fill_(0.7)  # make the smear and backout paths weigh in every logit the tests compare
        model.backout_lambda.fill_(0.35)
    model.eval()
    return model


def save_tiny(base, tag: str, model: GPT, tok, step: int = 6) -> None:
    meta = {"model_config": dataclasses.asdict(model.config),
            "train_config": {"depth": model.config.n_layer, "max_seq_len": model.config.sequence_len,
                             "window_pattern": model.config.window_pattern, "device_batch_size": 4,
                             "matrix_lr": 0.02, "embedding_lr": 0.3},
            "plan": {"total_batch_size": 1024}, "loop_state": {"step": step}, "val_bpb": 2.5,
            "tokenizer_fingerprint": tok.fingerprint, "data_fingerprint": None}
    save_checkpoint(paths.checkpoint_dir(tag, base), step, model.state_dict(), None, meta)


# sequence_len 256: nanotrain's short window looks back 128 tokens, and so does nanochat's (256/4 -> 128), so the
# model crosses to nanochat exactly; n_layer 3 with "SSL" gives two short layers, value embeddings on layers 0 and
# 2, and backout at layer 1.
TINY = dict(sequence_len=256, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSL")
