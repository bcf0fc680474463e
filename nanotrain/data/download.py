"""Download the ClimbMix pretraining shards that nanochat trains on.

karpathy/climbmix-400b-shuffle on Hugging Face: shard_00000.parquet ... shard_06542.parquet, each
with a `text` column; the last one (shard_06542) is always fetched and is the validation split.
Shards download in parallel threads; each one goes to `<name>.tmp` and is renamed into place only
when complete and its parquet footer reads back, so an interrupted download never leaves a shard
that looks whole. A dropped connection resumes from the bytes already received (HTTP Range, the
answer's Content-Range checked) after an exponential back-off; shards already present and intact
are skipped, and a complete `.tmp` left by an earlier run is used without fetching it again.

The validation shard is fetched first and training shards are renamed into place only once it is
there: the last shard of the directory is the validation split, so a training shard without it
would silently be validated on. One download at a time writes into a data directory (a lock file);
Ctrl-C stops the workers at once and keeps the partial `.tmp` files for the next run.
"""
from __future__ import annotations

import http.client
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from nanotrain import paths
from nanotrain.data.shards import is_intact, prepare_data_dir, shard_name, write_source
from nanotrain.errors import UserError

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
VAL_SHARD = 6542  # the last shard of the dataset: always downloaded, always the validation split
CHUNK = 1 << 20
LOCK_FILE = ".download.lock"


class ShardError(Exception):
    """A shard that cannot be downloaded (retrying will not help). `local`: the fault is on this machine."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


class _Retry(Exception):
    """A transient failure: back off and try again."""


class _Stopped(Exception):
    """The download was interrupted (Ctrl-C): stop without retrying."""


def shard_indices(num_train: int) -> list[int]:
    """The first `num_train` training shards (-1: all of them) plus the validation shard."""
    if num_train < -1:
        raise UserError(f"-n/--num-files must be -1 (all) or >= 0, got {num_train}")
    n = VAL_SHARD if num_train < 0 else min(num_train, VAL_SHARD)
    return list(range(n)) + [VAL_SHARD]


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header such as `bytes 100-999/1000`; None where unknown."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def _local_error(tmp: Path, e: OSError) -> ShardError:
    return ShardError(f"cannot write {tmp} ({e.strerror or e}); free disk space or choose another --base-dir",
                      local=True)


def _fetch_once(url: str, tmp: Path, timeout: float, stop: threading.Event) -> None:
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
        total = None
        if have and resp.status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != have:  # appending these bytes would corrupt the file (its footer would still read)
                tmp.unlink()
                raise _Retry(f"the server resumed at byte {first}, not {have}; starting over")
            mode = "ab"
        else:  # a full answer (the server ignored Range, or nothing to resume)
            mode, have = "wb", 0
        try:
            length = int(resp.headers.get("Content-Length"))
        except (TypeError, ValueError):
            length = None
        expected = total if total is not None else (have + length if length is not None else None)
        got = have
        try:
            f = open(tmp, mode)
        except OSError as e:
            raise _local_error(tmp, e) from None
        with f:
            while True:
                if stop.is_set():
                    raise _Stopped()
                try:
                    chunk = resp.read1(CHUNK)  # what has arrived (so Ctrl-C is seen between pieces)
                except http.client.IncompleteRead as e:
                    chunk = e.partial
                    if chunk:
                        _write(f, chunk, tmp)
                        got += len(chunk)
                    raise _Retry(f"connection dropped after {got} of {expected} bytes") from None
                if not chunk:
                    break
                _write(f, chunk, tmp)
                got += len(chunk)
        if expected is not None and got != expected:
            raise _Retry(f"connection dropped after {got} of {expected} bytes")


def _write(f, chunk: bytes, tmp: Path) -> None:
    try:
        f.write(chunk)
    except OSError as e:
        raise _local_error(tmp, e) from None


def download_shard(index: int, data_dir: Path, base_url: str = BASE_URL, *, retries: int = 5,
                   backoff: float = 2.0, timeout: float = 60.0, log: Callable[[str], None] = print,
                   stop: threading.Event | None = None,
                   may_commit: Callable[[], bool] | None = None) -> tuple[Path, str]:
    """Fetch one shard into data_dir unless an intact copy is there.

    Returns (path, status): "present" (already there), "downloaded", or "held" (complete in its .tmp file,
    but `may_commit()` said not to rename it into place yet). Raises ShardError.
    """
    stop = stop or threading.Event()
    name = shard_name(index)
    path = data_dir / name
    if path.exists() and is_intact(path):
        return path, "present"
    url = f"{base_url.rstrip('/')}/{name}"
    tmp = data_dir / (name + ".tmp")
    for attempt in range(retries + 1):
        try:
            if not (tmp.exists() and is_intact(tmp)):  # a complete .tmp of an earlier run needs no fetch
                _fetch_once(url, tmp, timeout, stop)
                if not is_intact(tmp):  # complete by length but not a parquet file: start over
                    tmp.unlink(missing_ok=True)
                    raise _Retry("the downloaded file is not a readable parquet file")
            if may_commit is not None and not may_commit():
                return tmp, "held"
            os.replace(tmp, path)
            return path, "downloaded"
        except _Stopped:
            raise
        except ShardError as e:
            if not e.local:
                tmp.unlink(missing_ok=True)
            raise ShardError(f"{name}: {e}" + ("" if e.local else f" at {url}"), local=e.local) from None
        except (_Retry, OSError, http.client.HTTPException) as e:  # OSError: URLError, timeouts, resets, TLS
            if attempt == retries:
                raise ShardError(f"{name}: gave up after {retries + 1} attempts, last: {_why(e)}") from None
            wait = backoff * 2 ** attempt
            log(f"  {name}: {_why(e)}; retrying in {wait:.3g}s ({attempt + 1}/{retries})")
            if stop.wait(wait):
                raise _Stopped() from None
    raise AssertionError("unreachable")


def _check_options(base_url: str, retries: int, backoff: float, timeout: float) -> None:
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise UserError(f"--url {base_url!r} is not an http(s):// or file:// URL; give the base URL the shard "
                        f"files are under (default {BASE_URL})")
    if retries < 0:
        raise UserError(f"--retries must be >= 0, got {retries}")
    if backoff < 0:
        raise UserError(f"--backoff must be >= 0 seconds, got {backoff}")
    if not timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {timeout}")


def _lock(data_dir: Path):
    """Hold the data directory's download lock (an open file, released when closed or when the process
    dies); a UserError when another download holds it. No lock where fcntl is missing."""
    f = open(data_dir / LOCK_FILE, "a")
    try:
        import fcntl
    except ImportError:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"another `nanotrain-data download` is writing to {data_dir}; wait for it to finish "
                        "(or stop it), then run this again") from None
    return f


def download(num_train: int, base_dir: str | os.PathLike | None = None, *, workers: int = 4,
             base_url: str = BASE_URL, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             force: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Download `num_train` training shards plus the validation shard into the data directory.

    Raises UserError naming the shards that failed (after the others have finished).
    """
    indices = shard_indices(num_train)
    _check_options(base_url, retries, backoff, timeout)
    d = paths.data_dir(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    lock = _lock(d)
    try:
        return _download(indices, base_dir, d, workers, base_url, retries, backoff, timeout, force, log)
    finally:
        lock.close()


def _download(indices: list[int], base_dir, d: Path, workers: int, base_url: str, retries: int, backoff: float,
              timeout: float, force: bool, log: Callable[[str], None]) -> list[Path]:
    data_dir = prepare_data_dir(base_dir, "download", force)
    total = len(indices)
    log(f"downloading {total} shard(s) ({total - 1} train + validation {shard_name(VAL_SHARD)}) from {base_url} "
        f"to {data_dir} with {workers} worker(s)")
    lock = threading.Lock()
    stop = threading.Event()
    val_settled, val_ok = threading.Event(), threading.Event()
    state = {"done": 0, "bytes": 0, "t0": time.time()}
    errors: dict[int, str] = {}
    local_errors: set[int] = set()
    held: set[int] = set()  # complete training shards kept as .tmp (the validation shard failed)
    results: dict[int, Path] = {}

    def may_commit() -> bool:
        """Training shards wait for the validation shard (see the module doc)."""
        while not val_settled.wait(0.2):
            if stop.is_set():
                raise _Stopped()
        return val_ok.is_set()

    def one(i: int) -> None:
        try:
            fetch(i)
        finally:
            if i == VAL_SHARD:
                if VAL_SHARD in results:
                    val_ok.set()
                val_settled.set()

    def fetch(i: int) -> None:
        name = shard_name(i)
        try:
            path, status = download_shard(i, data_dir, base_url, retries=retries, backoff=backoff, timeout=timeout,
                                          log=log, stop=stop, may_commit=None if i == VAL_SHARD else may_commit)
        except _Stopped:
            return
        except Exception as e:  # ShardError, or anything unforeseen: reported with the others, never lost
            msg = str(e) if isinstance(e, ShardError) else f"{name}: {type(e).__name__}: {e}"
            with lock:
                errors[i] = msg
                if isinstance(e, ShardError) and e.local:
                    local_errors.add(i)
                state["done"] += 1
                log(f"{_bar(state['done'], total)} FAILED {msg}")
            return
        size = path.stat().st_size
        with lock:
            state["done"] += 1
            if status == "held":
                held.add(i)
                log(f"{_bar(state['done'], total)} {path.name} {size / 1e6:.1f} MB kept (no validation shard)")
                return
            results[i] = path
            if status == "downloaded":
                state["bytes"] += size
            rate = state["bytes"] / 1e6 / max(time.time() - state["t0"], 1e-9)
            what = "downloaded" if status == "downloaded" else "present, skipped"
            log(f"{_bar(state['done'], total)} {path.name} {size / 1e6:.1f} MB {what} ({rate:.1f} MB/s overall)")

    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in [VAL_SHARD] + [i for i in indices if i != VAL_SHARD]:  # the validation shard starts first
        jobs.put(i)

    def worker() -> None:
        while not stop.is_set():
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            one(i)

    # daemon threads (not a ThreadPoolExecutor, whose exit waits for every queued shard): Ctrl-C returns at once
    threads = [threading.Thread(target=worker, daemon=True, name=f"download-{k}")
               for k in range(max(1, min(workers, total)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:  # let the workers close their files (each checks `stop` between network reads)
            t.join(1.0)
        raise
    if errors:
        first = VAL_SHARD if VAL_SHARD in errors else min(errors)
        fix = "fix that" if first in local_errors else "check the network or --url"
        kept = f"; {len(held)} complete training shard(s) wait as .tmp for the validation shard" if held else ""
        raise UserError(f"{len(errors)} of {total} shard(s) failed to download (first: {errors[first]}){kept}; {fix} "
                        "and run the same command again (finished shards are kept)")
    write_source(base_dir, {"source": "download", "url": base_url})
    log(f"done: {total} shard(s) in {data_dir} ({state['bytes'] / 1e6:.1f} MB fetched, "
        f"{time.time() - state['t0']:.1f}s)")
    return [results[i] for i in indices]


def _bar(done: int, total: int, width: int = 20) -> str:
    """A progress bar such as `[########------------] 4/10`."""
    k = width * done // max(total, 1)
    return f"[{'#' * k}{'-' * (width - k)}] {done}/{total}"


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return " ".join(str(e).split())[:200] or type(e).__name__
