"""Bits per byte against a sum done by hand, token by token."""
from __future__ import annotations

import math

import pytest
import torch

from nanotrain.eval.bpb import evaluate_bpb
from tests.eval.eval_standins import BigramLM

V = 40


def hand_bpb(table: torch.Tensor, batches, token_bytes: list[int]) -> float:
    """Per target: nats = logsumexp(table[x]) - table[x][y], counted when y is not ignored (-1) and
    stands for bytes; bits per byte = sum(nats) / (ln 2 * sum(bytes))."""
    rows = table.double().tolist()
    nats = 0.0
    nbytes = 0
    for inputs, targets in batches:
        for x, y in zip(inputs.flatten().tolist(), targets.flatten().tolist()):
            if y < 0 or token_bytes[y] == 0:
                continue
            row = rows[x]
            m = max(row)
            nats += m + math.log(sum(math.exp(v - m) for v in row)) - row[y]
            nbytes += token_bytes[y]
    return nats / (math.log(2) * nbytes)


def make_batches(n: int, B: int = 3, T: int = 11) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (B, T + 1))
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        targets[torch.rand(B, T) < 0.2] = -1  # ignored positions
        out.append((inputs, targets))
    return out


def test_bpb_matches_hand_computation():
    table = torch.randn(V, V) * 2
    token_bytes = torch.randint(1, 5, (V,), dtype=torch.int32)
    token_bytes[[0, 7]] = 0  # special tokens: no bytes, never counted
    batches = make_batches(4)
    for inputs, targets in batches:  # make sure special targets occur
        targets[0, :2] = torch.tensor([0, 7])
    got = evaluate_bpb(BigramLM(table), batches, steps=3, token_bytes=token_bytes)
    want = hand_bpb(table, batches[:3], token_bytes.tolist())
    assert got == pytest.approx(want, rel=1e-6)
    # a different number of steps sees a different slice; more steps than batches stops at the end
    assert evaluate_bpb(BigramLM(table), batches, 10, token_bytes) == pytest.approx(
        hand_bpb(table, batches, token_bytes.tolist()), rel=1e-6)


def test_bpb_is_mean_loss_over_ln2_when_every_token_is_one_byte():
    table = torch.randn(V, V)
    model = BigramLM(table)
    inputs = torch.randint(0, V, (2, 9))
    targets = torch.randint(0, V, (2, 9))
    got = evaluate_bpb(model, iter([(inputs, targets)]), 1, torch.ones(V, dtype=torch.int32))
    assert got == pytest.approx(model(inputs, targets).item() / math.log(2), rel=1e-6)


def test_bpb_ignores_nan_loss_at_ignored_positions_and_runs_under_the_context():
    class NanAtIgnored(BigramLM):
        def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
            loss = super().forward(idx, targets, loss_reduction="none")
            return torch.where(targets < 0, torch.nan, loss)

    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    table = torch.randn(V, V)
    batches = make_batches(2)
    tb = torch.ones(V, dtype=torch.int32)
    got = evaluate_bpb(NanAtIgnored(table), batches, 2, tb, autocast_ctx=Ctx)
    assert math.isfinite(got) and got == pytest.approx(hand_bpb(table, batches, tb.tolist()), rel=1e-6)
    assert entered == [False, False]  # one context per forward, gradients off


def test_bpb_with_no_bytes_is_inf():
    batches = [(torch.randint(0, V, (1, 4)), torch.full((1, 4), -1))]
    assert evaluate_bpb(BigramLM(torch.randn(V, V)), batches, 1, torch.ones(V, dtype=torch.int32)) == float("inf")
