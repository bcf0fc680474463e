"""Best-fit packing of tokenized documents into BOS-aligned training rows (the data loader's hot loop).

Input: a buffer of D documents in CSR layout, `tokens` (N,) int32 and `offsets` (D+1,) int64
(document i is tokens[offsets[i]:offsets[i+1]], each starting with BOS and at least 1 token long).
Output: up to `num_rows` rows of exactly `row_len` tokens, no padding. Each row is filled by
repeating, until it is full:
  1. take whole the longest unused document that fits in the space left (ties: the lowest index);
  2. if none fits, take the shortest unused document (ties: lowest index), put its first
     `space left` tokens in the row (filling it) and discard the rest (counted as cropped).
If the unused documents run out before a row is full, that row is abandoned: its documents stay
unused, its crop is not counted, and the call returns the rows completed so far. The caller
refills the buffer (keeping the unused documents in order) and calls again.

Returns (rows (R, row_len) int32 with R <= num_rows, consumed (D,) bool, cropped () int64).

Backends: the C++ packer of nanotrain._C where built (the `nanotrain::best_fit_pack` op, defined by the
extension with TORCH_LIBRARY, its fake in _ext.py), then `reference` (Python). The packer is exact, so it
has no self-check: its tests compare it with the reference bit for bit. A loader resolves its packer once
(`resolve`); `pack_rows` resolves on each call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nanotrain.ops import registry


def _check(tokens: Tensor, offsets: Tensor, num_rows: int, row_len: int) -> None:
    if tokens.dtype != torch.int32 or tokens.dim() != 1:
        raise ValueError(f"pack_rows: tokens must be a 1-D int32 tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"pack_rows: offsets must be a 1-D int64 tensor of D+1 entries, got {offsets.dtype}")
    if num_rows < 0 or row_len < 1:
        raise ValueError(f"pack_rows: need num_rows >= 0 and row_len >= 1, got {num_rows}, {row_len}")


def reference(tokens: Tensor, offsets: Tensor, num_rows: int, row_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """The packing rule of the module doc, written plainly in Python."""
    _check(tokens, offsets, num_rows, row_len)
    toks = tokens.numpy()
    offs = offsets.tolist()
    lengths = [offs[i + 1] - offs[i] for i in range(len(offs) - 1)]
    alive = [True] * len(lengths)
    rows = torch.empty((num_rows, row_len), dtype=torch.int32)
    out = rows.numpy()
    cropped = 0
    done = 0
    for r in range(num_rows):
        pos, used, row_crop = 0, [], 0
        while pos < row_len:
            space = row_len - pos
            best = -1
            for i, n in enumerate(lengths):
                if alive[i] and n <= space and (best < 0 or n > lengths[best]):
                    best = i
            if best < 0:  # nothing fits: crop the shortest
                for i, n in enumerate(lengths):
                    if alive[i] and (best < 0 or n < lengths[best]):
                        best = i
            if best < 0:  # buffer exhausted: abandon this row
                for i in used:
                    alive[i] = True
                return rows[:done], torch.tensor([not a for a in alive], dtype=torch.bool), torch.tensor(cropped)
            take = min(lengths[best], space)
            out[r, pos:pos + take] = toks[offs[best]:offs[best] + take]
            row_crop += lengths[best] - take
            alive[best] = False
            used.append(best)
            pos += take
        cropped += row_crop
        done += 1
    return rows[:done], torch.tensor([not a for a in alive], dtype=torch.bool), torch.tensor(cropped)


def pack_rows(tokens: Tensor, offsets: Tensor, num_rows: int, row_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best-fit pack documents into rows through the fastest available backend, resolved on this call."""
    return resolve(tokens.device, tokens.dtype)(tokens, offsets, num_rows, row_len)


def resolve(device: torch.device | str = "cpu", dtype: torch.dtype = torch.int32,
            ) -> Callable[[Tensor, Tensor, int, int], tuple[Tensor, Tensor, Tensor]]:
    """The packer that serves token buffers of this device and dtype (the C++ one where built), chosen now."""
    return registry.resolve("packing", device, dtype).fn


def _cpp(tokens: Tensor, offsets: Tensor, num_rows: int, row_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """The C++ packer of nanotrain._C (csrc/data/best_fit_pack.cpp): the reference's rule, O(log) per pick."""
    _check(tokens, offsets, num_rows, row_len)
    return torch.ops.nanotrain.best_fit_pack(tokens, offsets, num_rows, row_len)


def _cpp_check(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    from nanotrain.ops import _ext

    if device.type != "cpu":
        return f"the C++ packer runs on CPU tensors, not {device.type}"
    if not _ext.has_op("best_fit_pack"):
        return f"nanotrain._C is {_ext.extension_status()}" if _ext.load_extension() is None else \
            f"nanotrain._C has no best_fit_pack op: {_ext.REINSTALL}"
    return None


registry.register("packing", "cpp", _cpp, _cpp_check, description="C++ best-fit packer (nanotrain._C)")
registry.register("packing", "reference", reference, description="pure-Python best-fit packer")
