"""CPU benchmark of the data loader: packed tokens per second at T=2048, tokenization included.

    python benchmarks/bench_loader.py [--quick]       (rows to the results file, table to stdout)
    python benchmarks/bench_loader.py before-after    (the loader before/after the prefetching loader, one run)
    python -m pytest benchmarks/bench_loader.py       (pytest-benchmark, one row per packing backend)

The corpus is the offline sample (`nanotrain-data sample`, 6 MB of installed documentation) with a
tokenizer trained on it (vocab 32768 by default), both made once in a temporary directory. The
loader runs in its steady state: after the first batch (which fills the buffers of the streams it draws from
and is timed apart) and a warm-up round (which fills the other streams' buffers),
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
from nanotrain.data.loader import DEFAULT_TRAIN_STREAMS, DataLoader  # noqa: E402
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
        next(loader)  # the first batch fills its streams' buffers (buffer_size documents each): timed apart
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


# ---------------------------------------------------------------------------------------------------------------
# Before/after the prefetching, re-shardable loader (issue 15 part 4), in one run on this machine:
#     python benchmarks/bench_loader.py [--rounds 5]
# "before" is the loader of BEFORE_COMMIT (synchronous, one stream per rank), loaded from git; "after" is this
# checkout's loader with its prefetch thread, and "after, prefetch=0" the same loader without the thread (the cost
# of the 48 streams alone). Variants alternate within each round (the machine is shared: medians of rounds).
# Each loader first draws enough batches to fill every stream's buffer (untimed), so rates are steady-state.
# Loader alone: tokens/s of B x T rows drawn back to back. Training: tokens/s of CPU steps of a d2 model at
# T=256 (forward, backward, optimizer), the batch drawn from the loader inside the timed step.

BEFORE_COMMIT = "0606711"  # the last commit with the synchronous loader


def _old_loader_class():
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:nanotrain/data/loader.py"], cwd=common.ROOT,
                         capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "loader_before.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("loader_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loader_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.DataLoader


def _variants():
    old = _old_loader_class()
    return {"before (sync)": lambda *a, **k: old(*a, **k),
            "after, prefetch=0": lambda *a, **k: DataLoader(*a, **k, prefetch=0),
            "after, prefetch=3": lambda *a, **k: DataLoader(*a, **k, prefetch=3)}


def before_after(rounds: int = 5, vocab: int = 8192) -> list:
    import statistics
    import tempfile

    from nanotrain.model import GPTConfig, build_model
    from nanotrain.optim import build_optimizer

    torch.manual_seed(0)
    variants = _variants()
    base = tempfile.mkdtemp(prefix="bench_loader_")
    docs, _ = make_sample(6_000_000, log=lambda m: None)
    S.write_shards(docs, base, 2000, {"source": "sample"})
    tok = train_tokenizer(S.iter_documents("train", base, doc_cap=10_000), vocab)
    threads = os.cpu_count() or 1
    loader_B, loader_T, loader_batches = 8, 2048, 150  # 1200 rows: each stream packs 8 rows at a time, 3+ times
    step_B, step_T, steps = 8, 256, 5

    def warm_batches(B: int) -> int:  # enough batches to touch (and fill) each of the 48 streams once
        return -(-DEFAULT_TRAIN_STREAMS // B) + 1
    cfg = GPTConfig(sequence_len=step_T, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                    window_pattern="L")
    results: dict[str, dict[str, list[float]]] = {name: {"loader": [], "train": []} for name in variants}
    cropped: dict[str, float] = {}
    for _ in range(rounds):
        for name, make in variants.items():
            ld = make(tok, loader_B, loader_T, base_dir=base, tokenizer_threads=threads)
            for _ in range(warm_batches(loader_B)):  # every stream's buffer fills: not timed
                next(ld)
            t0 = time.perf_counter()
            for _ in range(loader_batches):
                next(ld)
            results[name]["loader"].append(loader_B * loader_T * loader_batches / (time.perf_counter() - t0))
            cropped[name] = ld.cropped_fraction
            getattr(ld, "close", lambda: None)()
        for name, make in variants.items():
            model = build_model(cfg, torch.device("cpu"))
            opt = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                                  weight_decay=0.0, adam_betas=(0.8, 0.95), sharded=False)
            ld = make(tok, step_B, step_T, base_dir=base, tokenizer_threads=threads)
            for _ in range(warm_batches(step_B)):
                x, y = next(ld)
            for _ in range(2):  # warm-up steps (allocations)
                model(x, y).backward()
                opt.step()
                model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(ld)
                model(x, y).backward()
                opt.step()
                model.zero_grad(set_to_none=True)
            results[name]["train"].append(step_B * step_T * steps / (time.perf_counter() - t0))
            getattr(ld, "close", lambda: None)()
    rows = []
    for name, r in results.items():
        for kind, op, shape in (
                ("loader", "loader alone, sample corpus, tokenization included",
                 f"B={loader_B} T={loader_T} vocab {tok.vocab_size}"),
                ("train", "CPU training step (forward, backward, optimizer), batch drawn in the step",
                 f"d2 n_embd=128 B={step_B} T={step_T}")):
            rate = statistics.median(r[kind])
            n = loader_B * loader_T if kind == "loader" else step_B * step_T
            rows.append(common.record(common.Row(
                bench="loader" if kind == "loader" else "train", op=op, provider=name, shape=shape,
                ms=n / rate * 1e3, rate=rate / 1e3, unit="ktok/s",
                note=f"median of {rounds} interleaved rounds (min {min(r[kind]) / 1e3:.3g}, max "
                     f"{max(r[kind]) / 1e3:.3g} ktok/s); {threads} CPUs shared with other jobs"
                     + (f"; cropped {cropped[name]:.1%}" if kind == "loader" else ""))))
    return rows


def main(argv: list[str] | None = None) -> int:
    """`bench_loader.py [--quick] [--results F]`: the loader rows; `bench_loader.py before-after [--rounds N]`: the
    before/after comparison of the prefetching, re-shardable loader (rows to the results file and as markdown)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["before-after"]:
        import argparse

        parser = argparse.ArgumentParser(prog="bench_loader.py before-after",
                                         description="the loader before/after the prefetching, re-shardable loader")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--vocab", type=int, default=8192)
        args = parser.parse_args(argv[1:])
        for row in before_after(args.rounds, args.vocab):
            print(row.markdown())
        return 0
    return common.main("loader", collect, argv)


if __name__ == "__main__":
    sys.exit(main())
