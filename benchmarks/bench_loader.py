"""CPU benchmark of the data loader: packed tokens per second at T=2048, tokenization included.

    python -m pytest benchmarks/bench_loader.py

The corpus is the offline sample (`nanotrain-data sample`, 6 MB of installed documentation) with a
tokenizer trained on it (vocab 32768 by default), both made once in a temporary directory. The
loader runs in its steady state: after the first batch (which fills the buffer and is timed apart),
each round draws NUM_BATCHES batches of B x 2048, and every document consumed is replaced by one
read from parquet and tokenized inside the timed region. The figure is tokens/s of packed rows
(B * T per batch), reported per packing backend. Set NANOTRAIN_BENCH_VOCAB to change the vocabulary.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from nanotrain.data import shards as S  # noqa: E402
from nanotrain.data.loader import DataLoader  # noqa: E402
from nanotrain.data.sample import make_sample  # noqa: E402
from nanotrain.data.tokenizer import train_tokenizer  # noqa: E402
from nanotrain.ops import registry  # noqa: E402

B, T = 8, 2048
NUM_BATCHES = 20
VOCAB = int(os.environ.get("NANOTRAIN_BENCH_VOCAB", "32768"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_loader")
    docs, _ = make_sample(6_000_000, log=lambda m: None)
    S.write_shards(docs, base, 2000, {"source": "sample"})
    tok = train_tokenizer(S.iter_documents("train", base, doc_cap=10_000), VOCAB)
    return base, tok


@pytest.mark.parametrize("backend", [b.name for b in registry.backends("packing")])
def test_loader_tokens_per_second(benchmark, corpus, backend):
    base, tok = corpus
    torch.set_num_threads(1)
    with registry.forced(packing=backend):
        loader = DataLoader(tok, B, T, base_dir=base, tokenizer_threads=os.cpu_count() or 1)
        t0 = time.perf_counter()
        next(loader)  # the first batch fills the buffer (buffer_size documents): timed apart
        first = time.perf_counter() - t0

        def run():
            for _ in range(NUM_BATCHES):
                next(loader)

        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    tokens = B * T * NUM_BATCHES
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        tokens_per_s=round(tokens / median), first_batch_s=round(first, 3),
        cropped_fraction=round(loader.cropped_fraction, 4), backend=backend, B=B, T=T, vocab=tok.vocab_size)
    common.record(common.Row(
        bench="loader", case=f"B={B}, T={T}, vocab {tok.vocab_size}, sample corpus, tokenization included",
        provider=f"packing={backend}", time_ms=median / NUM_BATCHES * 1e3, rate=tokens / median / 1e6,
        unit="Mtok/s", note=f"{os.cpu_count()} CPUs; cropped {loader.cropped_fraction:.1%}; first batch {first:.2f}s"))
    print(f"\n{backend}: {tokens / median:,.0f} packed tokens/s (median of 5 rounds of {NUM_BATCHES} batches, "
          f"B={B}, T={T}, vocab {tok.vocab_size}, cropped {loader.cropped_fraction:.1%}); "
          f"first batch (buffer fill) {first:.2f}s")
    assert loader.tokens_consumed >= tokens
