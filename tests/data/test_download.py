"""`nanotrain-data download` against a real HTTP server on 127.0.0.1 serving generated shards:
a connection dropped mid-file (resumed with a Range request), a 404, skipping intact shards, servers that
ignore or mis-answer Range, a missing validation shard, Ctrl-C, a second concurrent download, bad options."""
from __future__ import annotations

import errno
import io
import random
import signal
import ssl
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanotrain.data import download as D
from nanotrain.data import shards as S
from nanotrain.data.cli import main
from nanotrain.data.download import VAL_SHARD
from tests.local_http import LocalHTTPServer, QuietHandler


def parquet_bytes(seed: int, n: int = 200) -> bytes:
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(rng.randint(5, 60))) for _ in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=50, compression="none")
    return buf.getvalue()


class ShardServer(LocalHTTPServer):
    """Serves `files` (name -> bytes) under /data/, honouring Range requests. A name in `drop_once` gets
    its first response cut after half the bytes (the connection is closed). Records every request."""

    def __init__(self, files: dict[str, bytes], drop_once: set[str] = frozenset(), *, ignore_range: bool = False,
                 range_from_zero: bool = False, delay: float = 0.0):
        self.files, self.drop_once = files, set(drop_once)
        self.ignore_range = ignore_range  # answer a Range request with 200 and the whole file
        self.range_from_zero = range_from_zero  # answer a Range request with 206 but the bytes from 0
        self.delay = delay  # seconds between 1 KB pieces (a slow server)
        self.requests: list[tuple[str, str | None]] = []
        self.first_request = threading.Event()
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                server.first_request.set()
                data = server.files.get(name)
                if data is None or not self.path.startswith("/data/"):
                    self.send_error(404, "Not Found")
                    return
                if server.ignore_range:
                    rng = None
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if server.range_from_zero:
                    start = 0
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
                if server.delay:
                    try:
                        for i in range(0, len(body), 1024):
                            self.wfile.write(body[i:i + 1024])
                            self.wfile.flush()
                            time.sleep(server.delay)
                    except OSError:
                        pass
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


def assert_complete(base, files, names):
    """The data directory holds exactly these shards, byte-identical to the server's, and no temp file."""
    assert [p.name for p in S.list_shards(base)] == names
    for p in S.list_shards(base):
        assert p.read_bytes() == files[p.name]
    assert not list(S.paths.data_dir(base).glob("*.tmp"))


@pytest.mark.parametrize("mode", ["ignore_range", "range_from_zero"])
def test_resume_when_the_server_mishandles_range(tmp_path, files, capsys, mode):
    """A server that answers the resume with 200 and the whole file (it ignores Range), or with a 206 whose
    bytes do not start where the partial file ends: the shard is still byte-identical."""
    base = tmp_path / "base"
    with ShardServer(files, drop_once={S.shard_name(1)}, **{mode: True}) as server:
        assert download(base, server.url, 3, "-w", "2") == 0
        assert any(name == S.shard_name(1) and rng for name, rng in server.requests)  # a resume was asked for
    assert_complete(base, files, [S.shard_name(i) for i in (0, 1, 2, VAL_SHARD)])


def test_short_200_body_is_retried(tmp_path, files, monkeypatch, capsys):
    """A 200 whose body is shorter than the file (and whose Content-Length agrees with it) is no shard."""
    base = tmp_path / "base"
    real = dict(files)
    files[S.shard_name(0)] = real[S.shard_name(0)][:-300]  # the server's first answer is cut short

    def fix_after_first(server):
        server.first_request.wait(5)
        time.sleep(0.05)
        files[S.shard_name(0)] = real[S.shard_name(0)]

    with ShardServer(files) as server:
        threading.Thread(target=fix_after_first, args=(server,), daemon=True).start()
        assert download(base, server.url, 1, "-w", "1") == 0
    assert "not a readable parquet file" in capsys.readouterr().out
    assert_complete(base, real, [S.shard_name(0), S.shard_name(VAL_SHARD)])


def test_missing_validation_shard_leaves_no_shard_that_looks_complete(tmp_path, files, capsys):
    """Without the validation shard the last training shard would silently become the validation split:
    training shards stay as .tmp until the validation shard is in place, and a rerun reuses them."""
    base = tmp_path / "base"
    val = files.pop(S.shard_name(VAL_SHARD))
    with ShardServer(files) as server:
        assert download(base, server.url, 3, "-w", "3") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: 1 of 4 shard(s) failed to download (first: {S.shard_name(VAL_SHARD)}: HTTP 404")
        assert S.list_shards(base) == []  # nothing a loader would take for a dataset
        assert sorted(p.name for p in S.paths.data_dir(base).glob("*.tmp")) == [
            S.shard_name(i) + ".tmp" for i in range(3)]
        files[S.shard_name(VAL_SHARD)] = val
        n_before = len(server.requests)
        assert download(base, server.url, 3, "-w", "3") == 0
        assert server.requests[n_before:] == [(S.shard_name(VAL_SHARD), None)]  # the complete .tmp files reused
    assert_complete(base, files, [S.shard_name(i) for i in (0, 1, 2, VAL_SHARD)])


def test_network_oserror_is_retried(tmp_path, files, monkeypatch, capsys):
    """A TLS stream cut short raises ssl.SSLEOFError (an OSError, not a ConnectionError): retried, not a traceback."""
    base = tmp_path / "base"
    real_read1 = D.http.client.HTTPResponse.read1
    failed = []

    def flaky_read1(self, n=-1):
        if not failed:
            failed.append(1)
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
        return real_read1(self, n)

    monkeypatch.setattr(D.http.client.HTTPResponse, "read1", flaky_read1)
    with ShardServer(files) as server:
        assert download(base, server.url, 1, "-w", "1") == 0
    assert failed and "EOF occurred in violation of protocol" in capsys.readouterr().out
    assert_complete(base, files, [S.shard_name(0), S.shard_name(VAL_SHARD)])


def test_disk_full_is_named_and_not_retried(tmp_path, files, monkeypatch, capsys):
    base = tmp_path / "base"
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        if str(path).endswith(".tmp") and ("w" in mode or "a" in mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(D, "open", full_open, raising=False)
    with ShardServer(files) as server:
        assert download(base, server.url, 1, "-w", "1") == 2
        n_requests = len(server.requests)
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "free disk space" in err and "\n" not in err
    assert "check the network" not in err
    assert n_requests == 2  # one request per shard: a full disk is not retried


def test_ctrl_c_stops_promptly(tmp_path, files):
    """Ctrl-C during a slow download exits at once (130) with the partial files kept as .tmp; it used to
    go on downloading every queued shard."""
    base = tmp_path / "base"
    with ShardServer(files, delay=0.05) as server:  # ~20 KB/s: each shard would take seconds
        proc = subprocess.Popen([sys.executable, "-m", "nanotrain.data.cli", "download", "-n", "3", "-w", "2",
                                 "--base-dir", str(base), "--url", server.url, "--retries", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.first_request.wait(60)
        time.sleep(0.3)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        elapsed = time.time() - t0
    assert proc.returncode == 130 and elapsed < 5, (proc.returncode, elapsed, err)
    assert "Traceback" not in err and err.strip().startswith("interrupted")
    assert S.list_shards(base) == []
    assert list(S.paths.data_dir(base).glob("*.tmp"))  # kept for the next run to resume


def test_second_concurrent_download_is_refused(tmp_path, files, capsys):
    """Two downloads into one directory would write the same .tmp files: the second is refused."""
    base = tmp_path / "base"
    with ShardServer(files, delay=0.002) as server:
        result = {}
        first = threading.Thread(target=lambda: result.setdefault("rc", download(base, server.url, 3, "-w", "2")))
        first.start()
        assert server.first_request.wait(30)
        assert download(base, server.url, 3, "-w", "2") == 2
        err = capsys.readouterr().err
        assert "another `nanotrain-data download` is writing to" in err and "\n" not in err.strip()
        first.join(60)
    assert result["rc"] == 0
    assert_complete(base, files, [S.shard_name(i) for i in (0, 1, 2, VAL_SHARD)])


@pytest.mark.parametrize("args, message", [
    (["--url", "huggingface.co/datasets/x"], "is not an http(s):// or file:// URL"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--backoff", "-1"], "--backoff must be >= 0"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["-n", "-5"], "-n/--num-files must be -1 (all) or >= 0"),
])
def test_bad_download_options(tmp_path, capsys, args, message):
    rc = main(["download", "--base-dir", str(tmp_path / "base"), "--url", "http://127.0.0.1:9/none", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
