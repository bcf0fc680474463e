"""The best-fit packer: the reference against hand-worked cases (it is the spec), and the C++ packer of
nanotrain._C against the reference on many random document streams, every output identical."""
from __future__ import annotations

import random

import pytest
import torch

from nanotrain.ops import _ext, packing, registry

needs_ext = pytest.mark.skipif(not _ext.has_op("best_fit_pack"),
                               reason=f"the C++ packer is not built: nanotrain._C is {_ext.extension_status()}")


def make_buffer(lengths: list[int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR buffer of documents with these lengths; token values drawn fresh (document i starts with -i-1 so a
    misplaced document shows, the rest are random non-zero ids)."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    tokens = torch.randint(1, 50_000, (offsets[-1],), dtype=torch.int32)
    for i, start in enumerate(offsets[:-1]):
        if lengths[i] > 0:
            tokens[start] = -(i + 1)
    return tokens, torch.tensor(offsets, dtype=torch.int64)


def doc(tokens: torch.Tensor, offsets: torch.Tensor, i: int) -> list[int]:
    return tokens[offsets[i]:offsets[i + 1]].tolist()


def assert_same(got: tuple, want: tuple) -> None:
    for name, g, w in zip(("rows", "consumed", "cropped"), got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(g, w), f"{name} differ: first mismatch at {(g != w).nonzero()[:1].tolist()}"


# --- the reference is the spec: hand-worked cases ------------------------------------------------------------

def test_reference_longest_fit_then_crop_shortest():
    tokens, offsets = make_buffer([3, 5, 2, 9, 1], random.Random(0))
    rows, consumed, cropped = packing.reference(tokens, offsets, num_rows=3, row_len=8)
    # row 0: doc1 (5, longest fitting 8), doc0 (3); row 1: doc2 (2), doc4 (1), then nothing fits the 5 left:
    # the shortest unused (doc3, 9 tokens) is cropped to 5; row 2: nothing left, abandoned.
    assert rows.shape == (2, 8) and rows.dtype == torch.int32
    assert rows[0].tolist() == doc(tokens, offsets, 1) + doc(tokens, offsets, 0)
    assert rows[1].tolist() == doc(tokens, offsets, 2) + doc(tokens, offsets, 4) + doc(tokens, offsets, 3)[:5]
    assert consumed.tolist() == [True] * 5 and consumed.dtype == torch.bool
    assert cropped.item() == 4 and cropped.dtype == torch.int64 and cropped.dim() == 0


def test_reference_ties_take_the_lowest_index():
    tokens, offsets = make_buffer([2, 3, 3, 2], random.Random(1))
    rows, _, _ = packing.reference(tokens, offsets, num_rows=2, row_len=5)
    assert rows[0].tolist() == doc(tokens, offsets, 1) + doc(tokens, offsets, 0)
    assert rows[1].tolist() == doc(tokens, offsets, 2) + doc(tokens, offsets, 3)
    tokens, offsets = make_buffer([6, 4, 4], random.Random(2))
    rows, _, cropped = packing.reference(tokens, offsets, num_rows=3, row_len=3)
    assert [r[0] for r in rows.tolist()] == [-2, -3, -1]  # crops: doc1 (4), doc2 (4), then doc0 (6)
    assert cropped.item() == 1 + 1 + 3


def test_reference_abandons_a_row_when_documents_run_out():
    tokens, offsets = make_buffer([2, 2, 1], random.Random(3))
    rows, consumed, cropped = packing.reference(tokens, offsets, num_rows=2, row_len=3)
    # row 0: doc0 + doc2; row 1 takes doc1 and then finds nothing: abandoned, doc1 stays unused
    assert rows.tolist() == [doc(tokens, offsets, 0) + doc(tokens, offsets, 2)]
    assert consumed.tolist() == [True, False, True]
    assert cropped.item() == 0


def test_pack_rows_rejects_bad_input_with_a_clear_message():
    tokens, offsets = make_buffer([3, 4], random.Random(4))
    with pytest.raises(ValueError, match="int32"):
        packing.pack_rows(tokens.long(), offsets, 1, 4)
    with pytest.raises(ValueError, match="int64"):
        packing.pack_rows(tokens, offsets.int(), 1, 4)
    with pytest.raises(ValueError, match="row_len"):
        packing.pack_rows(tokens, offsets, 1, 0)


# --- the C++ packer: same outputs as the reference ---------------------------------------------------------

def random_lengths(rng: random.Random, num_docs: int, row_len: int) -> list[int]:
    """A mix of 1-token documents, short ones, ones near the row length and ones longer than a row."""
    kinds = [lambda: 1, lambda: rng.randint(1, max(1, row_len // 8)), lambda: rng.randint(1, row_len),
             lambda: rng.randint(max(1, row_len - 3), row_len + 3), lambda: rng.randint(row_len, 3 * row_len + 1)]
    weights = [1, 4, 4, 1, 1]
    return [rng.choices(kinds, weights)[0]() for _ in range(num_docs)]


@needs_ext
@pytest.mark.parametrize("row_len", [1, 2, 7, 64, 129, 257])
def test_cpp_matches_reference_on_random_streams(row_len):
    rng = random.Random(row_len)
    for trial in range(25):
        num_docs = rng.choice([0, 1, 2, 5, 17, 60])
        lengths = random_lengths(rng, num_docs, row_len)
        tokens, offsets = make_buffer(lengths, rng)
        # from none to more rows than the buffer can fill (so it runs out mid-row)
        num_rows = rng.choice([0, 1, 3, 2 * num_docs + 1])
        want = packing.reference(tokens, offsets, num_rows, row_len)
        got = torch.ops.nanotrain.best_fit_pack(tokens, offsets, num_rows, row_len)
        assert_same(got, want)


@needs_ext
def test_cpp_matches_reference_over_a_refilled_stream():
    """The loader's use: pack, keep the unused documents in order, append fresh ones, pack again."""
    rng = random.Random(7)
    row_len = 97
    pending: list[list[int]] = []
    for step in range(12):
        fresh = [torch.randint(1, 50_000, (n,), dtype=torch.int32).tolist()
                 for n in random_lengths(rng, 40 - len(pending), row_len)]
        docs = pending + fresh
        lengths = [len(d) for d in docs]
        tokens = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
        offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)
        want = packing.reference(tokens, offsets, 8, row_len)
        got = torch.ops.nanotrain.best_fit_pack(tokens, offsets, 8, row_len)
        assert_same(got, want)
        pending = [d for d, used in zip(docs, got[1].tolist()) if not used]


@needs_ext
def test_cpp_matches_reference_with_long_rows():
    """Rows longer than 4096 tokens exercise the second level of the C++ length bitmap."""
    rng = random.Random(11)
    for row_len in (4097, 9000):
        lengths = [rng.choice([1, rng.randint(1, 300), rng.randint(1, row_len), rng.randint(row_len, 2 * row_len)])
                   for _ in range(40)]
        tokens, offsets = make_buffer(lengths, rng)
        assert_same(torch.ops.nanotrain.best_fit_pack(tokens, offsets, 30, row_len),
                    packing.reference(tokens, offsets, 30, row_len))


@needs_ext
def test_cpp_matches_reference_on_edge_buffers():
    rng = random.Random(5)
    cases = [
        ([], 4, 3),              # empty buffer
        ([5, 5], 0, 4),          # no rows asked for
        ([4], 1, 4),             # exactly one row
        ([0, 3, 0, 1], 2, 2),    # empty documents (the reference takes them as "fitting"; so must C++)
        ([1] * 50, 10, 5),       # only 1-token documents
        ([100, 200, 300], 2, 3), # only documents longer than a row
    ]
    for lengths, num_rows, row_len in cases:
        tokens, offsets = make_buffer(lengths, rng)
        assert_same(torch.ops.nanotrain.best_fit_pack(tokens, offsets, num_rows, row_len),
                    packing.reference(tokens, offsets, num_rows, row_len))
    # offsets need not start at 0 (a view into a larger token array)
    tokens = torch.randint(1, 1000, (50,), dtype=torch.int32)
    offsets = torch.tensor([10, 13, 20, 21, 40], dtype=torch.int64)
    assert_same(torch.ops.nanotrain.best_fit_pack(tokens, offsets, 3, 6), packing.reference(tokens, offsets, 3, 6))


@needs_ext
def test_cpp_rejects_inconsistent_offsets():
    tokens = torch.randint(1, 100, (10,), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.nanotrain.best_fit_pack(tokens, torch.tensor([0, 5, 3, 10]), 1, 4)
    with pytest.raises(RuntimeError, match="past the end"):
        torch.ops.nanotrain.best_fit_pack(tokens, torch.tensor([0, 5, 11]), 1, 4)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.nanotrain.best_fit_pack(tokens.long(), torch.tensor([0, 5, 10]), 1, 4)


@needs_ext
def test_dispatch_picks_cpp_and_forcing_the_reference_gives_the_same_rows():
    assert registry.select("packing", "cpu", torch.int32).name == "cpp"
    tokens, offsets = make_buffer(random_lengths(random.Random(9), 30, 50), random.Random(9))
    got = packing.pack_rows(tokens, offsets, 10, 50)
    with registry.forced(packing="reference"):
        assert registry.select("packing", "cpu", torch.int32).name == "reference"
        want = packing.pack_rows(tokens, offsets, 10, 50)
    assert_same(got, want)


def test_cpp_backend_says_why_when_the_extension_is_hidden(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_VAR, "1")
    _ext.load_extension.cache_clear()
    registry.clear_cache()
    try:
        chosen, reasons = registry.explain("packing", "cpu", torch.int32)
        assert chosen.name == "reference"
        assert reasons == [("cpp", "nanotrain._C is absent: disabled by NANOTRAIN_NO_EXT=1: unset NANOTRAIN_NO_EXT")]
        with pytest.raises(registry.BackendUnavailable, match="forces packing=cpp, but it cannot run here"):
            with registry.forced(packing="cpp"):
                registry.select("packing", "cpu", torch.int32)
    finally:
        monkeypatch.delenv(_ext.DISABLE_VAR)
        _ext.load_extension.cache_clear()
        registry.clear_cache()
