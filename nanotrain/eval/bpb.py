"""Validation bits per byte: a loss that does not depend on the tokenizer's vocabulary.

Cross-entropy in nats per token rewards a tokenizer with longer tokens, so val loss cannot compare
models with different vocabularies. Dividing the summed nats by the number of UTF-8 bytes those
tokens stand for (and by ln 2) gives bits per byte, which can. Special tokens (BOS, ...) stand for
no bytes and ignored targets (-1) for nothing, so both are left out of the numerator and the
denominator alike.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import ContextManager

import torch
from torch import Tensor

from nanotrain import distributed


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]], steps: int, token_bytes: Tensor,
                 autocast_ctx: Callable[[], ContextManager] | None = None) -> float:
    """Bits per byte of `model` over the first `steps` (inputs, targets) pairs of `batches`.

    inputs, targets: (B, T) int64, targets = -1 where ignored; token_bytes: (V,) int, the UTF-8 length of
    each token (0 for special tokens). Sums are all-reduced across ranks when torch.distributed is
    initialized, so every rank returns the same global value; when the pass fails on one rank (an error while
    reading `batches` or in a forward) it raises on every rank (distributed.PeerFailed on the others) instead of
    leaving them waiting. Returns inf when no byte was seen.

    autocast_ctx: a factory of the context every forward runs under (bf16 autocast, and FP8 turned off:
    the trainer passes e.g. `lambda: stack(autocast, nanotrain.ops.fp8.disable_fp8(model))`, since FP8's
    dynamic scaling is a training-time approximation that evaluation must not measure).
    """
    make_ctx = autocast_ctx or contextlib.nullcontext
    device = token_bytes.device

    def local_sums() -> tuple[Tensor, Tensor]:  # this rank's (nats, bytes); anything here may fail on one rank
        acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        total_nats = torch.zeros((), dtype=acc_dtype, device=device)
        total_bytes = torch.zeros((), dtype=torch.int64, device=device)
        batch_iter = iter(batches)
        for _ in range(steps):
            try:
                inputs, targets = next(batch_iter)
            except StopIteration:
                break
            with make_ctx():
                loss = model(inputs, targets, loss_reduction="none")  # (B, T) nats per token
            loss = loss.reshape(targets.shape).to(device=device, dtype=acc_dtype)
            targets = targets.to(device)
            valid = targets >= 0
            nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)  # (B, T)
            counted = nbytes > 0
            # where() rather than a product: an ignored position's loss may be anything (even NaN).
            total_nats += torch.where(counted, loss, 0.0).sum()
            total_bytes += nbytes.sum()
        return total_nats, total_bytes

    # one collective that every rank reaches, also when its local part failed (then every rank raises)
    nats, nbytes_total = distributed.sum_over_ranks(local_sums, 2, device).tolist()
    if nbytes_total == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes_total)
