"""Shards from the user's own text: .txt/.md (one document per file), .jsonl (one per line, key
`text`), .parquet (one per row of the `text` column). Directories are walked recursively in sorted
order; the documents are shuffled with a fixed seed, so the same files always give the same shards."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nanotrain.data import shards as S
from nanotrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


def find_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The input files: each file given, and every file with a known suffix under each directory given."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise UserError(f"{p}: unsupported file type {p.suffix or '(none)'}; give .txt, .md, .jsonl or "
                                ".parquet files (or directories holding them)")
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; give existing files or directories")
    return files


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one input file (empty ones skipped)."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is no part of the text
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8 or leave it out") from None
        if text.strip():
            yield text
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno} is not UTF-8; convert the file to UTF-8 or remove that "
                                    "line") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({e}); fix or remove that line") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"{path}:{lineno} has no string `text` field; each line must be an object "
                                    'like {"text": "..."}')
                if obj["text"].strip():
                    yield obj["text"]
    else:
        pf = S.open_shard(path)
        for rg in range(pf.num_row_groups):
            yield from (t for t in S.read_row_group(pf, rg, path) if t.strip())


def build(inputs: Iterable[str | os.PathLike], base_dir: str | os.PathLike | None = None, *,
          docs_per_shard: int = 10_000, seed: int = 0, force: bool = False,
          log: Callable[[str], None] = print) -> list[Path]:
    """Write shards of the data directory from the user's files. Returns the shard paths."""
    files = find_files(inputs)
    if not files:
        raise UserError("no .txt, .md, .jsonl or .parquet files found in the given paths; point build at your text")
    docs = [doc for f in files for doc in read_documents(f)]
    if not docs:
        raise UserError("the given files hold no text (empty corpus); point build at files with text in them")
    if len(docs) < 2 and any(f.suffix.lower() in TEXT_SUFFIXES for f in files):
        raise UserError(f"the corpus has {len(docs)} document(s); need at least 2 (one for training, one for "
                        "validation), and each .txt/.md file is one document: split a large file into several "
                        "files, or give a .jsonl file with one document per line")
    docs.sort()  # the same documents give the same shards, whatever order the files were given in
    random.Random(seed).shuffle(docs)
    S.prepare_data_dir(base_dir, "build", force, check_only=True)  # write_shards replaces the old shards
    out = S.write_shards(docs, base_dir, docs_per_shard,
                         {"source": "build", "files": len(files), "documents": len(docs), "seed": seed})
    chars = sum(len(d) for d in docs)
    log(f"read {len(files)} file(s): {len(docs)} documents, {chars:,} characters")
    log(f"wrote {len(out)} shards to {out[0].parent} ({len(out) - 1} train + 1 validation: {out[-1].name})")
    return out
