"""Best-fit packer throughput on the CPU: the C++ packer of nanotrain._C against the Python reference.

The loader's call (nanotrain/data/loader.py): a buffer of 1000 tokenized documents, one micro-batch of
32 rows of T+1 = 2049 tokens packed per call. Document lengths are log-normal (median 400 tokens, a long
tail past a row, clipped to 8 rows), like web text. Reported: packed tokens per second (rows x row_len over
the median time of a call), and the C++/Python ratio (the issue's target: >= 10x). A second case drains the
whole buffer in one call (about 300 rows), where the Python packer's scan of every document per pick hurts most.

Run:  python benchmarks/bench_packing.py [--quick]    (rows to the results file, table to stdout)
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


def _row(provider: str, case: str, packed: float, seconds: float, note: str = "") -> common.Row:
    """The row of one (provider, case): packed tokens/s, the C++ row with its ratio to the reference's."""
    rate = packed * ROW_LEN / seconds
    _rates[(provider, case)] = rate
    peer = _rates.get(("reference", case))
    return common.Row("packing", f"pack {case}", provider, f"T={ROW_LEN}, {BUFFER_DOCS} docs, {packed:.0f} rows/call",
                      ms=seconds * 1e3, rate=rate / 1e6, unit="Mtok/s",
                      vs_peer=rate / peer if provider != "reference" and peer else None,
                      peer="Python reference" if provider != "reference" and peer else "", note=note)


def measure(provider: str, case: str, quick: bool = False) -> common.Row:
    """Median time of one call, as packed tokens/s (quick: 2 buffers and 3 timed calls, a smoke-sized run)."""
    fn, rows, buffers = packer(provider), CASES[case], make_buffers(2 if quick else 8)
    packed = mean_rows(fn, buffers, rows)
    cycle = itertools.cycle(buffers)
    slow = provider == "reference"
    seconds = common.cpu_time_s(lambda: fn(*next(cycle), rows, ROW_LEN), warmup=1,
                                repeats=3 if quick else 8 if slow else 50, min_time_s=0.0 if slow or quick else 1.0)
    return _row(provider, case, packed, seconds, note=f"1 thread{', quick' if quick else ''}")


def collect(quick: bool = False) -> list[common.Row]:
    """Rows of every case and provider (the reference first, so the C++ rows carry their ratio)."""
    torch.set_num_threads(1)
    rows = []
    for case in CASES:
        for provider in PROVIDERS:
            try:
                rows.append(measure(provider, case, quick))
            except registry.BackendUnavailable as e:
                rows.append(common.Row("packing", f"pack {case}", provider, f"T={ROW_LEN}", status="skipped",
                                       note=str(e)))
    return rows


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
    row = common.record(_row(provider, case, packed, benchmark.stats.stats.median, note="pytest-benchmark"))
    benchmark.extra_info["packed_tokens_per_s"] = row.rate * 1e6
    if row.vs_peer is not None:
        benchmark.extra_info["speedup_vs_reference"] = row.vs_peer


def main(argv: list[str] | None = None) -> int:
    return common.main("packing", collect, argv)


if __name__ == "__main__":
    sys.exit(main())
