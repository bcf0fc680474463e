"""An offline corpus of real, human-written text made from what is already installed on the machine.

Sources, in this order, until at least `min_bytes` of text are collected:
  1. the documentation strings (module, class, function) of the installed Python sources: the
     standard library, then site-packages, walked in sorted path order and read with `ast`
     (nothing is imported, so heavy or broken packages cost nothing);
  2. plain-text documentation under /usr/share/doc (README, *.txt, *.md), when present.
A file's docstrings, joined by blank lines, are cut at paragraph boundaries into documents of at
most `max_doc_chars` characters (see chunk_paragraphs). Docstrings seen before are dropped
(inherited and copied docstrings are common), as are documents under MIN_DOC_CHARS.
The documents are shuffled with a fixed seed, so two runs on the same machine write identical shards.
Nothing of this text is stored in the repository: it is made on the spot.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import os
import random
import sys
import sysconfig
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "testing", "node_modules",
             "idle_test", ".git"}
DOC_FILE_SUFFIXES = (".txt", ".md", ".rst")
MIN_DOCSTRING_CHARS = 40
MIN_DOC_CHARS = 100
MAX_DOC_CHARS = 1000  # ~300 tokens at vocab 4096: documents fit short rows (see chunk_paragraphs)
MAX_FILE_BYTES = 4_000_000
MIN_DOCS = 10  # so that even a tiny --min-bytes gives a training and a validation shard


def python_roots() -> list[Path]:
    """Directories of installed Python sources: the standard library, then site-packages."""
    roots = []
    cfg = sysconfig.get_paths()
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(cfg[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under root with one of the suffixes, in sorted order (directories sorted too)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(suffixes):
                yield Path(dirpath) / fn


def python_files() -> Iterator[Path]:
    for root in python_roots():
        yield from _walk(root, (".py",))


def doc_files(root: Path = Path("/usr/share/doc")) -> Iterator[Path]:
    if root.is_dir():
        for p in _walk(root, DOC_FILE_SUFFIXES + ("README",)):
            if p.name.startswith("README") or p.suffix in DOC_FILE_SUFFIXES:
                yield p


def docstrings_of(path: str) -> list[str]:
    """The docstrings (module, classes, functions) of one Python source file; [] if it does not parse."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return []
        with open(path, "rb") as f:
            src = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                out.append(doc)
    return out


def text_file_paragraphs(path: str) -> list[str]:
    """A plain-text documentation file as one piece (empty when unreadable or not UTF-8)."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return []
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return []
    return [text] if text else []


def chunk_paragraphs(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs of a file's pieces grouped into documents of at most max_chars characters
    (a single longer paragraph stays whole), joined by blank lines.

    Short documents keep the packer's cropping low: a document longer than a training row loses
    everything past the row (at T=256, whole-file documents lost most of their tokens)."""
    paragraphs = [p for piece in pieces for p in piece.split("\n\n") if p.strip()]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if cur and size + 2 + len(p) > max_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        size += len(p) + (2 if cur else 0)
        cur.append(p)
    if cur:
        out.append("\n\n".join(cur))
    return out


def collect_documents(min_bytes: int, *, max_doc_chars: int = MAX_DOC_CHARS, workers: int | None = None,
                      log: Callable[[str], None] = print) -> tuple[list[str], dict]:
    """Documents in discovery order until their UTF-8 size reaches min_bytes and there are MIN_DOCS of them
    (all sources if never).

    Returns (documents, stats). Parsing runs in worker processes; results are consumed in path
    order, so the output does not depend on the number of workers.
    """
    if workers is None:  # worker processes pay off only for a large corpus
        workers = min(4, os.cpu_count() or 1) if min_bytes >= 1_000_000 else 1
    seen: set[bytes] = set()
    docs: list[str] = []
    stats = {"files": 0, "python_files": 0, "doc_files": 0, "duplicates": 0, "bytes": 0}

    def enough() -> bool:
        return stats["bytes"] >= min_bytes and len(docs) >= MIN_DOCS

    def take(pieces: list[str]) -> None:
        kept = []
        for piece in pieces:
            h = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in seen:
                stats["duplicates"] += 1
                continue
            seen.add(h)
            kept.append(piece)
        for doc in chunk_paragraphs(kept, max_doc_chars):
            if len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
                stats["bytes"] += len(doc.encode("utf-8"))

    sources = [("python_files", python_files, docstrings_of), ("doc_files", doc_files, text_file_paragraphs)]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers)) if workers > 1 else None
        for key, lister, reader in sources:
            if enough():
                break
            files = (str(p) for p in lister())
            while not enough():
                batch = list(itertools.islice(files, 256))  # bounded look-ahead past the point where we stop
                if not batch:
                    break
                for pieces in (pool.map(reader, batch, chunksize=16) if pool else map(reader, batch)):
                    stats["files"] += 1
                    stats[key] += 1
                    if pieces:
                        take([_clean(p) for p in pieces])
                    if enough():
                        break
            log(f"  {key.replace('_', ' ')}: {stats[key]} read, {len(docs)} documents, "
                f"{stats['bytes'] / 1e6:.1f} MB so far")
    return docs, stats


def _clean(text: str) -> str:
    # lone surrogates (possible in docstrings) cannot be written as UTF-8
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text


def make_sample(min_bytes: int = 6_000_000, *, max_doc_chars: int = MAX_DOC_CHARS, seed: int = 0,
                workers: int | None = None, log: Callable[[str], None] = print) -> tuple[list[str], dict]:
    """The sample corpus: collected documents shuffled with a fixed seed (see module doc)."""
    from nanotrain.errors import UserError

    docs, stats = collect_documents(min_bytes, max_doc_chars=max_doc_chars, workers=workers, log=log)
    if stats["bytes"] < min_bytes:
        raise UserError(f"found only {stats['bytes'] / 1e6:.1f} MB of documentation text on this machine (wanted "
                        f"{min_bytes / 1e6:.1f} MB); pass a smaller --min-bytes, or use `nanotrain-data build` "
                        "with your own text files")
    random.Random(seed).shuffle(docs)
    return docs, stats


if __name__ == "__main__":  # a quick look: python -m nanotrain.data.sample
    d, s = make_sample(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    print(s, d[0][:500], sep="\n")
