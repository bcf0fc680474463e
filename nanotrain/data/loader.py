"""The trainer's only data interface: packed, BOS-aligned token rows with an exactly resumable state.

Documents stream from the shards of a split (train: all shards but the last; val: the last) one
row group at a time. Rank r of a world of W reads row groups r, r+W, r+2W, ... of the split's row
groups counted across its shards in order, so ranks see disjoint documents. Documents are
tokenized in batches (tiktoken threads), each starting with <|bos|>, into a buffer of about
`buffer_size` documents; `nanotrain.ops.packing.pack_rows` fills rows of T+1 tokens by best fit
(the longest buffered document that fits; when none fits, the shortest is cropped to fill the row),
with no padding. inputs = row[:-1], targets = row[1:].

The train split loops forever (the epoch counts the passes). The val split makes one pass and then
raises StopIteration (the last, incomplete batch is dropped), so each evaluation builds a fresh
loader; pass loop=True to cycle it instead.

`state_dict()` holds the position (epoch, row group, document within it) and the tokenized
documents still buffered, as they were BEFORE the batch the loader last yielded: `DataLoader(...,
state=sd)` yields that batch again first, then exactly the batches the original loader yields next.
A trainer that has drawn the next step's batch ahead of time thus saves loader state only, never a
held-back batch of tensors. The state also records the data and tokenizer fingerprints;
resuming against other data or another tokenizer is an error (the stream could not be the same).

A tokenizer trained on shards that are no longer in the data directory (none of its training
shards is there with the same size: the directory was rebuilt) is an error too: its merges were
learned on other text. Adding shards after training the tokenizer (downloading more) is fine.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nanotrain import paths
from nanotrain.data import shards as S
from nanotrain.errors import UserError
from nanotrain.ops.packing import pack_rows

STATE_VERSION = 1


@dataclass(frozen=True)
class _Unit:
    """One row group of one shard: the unit of reading and of rank sharding."""
    shard: int  # index into the split's shard list
    row_group: int


class DataLoader:
    """Iterate (inputs, targets), both (B, T) int64 on `device`; see the module doc."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 device: torch.device | str = "cpu", *, base_dir: str | os.PathLike | None = None, rank: int = 0,
                 world_size: int = 1, buffer_size: int = 1000, state: dict | None = None, skip_corrupt: bool = False,
                 loop: bool | None = None, tokenizer_threads: int = 8):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size} process(es)")
        if buffer_size < 1:
            raise UserError(f"buffer_size must be >= 1, got {buffer_size}")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.split = split
        self.device = torch.device(device)
        self.base_dir = base_dir
        self.rank, self.world_size = rank, world_size
        self.buffer_size = buffer_size
        self.skip_corrupt = skip_corrupt
        self.loop = (split == "train") if loop is None else loop
        self.tokenizer_threads = tokenizer_threads
        self.bos = tokenizer.bos_token_id

        self.shards: list[Path] = S.split_shards(split, base_dir)
        self.data_fingerprint = S.data_fingerprint(base_dir)
        self._check_tokenizer()
        self._pf: tuple[int, object] | None = None  # the open shard (one file handle at a time)
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
        self.units = units[rank::world_size]
        if not self.units and (self.loop or not units):
            have = f"{len(units)} row group(s)" if units else "no readable row groups"
            raise UserError(f"the {split} split of {paths.data_dir(base_dir)} has {have}, too few for "
                            f"{world_size} rank(s); add data or use fewer ranks")

        # position: the next document is document `doc` of row group units[unit], in pass `epoch`
        self.epoch, self.unit, self.doc = 0, 0, 0
        self._texts: list[str] | None = None  # the documents of units[unit] (cached)
        self._empty_units = 0  # consecutive row groups without a document (an empty corpus never ends)
        # the buffer: tokenized, unused documents in order (CSR without the leading 0)
        self._tokens = np.zeros(0, dtype=np.int32)
        self._lengths = np.zeros(0, dtype=np.int64)
        self.tokens_consumed = 0  # tokens of the documents taken into rows (cropped parts included)
        self.tokens_cropped = 0
        self.batches = 0
        self._before_last: dict | None = None  # the position before the last yielded batch (see state_dict)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ checks and reading
    def _check_tokenizer(self) -> None:
        trained_on = (getattr(self.tokenizer, "meta", None) or {}).get("training_shards")
        if not trained_on:
            return
        present = {tuple(x) for x in S.shard_signature(S.list_shards(self.base_dir))}
        if not present & {tuple(x) for x in trained_on}:
            raise UserError(f"the tokenizer was trained on other shards than those in {paths.data_dir(self.base_dir)} "
                            "(the data directory was rebuilt since); run `nanotrain-data tokenizer` again")

    def _open(self, i: int):
        if self._pf is None or self._pf[0] != i:
            if self._pf is not None:
                self._pf[1].close()
            self._pf = (i, S.open_shard(self.shards[i]))
        return self._pf[1]

    def _unit_texts(self) -> list[str]:
        if self._texts is None:
            u = self.units[self.unit]
            try:
                self._texts = S.read_row_group(self._open(u.shard), u.row_group, self.shards[u.shard])
            except UserError as e:
                if not self.skip_corrupt:
                    raise
                S.warn(f"skipping: {e}")
                self._texts = []
        return self._texts

    def _next_texts(self, n: int) -> list[str]:
        """Up to n next non-empty documents of this rank (fewer only at the end of a non-looping split)."""
        out: list[str] = []
        while len(out) < n:
            if self.unit >= len(self.units):
                if not self.loop:
                    break
                self.epoch, self.unit, self.doc = self.epoch + 1, 0, 0
            texts = self._unit_texts()
            take = texts[self.doc:self.doc + n - len(out)]
            self.doc += len(take)
            got = [t for t in take if t]
            out += got
            if got:
                self._empty_units = 0
            if self.doc >= len(texts):
                self.unit, self.doc, self._texts = self.unit + 1, 0, None
                self._empty_units += 1  # row groups finished since the last document (> all of them: no text)
                if self._empty_units > len(self.units):
                    raise UserError(f"the {self.split} split of {paths.data_dir(self.base_dir)} holds no text "
                                    f"(empty corpus) for rank {self.rank}; add documents and rebuild the shards")
        return out

    def _refill(self, need_tokens: int, min_new: int) -> int:
        """Tokenize documents into the buffer until it holds buffer_size documents and need_tokens tokens
        and at least min_new documents were added. Returns the number added."""
        added = 0
        while len(self._lengths) < self.buffer_size or self._tokens.size < need_tokens or added < min_new:
            want = max(self.buffer_size - len(self._lengths), min_new - added, 1)
            if self._tokens.size < need_tokens:
                want = max(want, 16)
            texts = self._next_texts(min(want, 1024))
            if not texts:
                break
            ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
            self._tokens = np.concatenate([self._tokens, flat])
            self._lengths = np.concatenate([self._lengths, lengths])
            added += len(texts)
        return added

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        before = self._position()
        rows = self._next_rows()  # (B, T+1) int32
        self._before_last = before
        B, T = self.batch_size, self.seq_len
        cuda = self.device.type == "cuda"
        host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=cuda)
        host[0].copy_(rows[:, :-1])
        host[1].copy_(rows[:, 1:])
        out = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host  # one copy per batch
        self.batches += 1
        return out[0], out[1]

    def _next_rows(self) -> Tensor:
        """B packed rows of T+1 tokens (int32, on the CPU); StopIteration at the end of a non-looping split."""
        row_len, need = self.seq_len + 1, self.batch_size
        parts: list[Tensor] = []
        min_new = 0
        while need > 0:
            added = self._refill(need * row_len, min_new)
            if min_new and not added:  # the split is exhausted: drop the incomplete batch
                raise StopIteration
            if not len(self._lengths):
                raise StopIteration
            offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
            np.cumsum(self._lengths, out=offsets[1:])
            got, consumed, cropped = pack_rows(torch.from_numpy(self._tokens), torch.from_numpy(offsets), need,
                                               row_len)
            used = consumed.numpy()
            self.tokens_consumed += int(self._lengths[used].sum())
            self.tokens_cropped += int(cropped)
            keep = ~used
            self._tokens = self._tokens[np.repeat(keep, self._lengths)]
            self._lengths = self._lengths[keep]
            if got.shape[0]:
                parts.append(got)
                need -= got.shape[0]
            min_new = 8  # rows were left unfilled: the buffer ran dry, so the next refill must bring new documents
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def cropped_fraction(self) -> float:
        """Cropped tokens / tokens of the documents consumed so far (0 before the first batch)."""
        return self.tokens_cropped / self.tokens_consumed if self.tokens_consumed else 0.0

    # ------------------------------------------------------------------ state
    def _position(self) -> dict:
        """The stream position now. Cheap: the buffer arrays are referenced, not copied (every update of the
        buffer replaces the arrays, none writes into them)."""
        return {"epoch": self.epoch, "unit": self.unit, "doc": self.doc, "tokens": self._tokens,
                "lengths": self._lengths, "tokens_consumed": self.tokens_consumed,
                "tokens_cropped": self.tokens_cropped, "batches": self.batches, "empty_units": self._empty_units}

    def state_dict(self) -> dict:
        """The position before the batch last yielded (now, before the first batch), in plain types and two CPU
        tensors: a loader built from it yields that batch again, then continues the exact same stream."""
        pos = self._before_last or self._position()
        u = self.units[pos["unit"]] if pos["unit"] < len(self.units) else None
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "epoch": pos["epoch"], "unit": pos["unit"], "doc": pos["doc"],
            "shard": self.shards[u.shard].name if u else None, "row_group": u.row_group if u else None,
            "buffer_tokens": torch.from_numpy(pos["tokens"].copy()),
            "buffer_lengths": torch.from_numpy(pos["lengths"].copy()),
            "tokens_consumed": pos["tokens_consumed"], "tokens_cropped": pos["tokens_cropped"],
            "batches": pos["batches"], "empty_units": pos["empty_units"],
            "data_fingerprint": self.data_fingerprint,
            "tokenizer_fingerprint": getattr(self.tokenizer, "fingerprint", None),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a state_dict() (see the module doc for what must match)."""
        if sd.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {sd.get('version')} is not supported (expected "
                            f"{STATE_VERSION}); start the data stream fresh")
        for key, mine in (("split", self.split), ("rank", self.rank), ("world_size", self.world_size)):
            if sd[key] != mine:
                raise UserError(f"the saved data loader state is for {key}={sd[key]!r}, this loader has {mine!r}; "
                                f"resume with the same {key.replace('_', ' ')}")
        if sd["data_fingerprint"] != self.data_fingerprint:
            raise UserError(f"the shards in {paths.data_dir(self.base_dir)} changed since the loader state was saved "
                            "(files added, removed or rewritten); restore them to resume the exact data stream")
        if sd["tokenizer_fingerprint"] != getattr(self.tokenizer, "fingerprint", None):
            raise UserError("the tokenizer changed since the loader state was saved; resume with the tokenizer the "
                            "run started with")
        self.epoch, self.unit, self.doc = int(sd["epoch"]), int(sd["unit"]), int(sd["doc"])
        self._texts = None
        self._empty_units = int(sd.get("empty_units", 0))
        self._tokens = sd["buffer_tokens"].numpy().astype(np.int32, copy=True)
        self._lengths = sd["buffer_lengths"].numpy().astype(np.int64, copy=True)
        self.tokens_consumed, self.tokens_cropped = int(sd["tokens_consumed"]), int(sd["tokens_cropped"])
        self.batches = int(sd["batches"])
        self._before_last = None
