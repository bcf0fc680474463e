"""DataLoader: packed row layout, exact resume, rank sharding, split behaviour, error messages."""
from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanotrain.data import shards as S
from nanotrain.data.loader import DataLoader
from nanotrain.data.tokenizer import Tokenizer
from nanotrain.errors import UserError
from nanotrain.ops import registry

DOC_TAG = re.compile(r"\[doc (\d+)\]")


def unbound(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer without the record of its training shards (usable with any data directory)."""
    return Tokenizer(tok.pattern, tok.mergeable_ranks, tok.special_tokens)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_packed_bos_aligned_rows(corpus_dir, tokenizer):
    base, docs = corpus_dir
    B, T = 3, 64
    loader = DataLoader(tokenizer, B, T, base_dir=base)
    encoded = {tuple(tokenizer.encode(d, prepend="<|bos|>")) for d in docs[:-24]}
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert (x[:, 0] == tokenizer.bos_token_id).all()  # every row starts a document
        row = torch.cat([x, y[:, -1:]], dim=1)  # the T+1 tokens of each row
        for r in row.tolist():
            # each BOS-delimited piece is a whole document or a crop: a prefix of a training document
            starts = [i for i, t in enumerate(r) if t == tokenizer.bos_token_id] + [T + 1]
            for a, b in zip(starts, starts[1:]):
                piece = tuple(r[a:b])
                assert any(e[:len(piece)] == piece for e in encoded)
    assert 0 <= loader.cropped_fraction < 1
    assert loader.tokens_consumed >= 5 * B * (T + 1)


def test_resume_is_exact_across_epochs(corpus_dir, tokenizer):
    base, _ = corpus_dir
    kw = dict(tokenizer=tokenizer, batch_size=4, seq_len=96, base_dir=base, buffer_size=20)
    ref = DataLoader(**kw)
    last = take(ref, 7)[-1]
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)  # through a checkpoint file, as the trainer does
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [last] + take(ref, 40)  # the state is the position before the batch last yielded
    assert ref.epoch >= 1  # the continuation crossed an epoch boundary
    resumed = DataLoader(**kw, state=state)
    got = take(resumed, 41)
    for (x0, y0), (x1, y1) in zip(expected, got, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.state_dict()["epoch"] == ref.state_dict()["epoch"] and resumed.epoch == ref.epoch
    assert resumed.cropped_fraction == ref.cropped_fraction
    # a fresh loader does not give the continuation (the state is really used)
    fresh = take(DataLoader(**kw), 1)[0][0]
    assert not torch.equal(fresh, expected[0][0])


def test_state_is_the_position_before_the_last_batch(corpus_dir, tokenizer):
    """A trainer draws the next step's batch ahead; saving the loader's state must bring that batch back."""
    base, _ = corpus_dir
    kw = dict(tokenizer=tokenizer, batch_size=2, seq_len=64, base_dir=base, buffer_size=10)
    loader = DataLoader(**kw)
    before = loader.state_dict()
    first = next(loader)
    assert DataLoader(**kw, state=before).state_dict()["rows"] == 0
    x0, _ = next(DataLoader(**kw, state=loader.state_dict()))
    assert torch.equal(x0, first[0])  # the batch last yielded, again
    x1, _ = next(loader)
    x1_again, _ = next(DataLoader(**kw, state=loader.state_dict()))
    assert torch.equal(x1_again, x1) and not torch.equal(x1, first[0])
    assert loader.state_dict()["rows"] == 2 and loader.rows == 4  # before the second batch of 2 rows; after it


def _doc_ids(loader) -> set[int]:
    ids = set()
    for x, y in loader:
        for r in torch.cat([x, y[:, -1:]], dim=1).tolist():
            ids |= {int(m) for m in DOC_TAG.findall(loader.tokenizer.decode(r))}
    return ids


def test_two_ranks_see_disjoint_data(corpus_dir, tokenizer):
    base, docs = corpus_dir
    kw = dict(tokenizer=tokenizer, batch_size=2, seq_len=128, base_dir=base, loop=False)
    r0 = DataLoader(**kw, rank=0, world_size=2)
    r1 = DataLoader(**kw, rank=1, world_size=2)
    u0, u1 = set(r0.units), set(r1.units)
    assert not u0 & u1 and len(u0 | u1) == r0.num_row_groups and abs(len(u0) - len(u1)) <= 1
    ids0, ids1 = _doc_ids(r0), _doc_ids(r1)
    assert ids0 and ids1 and not ids0 & ids1
    n_train = len(docs) - 24
    assert all(i < n_train for i in ids0 | ids1)  # no validation document in training
    assert len(ids0 | ids1) > 0.6 * n_train  # together they cover the split (less the dropped tails)


def test_val_split_makes_one_pass(corpus_dir, tokenizer):
    base, docs = corpus_dir
    val = DataLoader(tokenizer, 2, 32, split="val", base_dir=base)
    n = 0
    for _ in val:
        n += 1
    assert n > 0
    with pytest.raises(StopIteration):
        next(val)
    ids = _doc_ids(DataLoader(tokenizer, 2, 32, split="val", base_dir=base))
    assert ids and all(i >= len(docs) - 24 for i in ids)  # only validation documents
    cycling = DataLoader(tokenizer, 2, 32, split="val", base_dir=base, loop=True)
    assert len(take(cycling, n + 5)) == n + 5


def test_no_shards_message(tmp_path, tokenizer):
    with pytest.raises(UserError, match=r"no shards found in .*run `nanotrain-data sample` \(offline\) or "
                                        r"`nanotrain-data download`"):
        DataLoader(tokenizer, 2, 16, base_dir=tmp_path / "empty")


def test_corrupt_shard_named_and_skippable(corpus_dir, tokenizer, capsys):
    base, _ = corpus_dir
    bad = S.list_shards(base)[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated (its footer is gone)
    with pytest.raises(UserError, match=re.escape(str(bad))):
        DataLoader(tokenizer, 2, 32, base_dir=base)
    loader = DataLoader(tokenizer, 2, 32, base_dir=base, skip_corrupt=True)
    err = capsys.readouterr().err
    assert "skipping" in err and bad.name in err
    assert all(loader.shards[u.shard] != bad for u in loader.units)
    x, y = next(loader)
    assert x.shape == (2, 32)


def test_missing_text_column(tmp_path, tokenizer):
    base = tmp_path / "b"
    d = S.paths.data_dir(base)
    d.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"content": ["some words here"] * 4}), d / S.shard_name(i))
    with pytest.raises(UserError, match=r"has no `text` column \(columns: content\)"):
        DataLoader(unbound(tokenizer), 2, 32, base_dir=base)


def test_empty_corpus(tmp_path, tokenizer):
    base = tmp_path / "b"
    S.write_shards(["", "", "", ""], base, 2, {"source": "build"})
    loader = DataLoader(unbound(tokenizer), 2, 32, base_dir=base)
    with pytest.raises(UserError, match="empty corpus"):
        next(loader)


def test_tokenizer_for_other_data(tmp_path, corpus_dir, tokenizer):
    base, _ = corpus_dir
    S.write_shards(["other text " * 20] * 30, base, 10, {"source": "build"})  # the data dir was rebuilt
    with pytest.raises(UserError, match=r"tokenizer was trained on other shards.*run `nanotrain-data tokenizer`"):
        DataLoader(tokenizer, 2, 32, base_dir=base)


def test_state_mismatches(corpus_dir, tokenizer):
    base, _ = corpus_dir
    loader = DataLoader(tokenizer, 2, 32, base_dir=base, rank=0, world_size=2)
    next(loader)
    sd = loader.state_dict()
    with pytest.raises(UserError, match="rank=0"):
        DataLoader(tokenizer, 2, 32, base_dir=base, rank=1, world_size=2, state=sd)
    with pytest.raises(UserError, match="split='train'"):
        DataLoader(tokenizer, 2, 32, split="val", base_dir=base, rank=0, world_size=2, state=sd)
    with pytest.raises(UserError, match="outside a world"):
        DataLoader(tokenizer, 2, 32, base_dir=base, rank=2, world_size=2)
    with pytest.raises(UserError, match="too few for 100 rank"):
        DataLoader(tokenizer, 2, 32, base_dir=base, rank=99, world_size=100)


def test_packer_backends_give_the_same_stream(corpus_dir, tokenizer):
    """The loader's stream does not depend on which packing backend runs (the reference is the spec)."""
    names = [b.name for b in registry.backends("packing")]
    if len(names) < 2:
        pytest.skip("only the reference packer is available here")
    base, _ = corpus_dir
    streams = []
    for name in names:
        with registry.forced(packing=name):
            streams.append(take(DataLoader(tokenizer, 3, 80, base_dir=base, buffer_size=30), 6))
    for other in streams[1:]:
        for (x0, y0), (x1, y1) in zip(streams[0], other):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


@pytest.mark.gpu
def test_cuda_batches_match_cpu(corpus_dir, tokenizer):
    """On CUDA the batches arrive on the device (pinned host buffer, one non-blocking copy), equal to the CPU's."""
    base, _ = corpus_dir
    cpu = take(DataLoader(tokenizer, 4, 64, base_dir=base), 3)
    gpu = take(DataLoader(tokenizer, 4, 64, device="cuda", base_dir=base), 3)
    for (x0, y0), (x1, y1) in zip(cpu, gpu):
        assert x1.device.type == "cuda" and x1.dtype == torch.int64 and x1.is_contiguous()
        assert torch.equal(x0, x1.cpu()) and torch.equal(y0, y1.cpu())
