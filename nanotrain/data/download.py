"""Download the ClimbMix pretraining shards that nanochat trains on.

karpathy/climbmix-400b-shuffle on Hugging Face: shard_00000.parquet ... shard_06542.parquet, each
with a `text` column; the last one (shard_06542) is always fetched and is the validation split.
Shards download in parallel threads; each one goes to `<name>.tmp` and is renamed into place only
when complete and its parquet footer reads back, so an interrupted download never leaves a shard
that looks whole. A dropped connection resumes from the bytes already received (HTTP Range) after
an exponential back-off; shards already present and intact are skipped.
"""
from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from nanotrain.data.shards import is_intact, prepare_data_dir, shard_name, write_source
from nanotrain.errors import UserError

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
VAL_SHARD = 6542  # the last shard of the dataset: always downloaded, always the validation split
CHUNK = 1 << 20


class ShardError(Exception):
    """A shard that cannot be downloaded (retrying will not help)."""


class _Retry(Exception):
    """A transient failure: back off and try again."""


def shard_indices(num_train: int) -> list[int]:
    """The first `num_train` training shards (-1: all of them) plus the validation shard."""
    n = VAL_SHARD if num_train < 0 else min(num_train, VAL_SHARD)
    return list(range(n)) + [VAL_SHARD]


def _fetch_once(url: str, tmp: Path, timeout: float) -> None:
    """One attempt: continue `tmp` from its current size (Range), or start over if the server ignores it."""
    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": "nanotrain-data"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our partial file is no prefix of theirs: start over
            tmp.unlink()
            raise _Retry("HTTP 416 on resume") from None
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise ShardError(f"HTTP {e.code} {e.reason}") from None
    with resp:
        if resp.status == 206:
            mode = "ab"
        else:
            mode, have = "wb", 0
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        got = have
        with open(tmp, mode) as f:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except http.client.IncompleteRead as e:
                    f.write(e.partial)
                    got += len(e.partial)
                    raise _Retry(f"connection dropped after {got} of {expected} bytes") from None
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
        if expected is not None and got != expected:
            raise _Retry(f"connection dropped after {got} of {expected} bytes")


def download_shard(index: int, data_dir: Path, base_url: str = BASE_URL, *, retries: int = 5,
                   backoff: float = 2.0, timeout: float = 60.0,
                   log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """Fetch one shard into data_dir unless an intact copy is there. Returns (path, downloaded?)."""
    name = shard_name(index)
    path = data_dir / name
    if path.exists() and is_intact(path):
        return path, False
    url = f"{base_url.rstrip('/')}/{name}"
    tmp = data_dir / (name + ".tmp")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, tmp, timeout)
            if not is_intact(tmp):  # complete by length but not a parquet file: start over
                tmp.unlink(missing_ok=True)
                raise _Retry("the downloaded file is not a readable parquet file")
            os.replace(tmp, path)
            return path, True
        except ShardError as e:
            tmp.unlink(missing_ok=True)
            raise ShardError(f"{name}: {e} at {url}") from None
        except (_Retry, urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError,
                TimeoutError) as e:
            if attempt == retries:
                raise ShardError(f"{name}: gave up after {retries + 1} attempts, last: {_why(e)}") from None
            wait = backoff * 2 ** attempt
            log(f"  {name}: {_why(e)}; retrying in {wait:.3g}s ({attempt + 1}/{retries})")
            time.sleep(wait)
    raise AssertionError("unreachable")


def download(num_train: int, base_dir: str | os.PathLike | None = None, *, workers: int = 4,
             base_url: str = BASE_URL, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             force: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Download `num_train` training shards plus the validation shard into the data directory.

    Raises UserError naming the shards that failed (after the others have finished).
    """
    data_dir = prepare_data_dir(base_dir, "download", force)
    indices = shard_indices(num_train)
    total = len(indices)
    log(f"downloading {total} shard(s) ({total - 1} train + validation {shard_name(VAL_SHARD)}) from {base_url} "
        f"to {data_dir} with {workers} worker(s)")
    lock = threading.Lock()
    state = {"done": 0, "bytes": 0, "t0": time.time()}
    errors: dict[int, str] = {}

    def one(i: int) -> Path | None:
        try:
            path, fetched = download_shard(i, data_dir, base_url, retries=retries, backoff=backoff,
                                           timeout=timeout, log=log)
        except ShardError as e:
            with lock:
                errors[i] = str(e)
                state["done"] += 1
                log(f"{_bar(state['done'], total)} FAILED {e}")
            return None
        size = path.stat().st_size
        with lock:
            state["done"] += 1
            if fetched:
                state["bytes"] += size
            rate = state["bytes"] / 1e6 / max(time.time() - state["t0"], 1e-9)
            what = "downloaded" if fetched else "present, skipped"
            log(f"{_bar(state['done'], total)} {path.name} {size / 1e6:.1f} MB {what} ({rate:.1f} MB/s overall)")
        return path

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, indices))
    if errors:
        first = errors[min(errors)]
        raise UserError(f"{len(errors)} of {total} shard(s) failed to download (first: {first}); check the "
                        "network or --url and run the same command again (finished shards are kept)")
    write_source(base_dir, {"source": "download", "url": base_url})
    log(f"done: {total} shard(s) in {data_dir} ({state['bytes'] / 1e6:.1f} MB fetched, "
        f"{time.time() - state['t0']:.1f}s)")
    return [p for p in results if p is not None]


def _bar(done: int, total: int, width: int = 20) -> str:
    """A progress bar such as `[########------------] 4/10`."""
    k = width * done // max(total, 1)
    return f"[{'#' * k}{'-' * (width - k)}] {done}/{total}"


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return " ".join(str(e).split())[:200] or type(e).__name__
