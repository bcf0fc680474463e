"""The trainer's only data interface: packed, BOS-aligned token rows whose position is exactly resumable,
on the same or on another number of ranks, produced in a background thread so the step never waits.

The global stream. A split's documents are dealt to V virtual streams (V = `num_streams`; the train
split's default, 48, is divisible by 1, 2, 3, 4, 6, 8, 12, 16, 24 and 48 processes). Each stream has
its own document source, tokenized buffer, packer and position, so it produces the same rows whatever
the world size. Global row j of the stream of rows comes from stream j mod V. Rank r of a world of W
(W must divide V) owns the streams v with v mod W == r and takes global rows r, r+W, r+2W, ... in that
order, `batch_size` rows a batch. So one optimizer step of R rows (W ranks x B rows x A micro-steps)
trains on global rows [s*R, (s+1)*R) whatever W, B and A are, and a resume on any W' dividing V (with
the states of all saved ranks merged: `merge_loader_states`) continues the same global stream: no
document trained twice, none skipped.

Documents reach the streams in units: the row groups of the split's shards counted across its shards
in order. With at least V row groups, stream v reads row groups v, v+V, v+2V, ... whole (no rank reads
another's row groups); with fewer (small corpora), row group u is shared by the streams v with
v mod U == u, which take its documents in turn. The validation split uses one stream per rank
(V = W by default): rank r reads row groups r, r+W, ..., so the union over ranks is the split, once.

A stream tokenizes documents in batches (tiktoken threads), each starting with <|bos|>, into a
buffer of about `buffer_size` documents; `nanotrain.ops.packing.pack_rows` fills ROWS_PER_PACK rows
of T+1 tokens at a time by best fit (the longest buffered document that fits; when none fits, the
shortest is cropped to fill the row), with no padding. inputs = row[:-1], targets = row[1:].

The train split loops forever (each stream counts its own passes: `epoch` is the fewest of this
rank's streams). The val split makes one pass and then raises StopIteration (the last, incomplete
batch is dropped), so each evaluation builds a fresh loader; pass loop=True to cycle it instead.

Prefetching. With `prefetch` > 0 (default: 3 when the batches go to an accelerator, 0 for a CPU run,
whose step already keeps every core busy) a daemon thread reads, tokenizes and packs the next batches
into a queue of that many while the caller trains; each queued batch carries the position before it.
`state_dict()` is the position BEFORE the batch last yielded (before any, the start), so a loader
built from it yields that batch again first: a checkpoint holds loader state only. An error in
the thread (a corrupt shard's UserError, say) is raised by the `next()` that would have returned the
batch it was making, with its own message. `close()` (also on garbage collection) stops the thread.

The state also records the data and tokenizer fingerprints; resuming against other data or another
tokenizer is an error (the stream could not be the same). A tokenizer trained on shards that are no
longer in the data directory (none of its training shards is there with the same size: the directory
was rebuilt) is an error too: its merges were learned on other text. Adding shards after training the
tokenizer (downloading more) is fine.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nanotrain import paths
from nanotrain.data import shards as S
from nanotrain.errors import UserError
from nanotrain.ops.packing import pack_rows

STATE_VERSION = 2
DEFAULT_TRAIN_STREAMS = 48  # divisible by 1, 2, 3, 4, 6, 8, 12, 16, 24, 48
ROWS_PER_PACK = 8  # rows a stream packs per packer call (part of the stream's definition: never change per run)
_OPEN_SHARDS = 4  # parquet files kept open by a loader
# Batches the prefetch thread keeps ready when the step runs on an accelerator. On the CPU the step already uses
# every core, so a thread would only compete with it: there the default is 0 (see benchmarks/RESULTS.md, issue 15).
DEFAULT_PREFETCH = 3


@dataclass(frozen=True)
class _Unit:
    """One row group of one shard: the unit of reading."""
    shard: int  # index into the split's shard list
    row_group: int


def valid_world_sizes(num_streams: int) -> list[int]:
    """The process counts a run with `num_streams` virtual data streams can use (the divisors)."""
    return [w for w in range(1, num_streams + 1) if num_streams % w == 0]


class _Reader:
    """The documents of row groups, with a few shards open at a time."""

    def __init__(self, shards: list[Path], skip_corrupt: bool) -> None:
        self.shards = shards
        self.skip_corrupt = skip_corrupt
        self._open: OrderedDict[int, object] = OrderedDict()

    def texts(self, u: _Unit) -> list[str]:
        try:
            pf = self._open.get(u.shard)
            if pf is None:
                pf = self._open[u.shard] = S.open_shard(self.shards[u.shard])
                if len(self._open) > _OPEN_SHARDS:
                    self._open.popitem(last=False)[1].close()
            self._open.move_to_end(u.shard)
            return S.read_row_group(pf, u.row_group, self.shards[u.shard])
        except UserError as e:
            if not self.skip_corrupt:
                raise
            S.warn(f"skipping: {e}")
            return []

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class _Stream:
    """One virtual data stream: its row groups (documents offset, offset+stride, ... of each), its
    tokenized buffer, its packed rows not yet taken, and its position. The arrays are never changed in
    place (always replaced), so a snapshot (`state`) shares them without copying."""

    def __init__(self, index: int, units: list[_Unit], stride: int, offset: int, loader: "_Producer") -> None:
        self.index, self.units, self.stride, self.offset = index, units, stride, offset
        self.ld = loader
        self.epoch, self.unit, self.doc = 0, 0, offset
        self._texts: list[str] | None = None  # the documents of units[unit] (cached)
        self.empty_units = 0  # consecutive row groups without a document (an empty corpus never ends)
        self.tokens = np.zeros(0, dtype=np.int32)  # the buffer: tokenized, unused documents (CSR, no leading 0)
        self.lengths = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros((0, loader.row_len), dtype=np.int32)  # packed rows not yet taken, in order
        self.tokens_consumed = 0  # tokens of the documents taken into rows (cropped parts included)
        self.tokens_cropped = 0
        self.exhausted = False

    def state(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "doc": self.doc, "empty_units": self.empty_units,
                "buffer_tokens": self.tokens, "buffer_lengths": self.lengths, "rows": self.rows,
                "tokens_consumed": self.tokens_consumed, "tokens_cropped": self.tokens_cropped}

    def load(self, sd: dict) -> None:
        self.epoch, self.unit, self.doc = int(sd["epoch"]), int(sd["unit"]), int(sd["doc"])
        self.empty_units = int(sd["empty_units"])
        self._texts = None
        self.tokens = np.asarray(sd["buffer_tokens"], dtype=np.int32)
        self.lengths = np.asarray(sd["buffer_lengths"], dtype=np.int64)
        self.rows = np.asarray(sd["rows"], dtype=np.int32).reshape(-1, self.ld.row_len)
        self.tokens_consumed, self.tokens_cropped = int(sd["tokens_consumed"]), int(sd["tokens_cropped"])
        self.exhausted = False

    # ---------------------------------------------------------------- reading
    def _next_texts(self, n: int) -> list[str]:
        """Up to n next non-empty documents (fewer only at the end of a non-looping split)."""
        out: list[str] = []
        while len(out) < n:
            if self.unit >= len(self.units):
                if not self.ld.loop:
                    break
                self.epoch, self.unit, self.doc = self.epoch + 1, 0, self.offset
            if self._texts is None:
                self._texts = self.ld.reader.texts(self.units[self.unit])
            texts = self._texts
            idx = range(self.doc, len(texts), self.stride)[:n - len(out)]  # this stream's next documents
            got = [texts[i] for i in idx if texts[i]]
            self.doc += len(idx) * self.stride
            out += got
            if got:
                self.empty_units = 0
            if self.doc >= len(texts):
                self.unit, self.doc, self._texts = self.unit + 1, self.offset, None
                self.empty_units += 1  # row groups finished since the last document (> all of them: no text)
                if self.empty_units > len(self.units):
                    ld = self.ld
                    raise UserError(f"the {ld.split} split of {paths.data_dir(ld.base_dir)} holds no text (empty "
                                    f"corpus) for data stream {self.index} of {ld.num_streams}; add documents and "
                                    "rebuild the shards")
        return out

    def _refill(self, need_tokens: int, min_new: int) -> int:
        """Tokenize documents into the buffer until it holds buffer_size documents and need_tokens tokens
        and at least min_new documents were added. Returns the number added."""
        ld = self.ld
        added = 0
        while len(self.lengths) < ld.buffer_size or self.tokens.size < need_tokens or added < min_new:
            want = max(ld.buffer_size - len(self.lengths), min_new - added, 1)
            if self.tokens.size < need_tokens:
                want = max(want, 16)
            texts = self._next_texts(min(want, 1024))
            if not texts:
                break
            ids = ld.tokenizer.encode(texts, prepend=ld.bos, num_threads=ld.tokenizer_threads)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
            self.tokens = np.concatenate([self.tokens, flat])
            self.lengths = np.concatenate([self.lengths, lengths])
            added += len(texts)
        return added

    def _pack(self) -> None:
        """Pack the next ROWS_PER_PACK rows (fewer only when a non-looping split runs out)."""
        row_len, need = self.ld.row_len, ROWS_PER_PACK
        parts: list[np.ndarray] = []
        min_new = 0
        while need > 0:
            added = self._refill(need * row_len, min_new)
            if (min_new and not added) or not len(self.lengths):  # the split is exhausted
                self.exhausted = True
                break
            offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
            np.cumsum(self.lengths, out=offsets[1:])
            got, consumed, cropped = pack_rows(torch.from_numpy(self.tokens), torch.from_numpy(offsets), need,
                                               row_len)
            used = consumed.numpy()
            self.tokens_consumed += int(self.lengths[used].sum())
            self.tokens_cropped += int(cropped)
            keep = ~used
            self.tokens = self.tokens[np.repeat(keep, self.lengths)]
            self.lengths = self.lengths[keep]
            if got.shape[0]:
                parts.append(got.numpy())
                need -= got.shape[0]
            min_new = 8  # rows were left unfilled: the buffer ran dry, so the next refill must bring new documents
        if parts:
            self.rows = parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_row(self) -> np.ndarray | None:
        """The stream's next row (T+1 tokens), or None when a non-looping split has run out."""
        if not len(self.rows) and not self.exhausted:
            self._pack()
        if not len(self.rows):
            return None
        row, self.rows = self.rows[0], self.rows[1:]
        return row


class _Producer:
    """The streams this rank owns and the order it takes rows from them (everything the worker thread touches)."""

    def __init__(self, *, tokenizer, batch_size: int, row_len: int, split: str, base_dir, rank: int,
                 world_size: int, num_streams: int, buffer_size: int, loop: bool, tokenizer_threads: int,
                 reader: _Reader, units: list[_Unit]) -> None:
        self.tokenizer, self.bos = tokenizer, tokenizer.bos_token_id
        self.batch_size, self.row_len = batch_size, row_len
        self.split, self.base_dir = split, base_dir
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.buffer_size, self.loop, self.tokenizer_threads = buffer_size, loop, tokenizer_threads
        self.reader = reader
        self.streams = {v: self._make_stream(v, units) for v in range(rank, num_streams, world_size)}
        self.rows_taken = 0  # rows this rank has taken: global rows rank, rank+W, ... below rank + rows_taken*W

    def _make_stream(self, v: int, units: list[_Unit]) -> _Stream:
        V, U = self.num_streams, len(units)
        if U >= V:
            return _Stream(v, units[v::V], 1, 0, self)
        sharing = len(range(v % U, V, U))  # the streams that share row group v mod U take its documents in turn
        return _Stream(v, [units[v % U]], sharing, v // U, self)

    def next_batch(self) -> tuple[np.ndarray, dict]:
        """B rows (B, T+1) int32 in this rank's global order and the statistics after them; StopIteration when a
        non-looping split runs out (the incomplete batch is dropped)."""
        out = np.empty((self.batch_size, self.row_len), dtype=np.int32)
        for i in range(self.batch_size):
            g = self.rank + (self.rows_taken + i) * self.world_size  # the global row index
            row = self.streams[g % self.num_streams].next_row()
            if row is None:
                raise StopIteration
            out[i] = row
        self.rows_taken += self.batch_size
        return out, self.stats()

    def stats(self) -> dict:
        ss = self.streams.values()
        return {"epoch": min(s.epoch for s in ss), "tokens_consumed": sum(s.tokens_consumed for s in ss),
                "tokens_cropped": sum(s.tokens_cropped for s in ss), "rows": self.rows_taken * self.world_size}

    def snapshot(self) -> dict:
        """The position now (arrays shared, not copied: streams replace their arrays, never write into them)."""
        return {"rows": self.rows_taken * self.world_size,
                "streams": {v: s.state() for v, s in self.streams.items()}}


_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _work(producer: _Producer, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: fill `out` with (state before, rows, stats after) until stopped or the split ends."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            before = producer.snapshot()
            rows, after = producer.next_batch()
            if not put((before, rows, after)):
                return
    except StopIteration:
        put(_END)
    except BaseException as e:  # handed to the main thread, which raises it
        put(_Failure(e))
    finally:
        producer.reader.close()


class DataLoader:
    """Iterate (inputs, targets), both (B, T) int64 on `device`; see the module doc."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 device: torch.device | str = "cpu", *, base_dir: str | os.PathLike | None = None, rank: int = 0,
                 world_size: int = 1, buffer_size: int = 256, state: dict | None = None, skip_corrupt: bool = False,
                 loop: bool | None = None, tokenizer_threads: int = 8, num_streams: int | None = None,
                 prefetch: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size} process(es)")
        if buffer_size < 1:
            raise UserError(f"buffer_size must be >= 1, got {buffer_size}")
        if prefetch is None:
            prefetch = 0 if torch.device(device).type == "cpu" else DEFAULT_PREFETCH
        if prefetch < 0:
            raise UserError(f"prefetch must be >= 0 batches, got {prefetch}")
        if state is not None and num_streams is None:
            num_streams = state.get("num_streams")  # a resume keeps the run's streams
        if num_streams is None:
            num_streams = DEFAULT_TRAIN_STREAMS if split == "train" else world_size
        if num_streams < 1:
            raise UserError(f"num_streams must be >= 1, got {num_streams}")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split = split
        self.device = torch.device(device)
        self.base_dir = base_dir
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.buffer_size = buffer_size
        self.skip_corrupt = skip_corrupt
        self.loop = (split == "train") if loop is None else loop
        self.prefetch = prefetch

        self.shards: list[Path] = S.split_shards(split, base_dir)
        self.data_fingerprint = S.data_fingerprint(base_dir)
        self._check_tokenizer()
        units = []
        for i, path in enumerate(self.shards):  # footers only: early errors, exact rank balance
            try:
                n = S.count_row_groups(path)
            except UserError as e:
                if not skip_corrupt or "text` column" in str(e):
                    raise
                S.warn(f"skipping {path}: {e}")
                continue
            units += [_Unit(i, g) for g in range(n)]
        self.num_row_groups = len(units)
        if len(units) < world_size and (self.loop or not units):
            have = f"{len(units)} row group(s)" if units else "no readable row groups"
            raise UserError(f"the {split} split of {paths.data_dir(base_dir)} has {have}, too few for "
                            f"{world_size} rank(s); add data or use fewer ranks")
        if num_streams % world_size:
            raise UserError(f"{world_size} processes cannot share the {num_streams} data streams of this run "
                            f"evenly; use one of {', '.join(map(str, valid_world_sizes(num_streams)))} processes")
        self._producer = _Producer(
            tokenizer=tokenizer, batch_size=batch_size, row_len=seq_len + 1, split=split, base_dir=base_dir, rank=rank,
            world_size=world_size, num_streams=num_streams, buffer_size=buffer_size, loop=self.loop,
            tokenizer_threads=tokenizer_threads, reader=_Reader(self.shards, skip_corrupt), units=units)
        self.units: list[_Unit] = sorted({u for s in self._producer.streams.values() for u in s.units},
                                         key=lambda u: (u.shard, u.row_group))
        if state is not None:
            self.load_state_dict(state)
        self._last_state = self._producer.snapshot()  # before the batch last yielded (the start, until one is)
        self._last_stats = self._producer.stats()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ended = False

    # ------------------------------------------------------------------ checks
    def _check_tokenizer(self) -> None:
        trained_on = (getattr(self.tokenizer, "meta", None) or {}).get("training_shards")
        if not trained_on:
            return
        present = {tuple(x) for x in S.shard_signature(S.list_shards(self.base_dir))}
        if not present & {tuple(x) for x in trained_on}:
            raise UserError(f"the tokenizer was trained on other shards than those in {paths.data_dir(self.base_dir)} "
                            "(the data directory was rebuilt since); run `nanotrain-data tokenizer` again")

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "DataLoader":
        return self

    def _next_item(self) -> tuple[dict, np.ndarray, dict]:
        if self._ended:
            raise StopIteration
        if self.prefetch == 0:
            before = self._producer.snapshot()
            try:
                rows, after = self._producer.next_batch()
            except StopIteration:
                self._ended = True
                raise
            return before, rows, after
        if self._thread is None:
            if self._stop.is_set():
                raise RuntimeError("this DataLoader was closed")
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=_work, args=(self._producer, self._queue, self._stop),
                                            name=f"nanotrain-data-{self.split}-rank{self.rank}", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._ended = True
            raise item.error
        return item

    def __next__(self) -> tuple[Tensor, Tensor]:
        before, rows, after = self._next_item()
        self._last_state, self._last_stats = before, after
        B, T = self.batch_size, self.seq_len
        cuda = self.device.type == "cuda"
        src = torch.from_numpy(rows)
        host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=cuda)
        host[0].copy_(src[:, :-1])
        host[1].copy_(src[:, 1:])
        out = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host  # one copy per batch
        return out[0], out[1]

    def close(self) -> None:
        """Stop the prefetch thread (batches it made ahead are dropped) and close the open shards."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        else:
            self._producer.reader.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()  # the thread sees it within 0.1 s and exits (it holds no reference to this object)

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ progress (as of the batch last yielded)
    @property
    def epoch(self) -> int:
        """Passes over the split completed by this rank's slowest stream."""
        return self._last_stats["epoch"]

    @property
    def tokens_consumed(self) -> int:
        """Tokens of the documents taken into rows so far (cropped parts included)."""
        return self._last_stats["tokens_consumed"]

    @property
    def tokens_cropped(self) -> int:
        return self._last_stats["tokens_cropped"]

    @property
    def rows(self) -> int:
        """Global rows taken by all ranks together (this rank's rows times the world size)."""
        return self._last_stats["rows"]

    @property
    def cropped_fraction(self) -> float:
        """Cropped tokens / tokens of the documents consumed so far (0 before the first batch)."""
        return self.tokens_cropped / self.tokens_consumed if self.tokens_consumed else 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The position before the batch last yielded (plain types and CPU tensors): a loader built from it
        yields that batch first. Merge every rank's state with merge_loader_states to resume on another world
        size."""
        snap = self._last_state
        streams = {}
        for v, s in snap["streams"].items():
            streams[v] = {k: (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x)
                          for k, x in s.items()}
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "num_streams": self.num_streams, "seq_len": self.seq_len, "buffer_size": self.buffer_size,
            "rows_per_pack": ROWS_PER_PACK, "rows": snap["rows"],
            "epoch": min(s["epoch"] for s in streams.values()), "streams": streams,
            "data_fingerprint": self.data_fingerprint,
            "tokenizer_fingerprint": getattr(self.tokenizer, "fingerprint", None),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a state_dict() of this rank, or from merge_loader_states() of every saved rank (see the
        module doc for what must match)."""
        if getattr(self, "_thread", None) is not None:
            raise RuntimeError("load_state_dict on a DataLoader whose prefetch thread runs; build a new DataLoader "
                               "with state=...")
        if sd.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {sd.get('version')} is not supported (expected "
                            f"{STATE_VERSION}); start the data stream fresh")
        if sd["split"] != self.split:
            raise UserError(f"the saved data loader state is for split={sd['split']!r}, this loader has "
                            f"{self.split!r}; resume with the same split")
        for key, mine in (("num_streams", self.num_streams), ("seq_len", self.seq_len),
                          ("buffer_size", self.buffer_size), ("rows_per_pack", ROWS_PER_PACK)):
            if sd[key] != mine:
                raise UserError(f"the saved data loader state has {key}={sd[key]!r}, this loader has {mine!r}; "
                                f"resume with the same {key.replace('_', ' ')}")
        if sd["data_fingerprint"] != self.data_fingerprint:
            raise UserError(f"the shards in {paths.data_dir(self.base_dir)} changed since the loader state was saved "
                            "(files added, removed or rewritten); restore them to resume the exact data stream")
        if sd["tokenizer_fingerprint"] != getattr(self.tokenizer, "fingerprint", None):
            raise UserError("the tokenizer changed since the loader state was saved; resume with the tokenizer the "
                            "run started with")
        p = self._producer
        missing = sorted(set(p.streams) - set(sd["streams"]))
        if missing:
            raise UserError(f"the saved data loader state is for rank={sd['rank']} of {sd['world_size']} and lacks "
                            f"data stream(s) {', '.join(map(str, missing[:8]))} of rank {self.rank} of "
                            f"{self.world_size}; resume from the states of every saved rank (merge_loader_states)")
        rows = int(sd["rows"])
        if rows % self.world_size:
            raise UserError(f"the saved data stream stopped after {rows} rows, which {self.world_size} ranks cannot "
                            f"split evenly; resume with one of {', '.join(map(str, _divisors(rows, self.num_streams)))}"
                            " processes")
        for v, s in p.streams.items():
            s.load(sd["streams"][v])
        p.rows_taken = rows // self.world_size
        self._last_state = p.snapshot()
        self._last_stats = p.stats()


def _divisors(rows: int, num_streams: int) -> list[int]:
    return [w for w in valid_world_sizes(num_streams) if rows % w == 0]


def merge_loader_states(states: list[dict]) -> dict:
    """One loader state holding every stream, from the state_dict() of every rank of a run (any order), which a
    DataLoader of any world size dividing num_streams resumes from (each rank takes the streams it now owns).
    Raises UserError when a rank is missing or the states are not of the same moment of the same run."""
    if not states:
        raise UserError("no data loader state to merge; resume from a checkpoint written by nanotrain")
    first = states[0]
    world = first["world_size"]
    if sorted(s["rank"] for s in states) != list(range(world)):
        raise UserError(f"the data loader states are of ranks {sorted(s['rank'] for s in states)} and the run had "
                        f"{world}; pass the state of every rank")
    for key in ("version", "split", "world_size", "num_streams", "seq_len", "buffer_size", "rows_per_pack", "rows",
                "data_fingerprint", "tokenizer_fingerprint"):
        values = {repr(s.get(key)) for s in states}
        if len(values) > 1:
            raise UserError(f"the data loader states of the ranks differ in {key} ({', '.join(sorted(values))}); "
                            "they are not of the same checkpoint: resume from one checkpoint's files")
    streams: dict = {}
    for s in states:
        streams.update(s["streams"])
    if sorted(streams) != list(range(first["num_streams"])):
        raise UserError(f"the data loader states hold {len(streams)} of the run's {first['num_streams']} data "
                        "streams; pass the state of every rank")
    return dict(first, rank=0, world_size=1, streams=streams, epoch=min(s["epoch"] for s in states))
