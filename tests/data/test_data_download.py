"""`nanotrain-data download` against a real HTTP server on 127.0.0.1 serving generated shards:
a connection dropped mid-file (resumed with a Range request), a 404, and skipping intact shards."""
from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_http import LocalHTTPServer, QuietHandler

from nanotrain.data import shards as S
from nanotrain.data.cli import main
from nanotrain.data.download import VAL_SHARD


def parquet_bytes(seed: int, n: int = 200) -> bytes:
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(rng.randint(5, 60))) for _ in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=50, compression="none")
    return buf.getvalue()


class ShardServer(LocalHTTPServer):
    """Serves `files` (name -> bytes) under /data/, honouring Range requests. A name in `drop_once` gets
    its first response cut after half the bytes (the connection is closed). Records every request."""

    def __init__(self, files: dict[str, bytes], drop_once: set[str] = frozenset()):
        self.files, self.drop_once = files, set(drop_once)
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None or not self.path.startswith("/data/"):
                    self.send_error(404, "Not Found")
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = self.address("/data")


@pytest.fixture
def files():
    names = [S.shard_name(i) for i in (0, 1, 2, VAL_SHARD)]
    return {name: parquet_bytes(i) for i, name in enumerate(names)}


def download(base, url, n, *extra):
    return main(["download", "-n", str(n), "--base-dir", str(base), "--url", url, "--backoff", "0.01",
                 "--retries", "3", "--timeout", "10", *extra])


def test_download_resumes_a_dropped_connection_and_skips_intact(tmp_path, files, capsys):
    base = tmp_path / "base"
    with ShardServer(files, drop_once={S.shard_name(1)}) as server:
        assert download(base, server.url, 3, "-w", "2") == 0
        shards = S.list_shards(base)
        assert [p.name for p in shards] == [S.shard_name(i) for i in (0, 1, 2, VAL_SHARD)]
        for p in shards:
            assert p.read_bytes() == files[p.name]  # byte-identical, and nothing left half-written
        assert not list(S.paths.data_dir(base).glob("*.tmp"))
        half = len(files[S.shard_name(1)]) // 2
        assert (S.shard_name(1), f"bytes={half}-") in server.requests  # resumed where the drop cut it
        out = capsys.readouterr().out
        assert "connection dropped" in out and "retrying" in out and "] 4/4 " in out
        assert S.split_shards("val", base)[0].name == S.shard_name(VAL_SHARD)

        # a second run fetches nothing; a damaged shard is fetched again
        n_before = len(server.requests)
        assert download(base, server.url, 3) == 0
        assert len(server.requests) == n_before and capsys.readouterr().out.count("present, skipped") == 4
        damaged = S.paths.data_dir(base) / S.shard_name(2)
        damaged.write_bytes(files[S.shard_name(2)][:100])
        assert download(base, server.url, 3) == 0
        assert server.requests[n_before:] == [(S.shard_name(2), None)]
        assert damaged.read_bytes() == files[S.shard_name(2)]


def test_download_404_names_the_shard(tmp_path, files, capsys):
    base = tmp_path / "base"
    del files[S.shard_name(2)]
    with ShardServer(files) as server:
        assert download(base, server.url, 3) == 2
        requests = [r for r in server.requests if r[0] == S.shard_name(2)]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 4 shard(s) failed to download (first: shard_00002.parquet: HTTP 404")
    assert "\n" not in err and "Traceback" not in err
    assert len(requests) == 1  # a 404 is not retried
    names = [p.name for p in S.list_shards(base)]
    assert names == [S.shard_name(0), S.shard_name(1), S.shard_name(VAL_SHARD)]  # the others were kept


def test_download_refuses_to_replace_sample_shards(tmp_path, files, capsys):
    base = tmp_path / "base"
    S.write_shards(["some text"] * 4, base, 2, {"source": "sample"})
    with ShardServer(files) as server:
        assert download(base, server.url, 1) == 2
        assert "made by `nanotrain-data sample`; pass --force" in capsys.readouterr().err
        assert download(base, server.url, 1, "--force") == 0
    assert [p.name for p in S.list_shards(base)] == [S.shard_name(0), S.shard_name(VAL_SHARD)]
