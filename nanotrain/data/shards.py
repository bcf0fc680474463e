"""The shard layout every data command shares: parquet files with a `text` column in one directory.

`<base>/base_data/shard_NNNNN.parquet`, sorted by name; the last shard is the validation split and
all the others are the training split (nanochat's layout, so its ClimbMix shards work unchanged).
A marker file `nanotrain_source.json` records which command wrote the directory, so `sample` and
`build` can replace their own shards but never silently delete downloaded ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanotrain import paths
from nanotrain.errors import UserError

SOURCE_FILE = "nanotrain_source.json"
NO_SHARDS_HINT = "run `nanotrain-data sample` (offline) or `nanotrain-data download`"


def shard_name(index: int) -> str:
    """File name of shard `index` (nanochat's naming)."""
    return f"shard_{index:05d}.parquet"


def list_shards(base_dir: str | os.PathLike | None = None) -> list[Path]:
    """All parquet shards of the data directory, sorted by name (the last one is validation)."""
    d = paths.data_dir(base_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(".parquet") and p.is_file())


def require_shards(base_dir: str | os.PathLike | None = None) -> list[Path]:
    """`list_shards`, but a UserError when there are fewer than two (one train, one validation)."""
    shards = list_shards(base_dir)
    d = paths.data_dir(base_dir)
    if not shards:
        raise UserError(f"no shards found in {d}; {NO_SHARDS_HINT}")
    if len(shards) < 2:
        raise UserError(f"only one shard in {d} (need one for training and the last for validation); "
                        f"{NO_SHARDS_HINT}")
    return shards


def split_shards(split: str, base_dir: str | os.PathLike | None = None) -> list[Path]:
    """The shards of a split: "train" = all but the last, "val" = the last."""
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'val'")
    shards = require_shards(base_dir)
    return shards[:-1] if split == "train" else shards[-1:]


def shard_signature(shards: Iterable[Path]) -> list[list]:
    """[[name, size], ...]: what the cheap fingerprints are made of."""
    return [[p.name, p.stat().st_size] for p in shards]


def fingerprint_of(signature: list[list]) -> str:
    """A short hash of a shard signature."""
    blob = json.dumps(signature, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_fingerprint(base_dir: str | os.PathLike | None = None) -> str:
    """A cheap identity of the data directory: hash of the shard names and sizes (no file is read)."""
    return fingerprint_of(shard_signature(list_shards(base_dir)))


# ----------------------------------------------------------------------------- reading

def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard and check it has a `text` column; a one-line UserError when it is corrupt or truncated."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corrupt or truncated parquet file {path} ({_short(e)}); delete it and fetch or "
                        "build it again") from None
    if pf.schema_arrow.get_field_index("text") < 0:
        raise UserError(f"shard {path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)}); "
                        "shards need one document per row in a `text` column")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}: its `text` column holds {kind}, not strings; shards need one document per row "
                        "as a string in a `text` column")
    return pf


def count_row_groups(path: Path) -> int:
    """Row groups of a shard, checked as by open_shard; the file is closed again (no handle kept)."""
    pf = open_shard(path)
    try:
        return pf.num_row_groups
    finally:
        pf.close()


def read_row_group(pf: pq.ParquetFile, index: int, path: Path) -> list[str]:
    """The documents of one row group (None rows become "")."""
    try:
        table = pf.read_row_group(index, columns=["text"])
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corrupt parquet file {path}: row group {index} is unreadable ({_short(e)}); "
                        "delete it and fetch or build it again") from None
    return [t or "" for t in table.column("text").to_pylist()]


def is_intact(path: Path) -> bool:
    """True when the file is a parquet file whose footer can be read (the test for a complete download)."""
    try:
        pq.ParquetFile(path).close()
        return True
    except Exception:
        return False


def iter_documents(split: str, base_dir: str | os.PathLike | None = None, *, doc_cap: int | None = None,
                   max_chars: int | None = None) -> Iterator[str]:
    """Documents of a split in shard order (for tokenizer training and statistics).

    doc_cap crops each document to its first doc_cap characters; max_chars stops after that many
    characters in total.
    """
    total = 0
    for path in split_shards(split, base_dir):
        pf = open_shard(path)
        try:
            for rg in range(pf.num_row_groups):
                for text in read_row_group(pf, rg, path):
                    if not text:
                        continue
                    if doc_cap is not None and len(text) > doc_cap:
                        text = text[:doc_cap]
                    if max_chars is not None and total + len(text) > max_chars:
                        text = text[:max_chars - total]
                        if text:
                            yield text
                        return
                    total += len(text)
                    yield text
        finally:
            pf.close()


# ----------------------------------------------------------------------------- writing

def read_source(base_dir: str | os.PathLike | None = None) -> dict | None:
    """The marker written by the command that filled the data directory, if any."""
    p = paths.data_dir(base_dir) / SOURCE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_source(base_dir: str | os.PathLike | None, info: dict) -> None:
    d = paths.data_dir(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (SOURCE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, d / SOURCE_FILE)


def prepare_data_dir(base_dir: str | os.PathLike | None, source: str, force: bool, *,
                     check_only: bool = False) -> Path:
    """Make the data directory ready for `source` ("sample", "build", "download").

    sample/build replace shards written by sample/build; shards from another source (a download,
    or files put there by hand) are only replaced with --force, so no download is lost by accident.
    check_only: raise the UserError a refusal gives, but delete nothing (sample and build leave the
    replacing to write_shards, so that a failed or interrupted run keeps the previous shards).
    """
    d = paths.data_dir(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    existing = list_shards(base_dir)
    marker = read_source(base_dir)
    prev = marker.get("source") if marker else None
    if not existing:
        return d
    if source == "download":
        # downloads add to downloaded (or hand-placed, same naming) shards and skip the intact ones
        replace = prev in ("sample", "build")
    else:
        replace = True
        if prev not in ("sample", "build") and not force:
            raise UserError(f"{d} already holds {len(existing)} shard(s) from {prev or 'elsewhere'}; pass --force "
                            "to replace them, or choose another --base-dir")
    if replace:
        if source == "download" and not force:
            raise UserError(f"{d} holds {len(existing)} shard(s) made by `nanotrain-data {prev}`; pass --force to "
                            "replace them with downloaded shards, or choose another --base-dir")
        if check_only:
            return d
        for p in existing:
            p.unlink()
        (d / SOURCE_FILE).unlink(missing_ok=True)
    return d


def plan_shards(n_docs: int, docs_per_shard: int) -> list[tuple[int, int]]:
    """(start, stop) document ranges of the shards: training shards of docs_per_shard documents, then
    one validation shard of min(docs_per_shard, max(1, n_docs // 10)) documents. Always >= 2 shards."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} document(s); need at least 2 (one for training, one for "
                        "validation): add more text")
    if docs_per_shard < 1:
        raise UserError(f"--docs-per-shard must be >= 1, got {docs_per_shard}")
    n_val = min(docs_per_shard, max(1, n_docs // 10))
    n_train = n_docs - n_val
    ranges = [(s, min(s + docs_per_shard, n_train)) for s in range(0, n_train, docs_per_shard)]
    return ranges + [(n_train, n_docs)]


def write_shard(docs: list[str], path: Path, row_groups: int = 16) -> None:
    """Write one shard atomically (temp file, then rename), split into about `row_groups` row groups so
    that ranks of a data-parallel run can share it."""
    rg_size = max(1, min(1024, math.ceil(len(docs) / row_groups)))
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=rg_size, compression="zstd")
    os.replace(tmp, path)


def write_shards(docs: list[str], base_dir: str | os.PathLike | None, docs_per_shard: int,
                 source: dict) -> list[Path]:
    """Write `docs` (already in their final order) as the shards of the data directory, the last one
    validation, replacing every shard there, and the source marker. Returns the shard paths.

    The new shards are written into a hidden staging folder first and then renamed into place, so a
    run that fails or is interrupted while writing leaves the previous shards as they were (never a
    few new shards whose last one, a training shard, would pass for the validation split).
    """
    d = paths.data_dir(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(len(docs), docs_per_shard)
    for old in d.glob(".staging-*"):  # left by a run that was killed while writing
        shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=d))
    try:
        for i, (a, b) in enumerate(plan):
            write_shard(docs[a:b], stage / shard_name(i))
        for p in list_shards(base_dir):  # from here on only deletes and renames: milliseconds
            p.unlink()
        (d / SOURCE_FILE).unlink(missing_ok=True)
        out = []
        for i in range(len(plan)):
            os.replace(stage / shard_name(i), d / shard_name(i))
            out.append(d / shard_name(i))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_source(base_dir, source)
    return out


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def warn(msg: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)
