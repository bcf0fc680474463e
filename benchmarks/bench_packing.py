"""Best-fit packer throughput on the CPU: the C++ packer of nanotrain._C against the Python reference.

The loader's call (nanotrain/data/loader.py): a buffer of 1000 tokenized documents, one micro-batch of
32 rows of T+1 = 2049 tokens packed per call. Document lengths are log-normal (median 400 tokens, a long
tail past a row, clipped to 8 rows), like web text. Reported: packed tokens per second (rows x row_len over
the median time of a call), and the C++/Python ratio (the issue's target: >= 10x). A second case drains the
whole buffer in one call (about 300 rows), where the Python packer's scan of every document per pick hurts most.

Run:  python benchmarks/bench_packing.py              (a table and RESULTS.md rows)
      python -m pytest benchmarks/bench_packing.py     (pytest-benchmark)
Inputs rotate among 8 buffers so a call does not find the previous call's data in cache.
"""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from nanotrain.ops import registry  # noqa: E402

ROW_LEN = 2048 + 1
BUFFER_DOCS = 1000
CASES = {"loader": 32, "drain": 10_000}  # rows asked per call: one micro-batch; more than the buffer holds
PROVIDERS = ["reference", "cpp"]  # the peer first, so the C++ row can state its ratio
_rates: dict[tuple[str, str], float] = {}


def make_buffers(n: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n CSR buffers of BUFFER_DOCS documents with log-normal lengths, tokens random, each starting with BOS."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = np.clip(rng.lognormal(np.log(400), 1.0, BUFFER_DOCS).astype(np.int64), 2, 8 * ROW_LEN)
        offsets = np.zeros(BUFFER_DOCS + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = rng.integers(1, 65_536, int(offsets[-1]), dtype=np.int32)
        tokens[offsets[:-1]] = 0  # BOS
        out.append((torch.from_numpy(tokens), torch.from_numpy(offsets)))
    return out


def mean_rows(fn, buffers: list, rows: int) -> float:
    """Rows one call packs, averaged over the buffers (the drain case packs a different number from each)."""
    return sum(fn(tokens, offsets, rows, ROW_LEN)[0].shape[0] for tokens, offsets in buffers) / len(buffers)


def packer(provider: str):
    with registry.forced(packing=provider):
        return registry.select("packing", "cpu", torch.int32).fn


def measure(provider: str, case: str, quick: bool = False) -> common.Row:
    """Median time of one call, as packed tokens/s; the C++ row carries its ratio to the reference."""
    fn, rows, buffers = packer(provider), CASES[case], make_buffers()
    packed = mean_rows(fn, buffers, rows)
    cycle = itertools.cycle(buffers)
    slow = provider == "reference"
    seconds = common.cpu_time_s(lambda: fn(*next(cycle), rows, ROW_LEN), warmup=1,
                                repeats=8 if slow or quick else 50, min_time_s=0.0 if slow or quick else 1.0)
    rate = packed * ROW_LEN / seconds
    _rates[(provider, case)] = rate
    peer = _rates.get(("reference", case))
    return common.Row(bench="packing", case=f"T={ROW_LEN}, {BUFFER_DOCS} docs, {packed:.0f} rows/call ({case})",
                      provider=provider, time_ms=seconds * 1e3, rate=rate / 1e6, unit="Mtok/s",
                      vs_peer=rate / peer if provider != "reference" and peer else None,
                      peer="Python reference" if provider != "reference" else "")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_packing_throughput(benchmark, provider, case):
    try:
        fn = packer(provider)
    except registry.BackendUnavailable as e:
        pytest.skip(str(e))
    rows, buffers = CASES[case], make_buffers()
    packed = mean_rows(fn, buffers, rows)
    assert packed > 0
    cycle = itertools.cycle(buffers)
    slow = provider == "reference"
    benchmark.pedantic(lambda: fn(*next(cycle), rows, ROW_LEN), rounds=8 if slow else 200, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    rate = packed * ROW_LEN / seconds
    _rates[(provider, case)] = rate
    benchmark.extra_info["packed_tokens_per_s"] = rate
    peer = _rates.get(("reference", case))
    row = common.Row(bench="packing", case=f"T={ROW_LEN}, {BUFFER_DOCS} docs, {packed:.0f} rows/call ({case})",
                     provider=provider, time_ms=seconds * 1e3, rate=rate / 1e6, unit="Mtok/s",
                     vs_peer=rate / peer if provider != "reference" and peer else None,
                     peer="Python reference" if provider != "reference" else "")
    if row.vs_peer is not None:
        benchmark.extra_info["speedup_vs_reference"] = row.vs_peer
    common.record(row)


def main() -> None:
    torch.set_num_threads(1)
    info = common.machine_info()
    rows = []
    for case in CASES:
        for provider in PROVIDERS:
            try:
                rows.append(measure(provider, case))
            except registry.BackendUnavailable as e:
                print(f"{provider}: skipped ({e})")
    for r in rows:
        r.machine = info
    print(f"{'case':<12} {'provider':<10} {'ms/call':>10} {'Mtok/s':>10} {'vs Python':>10}")
    for case in CASES:
        for r in (r for r in rows if r.case.endswith(f"({case})")):
            ratio = f"{r.vs_peer:.0f}x" if r.vs_peer else "-"
            print(f"{case:<12} {r.provider:<10} {r.time_ms:>10.3f} {r.rate:>10.2f} {ratio:>10}")
    print("\nRESULTS.md rows:")
    print(common.MARKDOWN_HEADER)
    for r in rows:
        print(r.markdown())
    if os.environ.get("OUT"):
        common.save_json(rows, os.path.join(os.environ["OUT"], "bench_packing.json"))


if __name__ == "__main__":
    main()
