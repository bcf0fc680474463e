"""CPU benchmark of the data loader: packed tokens per second at T=2048, tokenization included.

    python benchmarks/bench_loader.py [--quick]       (rows to the results file, table to stdout)
    python -m pytest benchmarks/bench_loader.py       (pytest-benchmark, one row per packing backend)

The corpus is the offline sample (`nanotrain-data sample`, 6 MB of installed documentation) with a
tokenizer trained on it (vocab 32768 by default), both made once in a temporary directory. The
loader runs in its steady state: after the first batch (which fills the buffer and is timed apart),
each round draws NUM_BATCHES batches of B x 2048, and every document consumed is replaced by one
read from parquet and tokenized inside the timed region. The figure is tokens/s of packed rows
(B * T per batch), reported per packing backend. Set NANOTRAIN_BENCH_VOCAB to change the vocabulary.
--quick: 150 kB of generated text (no sample collection), vocab 512, B = 2 and 3 batches a round: a
smoke-sized run for tests and dry runs, whose rate means little.
"""
from __future__ import annotations

import os
import sys
import tempfile
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


def generated_docs(num_bytes: int, seed: int = 0) -> list[str]:
    """Documents of random words from a fixed word list (log-normal lengths), about num_bytes in all."""
    import random

    rng = random.Random(seed)
    words = [w for w in __doc__.lower().replace(",", " ").replace(".", " ").split() if w.isalpha()]
    docs, size = [], 0
    while size < num_bytes:
        doc = " ".join(rng.choice(words) for _ in range(max(5, int(rng.lognormvariate(5, 1)))))
        docs.append(doc)
        size += len(doc)
    return docs


def make_corpus(base, quick: bool = False):
    """Shards under `base` and a tokenizer trained on them: the offline sample (6 MB, vocab VOCAB), or with
    quick 150 kB of generated text and vocab 512."""
    if quick:
        docs, vocab, per_shard = generated_docs(150_000), 512, 100
    else:
        docs, vocab, per_shard = make_sample(6_000_000, log=lambda m: None)[0], VOCAB, 2000
    S.write_shards(docs, base, per_shard, {"source": "generated" if quick else "sample"})
    return train_tokenizer(S.iter_documents("train", base, doc_cap=10_000), vocab)


def measure(base, tok, backend: str, batch: int = B, num_batches: int = NUM_BATCHES, rounds: int = 5,
            timer=None) -> common.Row:
    """The loader's steady-state packed tokens/s with packing backend `backend` (timer: pytest-benchmark's)."""
    torch.set_num_threads(1)
    with registry.forced(packing=backend):
        loader = DataLoader(tok, batch, T, base_dir=base, tokenizer_threads=os.cpu_count() or 1)
        t0 = time.perf_counter()
        next(loader)  # the first batch fills the buffer (buffer_size documents): timed apart
        first = time.perf_counter() - t0

        def run():
            for _ in range(num_batches):
                next(loader)

        median = timer(run) if timer else common.cpu_time_s(run, warmup=1, repeats=rounds)
    tokens = batch * T * num_batches
    assert loader.tokens_consumed >= tokens
    return common.Row("loader", "next batch, tokenization included", f"packing={backend}",
                      f"B={batch}, T={T}, vocab {tok.vocab_size}", ms=median / num_batches * 1e3,
                      rate=tokens / median / 1e6, unit="Mtok/s",
                      note=f"{os.cpu_count()} CPUs; cropped {loader.cropped_fraction:.1%}; first batch {first:.2f}s")


def collect(quick: bool = False) -> list[common.Row]:
    """One row per packing backend that can run here (the others as skipped rows)."""
    rows = []
    batch, num_batches, rounds = (2, 3, 2) if quick else (B, NUM_BATCHES, 5)
    with tempfile.TemporaryDirectory() as base:
        tok = make_corpus(base, quick)
        for backend in [b.name for b in registry.backends("packing")]:
            try:
                row = measure(base, tok, backend, batch, num_batches, rounds)
            except registry.BackendUnavailable as e:
                row = common.Row("loader", "next batch, tokenization included", f"packing={backend}",
                                 f"B={batch}, T={T}", status="skipped", note=str(e))
            if quick:
                row.note = "quick (generated text); " + row.note
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_loader")
    return base, make_corpus(base)


@pytest.mark.parametrize("backend", [b.name for b in registry.backends("packing")])
def test_loader_tokens_per_second(benchmark, corpus, backend):
    base, tok = corpus

    def timer(run):
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
        return benchmark.stats.stats.median

    try:
        row = common.record(measure(base, tok, backend, timer=timer))
    except registry.BackendUnavailable as e:
        pytest.skip(str(e))
    benchmark.extra_info.update(tokens_per_s=round(row.rate * 1e6), backend=backend, B=B, T=T, vocab=tok.vocab_size)
    print(f"\n{common.table([row])}")


def main(argv: list[str] | None = None) -> int:
    return common.main("loader", collect, argv)


if __name__ == "__main__":
    sys.exit(main())
