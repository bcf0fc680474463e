"""`nanotrain-data build` from mixed files, `sample` determinism, the shard layout and CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanotrain import paths
from nanotrain.data import shards as S
from nanotrain.data.cli import main
from nanotrain.data.sample import chunk_paragraphs, doc_files, docstrings_of, text_file_paragraphs
from nanotrain.errors import UserError


def all_texts(base) -> list[str]:
    return [t for p in S.list_shards(base) for t in pq.read_table(p).column("text").to_pylist()]


@pytest.fixture
def mixed_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "notes" / "deep").mkdir(parents=True)
    docs = {f"text file {i}: " + "words " * (i + 3) for i in range(5)}
    for i, d in enumerate(sorted(docs)):
        (src / "notes" / ("deep" if i % 2 else ".") / f"f{i}.{'md' if i % 2 else 'txt'}").write_text(d)
    jl = [f"json line {i} " + "x" * i for i in range(7)]
    (src / "lines.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(jl)) + "\n\n")
    pqt = [f"parquet row {i} é" for i in range(9)]
    pq.write_table(pa.table({"text": pqt, "other": list(range(9))}), src / "rows.parquet")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    (src / "empty.txt").write_text("  \n")
    return src, docs | set(jl) | set(pqt)


def test_build_from_mixed_files(tmp_path, mixed_inputs, capsys):
    src, expected = mixed_inputs
    base = tmp_path / "base"
    assert main(["build", str(src / "notes"), str(src / "lines.jsonl"), str(src / "rows.parquet"),
                 "--base-dir", str(base), "--docs-per-shard", "8"]) == 0
    out = capsys.readouterr().out
    chars = sum(len(d) for d in expected)
    assert f"{len(expected)} documents, {chars:,} characters" in out
    shards = S.list_shards(base)
    # 21 documents: val = max(1, 21 // 10) = 2, train 19 in shards of 8, 8, 3
    assert [p.name for p in shards] == [S.shard_name(i) for i in range(4)] and "wrote 4 shards" in out
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards] == [8, 8, 3, 2]
    texts = all_texts(base)
    assert sorted(texts) == sorted(expected)  # each document exactly once
    assert texts != sorted(texts)  # shuffled
    first = [p.read_bytes() for p in shards]
    assert main(["build", str(src), "--base-dir", str(base), "--docs-per-shard", "8"]) == 0  # same docs via the dir
    assert [p.read_bytes() for p in S.list_shards(base)] == first  # deterministic, and build replaces build
    assert S.read_source(base)["source"] == "build"


def test_build_errors(tmp_path, capsys):
    base = str(tmp_path / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["build", str(bad), "--base-dir", base]) == 2
    assert "bad.jsonl:2 has no string `text` field" in capsys.readouterr().err
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert main(["build", str(bad), "--base-dir", base]) == 2
    assert "bad.jsonl:2 is not valid JSON" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing"), "--base-dir", base]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b")
    assert main(["build", str(tmp_path / "x.csv"), "--base-dir", base]) == 2
    assert "unsupported file type .csv" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("just one document")
    assert main(["build", str(tmp_path / "one.txt"), "--base-dir", base]) == 2
    assert "need at least 2" in capsys.readouterr().err
    assert not S.list_shards(base)


def test_sample_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for base in (a, b):
        assert main(["sample", "--base-dir", str(base), "--min-bytes", "150000", "--docs-per-shard", "20"]) == 0
    assert "wrote" in capsys.readouterr().out
    sa, sb = S.list_shards(a), S.list_shards(b)
    assert len(sa) >= 2 and [p.name for p in sa] == [p.name for p in sb]
    assert [p.read_bytes() for p in sa] == [p.read_bytes() for p in sb]
    texts = all_texts(a)
    assert sum(len(t.encode()) for t in texts) >= 150_000
    assert len(set(texts)) == len(texts) and min(len(t) for t in texts) >= 100
    assert any("\n\n" in t for t in texts)  # paragraphs of one file's docstrings make a document
    long = [t for t in texts if len(t) > 1000]  # only single paragraphs may exceed --max-doc-chars
    assert len(long) < 0.1 * len(texts) and all("\n\n" not in t for t in long)
    assert S.read_source(a)["source"] == "sample"
    assert main(["sample", "--base-dir", str(a), "--min-bytes", "150000", "--docs-per-shard", "20"]) == 0
    assert [p.read_bytes() for p in S.list_shards(a)] == [p.read_bytes() for p in sb]  # rerun replaces sample


def test_sample_keeps_downloaded_shards(tmp_path, capsys):
    base = tmp_path / "base"
    S.write_shards(["a b c"] * 4, base, 2, {"source": "download"})
    before = S.list_shards(base)
    assert main(["sample", "--base-dir", str(base), "--min-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert "already holds 3 shard(s) from download; pass --force" in err
    assert S.list_shards(base) == before
    assert main(["sample", "--base-dir", str(base), "--min-bytes", "1000", "--force"]) == 0
    assert S.read_source(base)["source"] == "sample"


def test_shard_listing_and_fingerprint(tmp_path):
    base = tmp_path / "base"
    assert S.list_shards(base) == [] and paths.data_dir(base) == base / "base_data"
    S.write_shards([f"doc {i}" for i in range(30)], base, 10, {"source": "build"})
    (paths.data_dir(base) / "shard_00009.parquet.tmp").write_bytes(b"partial")
    assert [p.name for p in S.list_shards(base)] == [S.shard_name(i) for i in range(4)]
    assert [p.name for p in S.split_shards("val", base)] == ["shard_00003.parquet"]
    fp = S.data_fingerprint(base)
    assert fp == S.data_fingerprint(base) and len(fp) == 16
    S.write_shards([f"doc {i}!" for i in range(30)], base, 10, {"source": "build"})
    assert S.data_fingerprint(base) != fp
    docs = list(S.iter_documents("train", base, doc_cap=4, max_chars=10))
    assert docs == ["doc ", "doc ", "do"]
    with pytest.raises(UserError, match="unknown split"):
        S.split_shards("test", base)


def test_cli_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanotrain.data.cli", "tokenizer", "--base-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no shards found in") and "nanotrain-data sample" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sample_reads_docstrings_and_text_docs(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Module doc that is long enough to be kept by the sampler."""\n'
                   'class A:\n    """Class doc, also long enough to be kept here."""\n'
                   '    def f(self):\n        """short"""\n')
    assert docstrings_of(str(src)) == ["Module doc that is long enough to be kept by the sampler.",
                                       "Class doc, also long enough to be kept here."]
    (tmp_path / "broken.py").write_text("def (:\n")
    assert docstrings_of(str(tmp_path / "broken.py")) == []
    docs = tmp_path / "doc" / "pkg"
    docs.mkdir(parents=True)
    (docs / "README").write_text("read me\n")
    (docs / "notes.txt").write_text("some notes")
    (docs / "changelog.gz").write_bytes(b"\x1f\x8b")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    found = list(doc_files(tmp_path / "doc"))
    assert [p.name for p in found] == ["README", "latin1.txt", "notes.txt"]
    assert [text_file_paragraphs(str(p)) for p in found] == [["read me"], [], ["some notes"]]


def test_chunk_paragraphs():
    pieces = ["a" * 300 + "\n\n" + "b" * 300, "c" * 500, "d" * 1500 + "\n\n\n\n" + "e" * 10]
    assert chunk_paragraphs(pieces, 1000) == ["a" * 300 + "\n\n" + "b" * 300, "c" * 500, "d" * 1500, "e" * 10]
    assert chunk_paragraphs(pieces, 2000) == ["a" * 300 + "\n\n" + "b" * 300 + "\n\n" + "c" * 500,
                                              "d" * 1500 + "\n\n" + "e" * 10]
    assert all(len(c) <= 602 for c in chunk_paragraphs(["x" * 300] * 10, 602))


def test_build_reads_bom_and_names_bad_utf8_jsonl_line(tmp_path, capsys):
    base = tmp_path / "base"
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first line with a BOM"}\n{"text": "second"}\n')
    (tmp_path / "bom.txt").write_bytes("\ufeffa text file saved with a BOM".encode())
    assert main(["build", str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.txt"), "--base-dir", str(base)]) == 0
    assert sorted(all_texts(base)) == ["a text file saved with a BOM", "first line with a BOM", "second"]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(["build", str(bad), "--base-dir", str(base)]) == 2
    err = capsys.readouterr().err
    assert "latin1.jsonl:2 is not UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("column", [pa.array([1, 2, 3]), pa.array([b"ab", b"cd", b"ef"], pa.binary())])
def test_text_column_that_is_not_text(tmp_path, capsys, column):
    """A `text` column of numbers or raw bytes: one line naming the file (build input or shard), no traceback."""
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": column}), src)
    assert main(["build", str(src), "--base-dir", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert f"{src}: its `text` column holds {column.type}, not strings" in err and len(err.strip().splitlines()) == 1
    shard_dir = paths.data_dir(tmp_path / "b2")
    shard_dir.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"text": column}), shard_dir / S.shard_name(i))
    with pytest.raises(UserError, match="not strings"):
        list(S.iter_documents("train", tmp_path / "b2"))


def test_interrupted_build_keeps_the_previous_shards(tmp_path, monkeypatch, mixed_inputs):
    """A build that dies while writing (Ctrl-C, full disk) must not leave some new shards whose last one,
    a training shard, would pass for the validation split: the previous shards stay as they were."""
    src, _ = mixed_inputs
    base = tmp_path / "base"
    assert main(["build", str(src), "--base-dir", str(base), "--docs-per-shard", "8"]) == 0
    before = {p.name: p.read_bytes() for p in S.list_shards(base)}
    real = S.write_shard
    calls = []

    def dying_write_shard(docs, path, row_groups=16):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(docs, path, row_groups)

    monkeypatch.setattr(S, "write_shard", dying_write_shard)
    with pytest.raises(KeyboardInterrupt):
        S.write_shards([f"new document {i}" for i in range(40)], base, 5, {"source": "build"})
    assert {p.name: p.read_bytes() for p in S.list_shards(base)} == before
    assert S.read_source(base)["source"] == "build"
    monkeypatch.setattr(S, "write_shard", real)
    out = S.write_shards([f"new document {i}" for i in range(40)], base, 5, {"source": "build"})
    assert S.list_shards(base) == out and len(out) == 9  # 36 train docs in 8 shards + 4 validation
    assert [p.name for p in paths.data_dir(base).iterdir() if not p.name.endswith(".parquet")] == [S.SOURCE_FILE]


def test_failed_sample_keeps_the_previous_sample(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    S.write_shards([f"earlier sample doc {i}" for i in range(30)], base, 10, {"source": "sample"})
    before = {p.name: p.read_bytes() for p in S.list_shards(base)}
    import nanotrain.data.sample as sample_mod

    def too_little(*a, **kw):
        raise UserError("found only 0.1 MB of documentation text on this machine; pass a smaller --min-bytes")

    monkeypatch.setattr(sample_mod, "make_sample", too_little)
    assert main(["sample", "--base-dir", str(base)]) == 2
    assert "found only" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in S.list_shards(base)} == before


def test_single_large_text_file_error_says_how_to_split(tmp_path, capsys):
    big = tmp_path / "book.txt"
    big.write_text("a paragraph of a long book.\n\n" * 2000)
    assert main(["build", str(big), "--base-dir", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert "need at least 2" in err and "each .txt/.md file is one document" in err
