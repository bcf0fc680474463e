"""DataLoader's global stream: the same rows whatever the world size and batch size, a position that re-shards
onto another world size, and the prefetch thread (same stream and states, errors re-raised, clean stop)."""
from __future__ import annotations

import io
import re
import time

import pytest
import torch

from nanotrain.data import shards as S
from nanotrain.data.loader import DataLoader, merge_loader_states, valid_world_sizes
from nanotrain.errors import UserError

T = 48
DOC_TAG = re.compile(r"\[doc (\d+)\]")


def rows(loader, n_batches: int) -> torch.Tensor:
    """The (n_batches * B, T+1) rows the next n_batches batches hold, in order."""
    out = []
    for _ in range(n_batches):
        x, y = next(loader)
        out.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(out)


def interleave(per_rank: list[torch.Tensor]) -> torch.Tensor:
    """Global order: rank r's k-th row is global row r + k*W."""
    W = len(per_rank)
    out = torch.empty((W * per_rank[0].shape[0], per_rank[0].shape[1]), dtype=per_rank[0].dtype)
    for r, t in enumerate(per_rank):
        out[r::W] = t
    return out


def through_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def kw(corpus_dir, tokenizer):
    base, _ = corpus_dir
    return dict(tokenizer=tokenizer, seq_len=T, base_dir=base, buffer_size=12)


@pytest.mark.parametrize("num_streams", [48, 96])  # 54 row groups: whole row groups per stream / shared ones
def test_ranks_together_give_the_single_rank_stream(kw, num_streams):
    single = rows(DataLoader(**kw, batch_size=12, num_streams=num_streams), 6)  # 72 global rows
    for W, B in ((2, 3), (3, 4), (4, 2)):
        per_rank = [rows(DataLoader(**kw, batch_size=B, rank=r, world_size=W, num_streams=num_streams), 72 // W // B)
                    for r in range(W)]
        assert torch.equal(interleave(per_rank), single), (W, B)


def test_batch_size_does_not_change_the_stream(kw):
    a = rows(DataLoader(**kw, batch_size=2), 12)
    b = rows(DataLoader(**kw, batch_size=3, prefetch=0), 8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 4), (4, 3)])
def test_resume_on_another_world_size_continues_the_global_stream(kw, old_world, new_world):
    B = 2
    straight = rows(DataLoader(**kw, batch_size=B * 12), 4)  # 96 global rows, one process
    old = [DataLoader(**kw, batch_size=B, rank=r, world_size=old_world) for r in range(old_world)]
    n_first = 24 // (B * old_world)  # 24 global rows, then the save
    before = interleave([rows(ld, n_first) for ld in old])
    assert torch.equal(before, straight[:24])
    for ld in old:  # one more batch each: the checkpoint holds the position before it, which the resume redraws
        next(ld)
    merged = merge_loader_states([through_file(ld.state_dict()) for ld in reversed(old)])
    assert merged["rows"] == 24
    new = [DataLoader(**kw, batch_size=B, rank=r, world_size=new_world, state=merged) for r in range(new_world)]
    after = interleave([rows(ld, 72 // (B * new_world)) for ld in new])
    assert torch.equal(after, straight[24:])  # no row repeated, none skipped


def test_states_of_one_world_are_per_rank(kw):
    ld = DataLoader(**kw, batch_size=2, rank=1, world_size=2)
    next(ld)
    sd = ld.state_dict()
    with pytest.raises(UserError, match=r"rank=1 of 2 and lacks data stream\(s\) 0, 2, 4.*merge_loader_states"):
        DataLoader(**kw, batch_size=2, state=sd)
    with pytest.raises(UserError, match=r"ranks \[1\] and the run had 2; pass the state of every rank"):
        merge_loader_states([sd])
    other = DataLoader(**kw, batch_size=2, rank=0, world_size=2)
    next(other)
    next(other)  # a later moment than rank 1's state
    with pytest.raises(UserError, match=r"differ in rows .*not of the same checkpoint"):
        merge_loader_states([other.state_dict(), sd])


def test_world_sizes_that_do_not_divide_the_streams_are_refused(kw):
    assert valid_world_sizes(48) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    with pytest.raises(UserError, match=r"5 processes cannot share the 48 data streams of this run evenly; use one "
                                        r"of 1, 2, 3, 4, 6, 8, 12, 16, 24, 48 processes"):
        DataLoader(**kw, batch_size=2, rank=0, world_size=5)


def test_a_position_that_the_new_world_cannot_split_is_refused(kw):
    ld = DataLoader(**kw, batch_size=1)
    rows(ld, 2)  # the state is before the 2nd row: 1 global row, which 2 ranks cannot split
    with pytest.raises(UserError, match=r"stopped after 1 rows, which 2 ranks cannot split evenly; resume with one "
                                        r"of 1 processes"):
        DataLoader(**kw, batch_size=1, rank=0, world_size=2, state=ld.state_dict())


def _doc_ids(loader) -> list[int]:
    ids = []
    for x, y in loader:
        for r in torch.cat([x, y[:, -1:]], dim=1).tolist():
            ids += [int(m) for m in DOC_TAG.findall(loader.tokenizer.decode(r))]
    return ids


def test_val_split_is_shared_by_the_ranks_once(kw, corpus_dir):
    _, docs = corpus_dir
    k = dict(kw, seq_len=16)
    per_rank = [_doc_ids(DataLoader(**k, batch_size=1, split="val", rank=r, world_size=2)) for r in range(2)]
    ids = per_rank[0] + per_rank[1]
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert all(i >= len(docs) - 24 for i in ids)
    assert len(set(ids)) >= 20  # the 24 documents, less a dropped tail per rank


# ------------------------------------------------------------------------------------------ the prefetch thread
def test_prefetch_gives_the_same_batches_and_states(kw):
    sync = DataLoader(**kw, batch_size=3, prefetch=0)
    ahead = DataLoader(**kw, batch_size=3, prefetch=2)
    for i in range(10):
        a, b = next(sync), next(ahead)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if i in (0, 4, 9):
            time.sleep(0.05)  # let the thread run ahead: the state must still be the one before the last batch
            sa, sb = sync.state_dict(), ahead.state_dict()
            assert sa["rows"] == sb["rows"] == 3 * i
            for v in sa["streams"]:
                for key, value in sa["streams"][v].items():
                    other = sb["streams"][v][key]
                    assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert ahead.tokens_consumed == sync.tokens_consumed and ahead.cropped_fraction == sync.cropped_fraction
    ahead.close()


def test_an_error_in_the_thread_is_raised_with_its_message(kw, monkeypatch):
    real, calls = S.read_row_group, {"n": 0}

    def failing(pf, index, path):
        calls["n"] += 1
        if calls["n"] == 60:  # after the first batches: the streams are filling
            raise UserError(f"shard {path} is corrupt (row group {index} unreadable); re-download it")
        return real(pf, index, path)

    monkeypatch.setattr(S, "read_row_group", failing)
    ld = DataLoader(**kw, batch_size=2, prefetch=3)
    with pytest.raises(UserError, match=r"^shard .* is corrupt \(row group \d+ unreadable\); re-download it$"):
        for _ in range(200):
            next(ld)
    assert calls["n"] == 60
    ld._thread.join(timeout=5)
    assert not ld._thread.is_alive()
    with pytest.raises(StopIteration):
        next(ld)


def test_no_thread_by_default_on_the_cpu(kw):
    ld = DataLoader(**kw, batch_size=2)  # a CPU step keeps every core busy: a thread would only compete with it
    next(ld)
    assert ld.prefetch == 0 and ld._thread is None


def test_the_thread_stops_on_close_and_when_the_loader_is_dropped(kw):
    ld = DataLoader(**kw, batch_size=2, prefetch=2)
    next(ld)
    thread = ld._thread
    assert thread.is_alive() and thread.daemon
    ld.close()
    assert not thread.is_alive()
    ld = DataLoader(**kw, batch_size=2, prefetch=2)
    next(ld)
    thread = ld._thread
    del ld  # no close(): garbage collection stops it (the thread holds no reference to the loader)
    thread.join(timeout=5)
    assert not thread.is_alive()
