"""The checkpoint store: atomic save and verified load of a training run's full state, surviving crashes.

This module is the store only. Which options a resumed run may change is the resume policy
(nanotrain/resume.py, reading the rules from TrainConfig's field metadata in nanotrain/config.py), and
rebuilding a model for evaluation is nanotrain/eval/loading.py.

Layout (one folder per model tag, `paths.checkpoint_dir(tag, base)`):

    base_checkpoints/<tag>/
      latest                  one line naming the step folder saved last ("step_000500")
      step_000500/
        model.safetensors     model state_dict (rank 0; float16/bfloat16 tensors upcast to float32, on CPU), in the
                              safetensors format: loading it runs no pickle (safetensors reads it through mmap)
        optim_rank<r>.pt      optimizer state of rank r (its shard when the optimizer state is sharded)
        rank<r>.pt            per-rank extras: data-loader state, RNG state (`capture_rng_state`)
        meta.json             step, model_config, train_config, loop_state, world size, code version,
                              tokenizer and data fingerprints, time of the save
        CHECKSUMS             "<sha256>  <file>" for every other file (`sha256sum -c CHECKSUMS` works); written last
      step_000600.tmp/        a save in progress, or one a crash interrupted: never loaded, removed by the next save

Checkpoints written before the safetensors format hold model.pt (a torch.save state_dict) instead; they still
load (with torch.load(weights_only=True)), and a new save never writes one.

Why a crash never leaves a checkpoint that looks complete: every file is written into the temporary
folder and fsynced, CHECKSUMS last, then the folder is fsynced and renamed to `step_<N>` in one atomic
`rename`, and only then the `latest` pointer is replaced (write a temporary file, fsync, `os.replace`).
Loaders accept only folders named `step_<N>` whose CHECKSUMS lists the model file and meta.json and whose
listed files all exist; the bytes are verified against the sha256 sums when a checkpoint is loaded.
A process killed at any point leaves either the old state (plus a temporary folder the next save removes)
or the complete new checkpoint. One run writes into a tag at a time (a fresh run refuses a tag that has
checkpoints, `train.check_fresh_start`), so the leftovers of an interrupted save are always safe to remove.

Under torchrun all ranks write into the SAME temporary folder (the checkpoint folder must be on a
filesystem every rank sees): rank 0 creates it; a barrier; every rank writes its own files (rank 0 also
the model file) and reports their sums; a barrier; rank 0 writes meta.json and CHECKSUMS, renames the folder and
moves the pointer; a last barrier. The barrier is
`torch.distributed.barrier` when a process group is initialized, or any callable passed as `barrier=`
(tests use `threading.Barrier(n).wait`).

How the training loop uses it (every rank runs the same calls):

    ckpt_dir = paths.checkpoint_dir(tag, base)
    # resume: validate up front, then load this rank's part
    step = resolve_step(ckpt_dir, cfg.resume_from_step)          # "latest" or N; UserError lists the steps
    resume.check_resume_compatible(read_meta(ckpt_dir, step), new_meta)  # UserError on a shape/data change
    ckpt = load_checkpoint(ckpt_dir, step, rank=rank, device=device)
    raw_model.load_state_dict(ckpt.model_state); optimizer.load_state_dict(ckpt.optim_state)
    loader.load_state_dict(ckpt.rank_state["loader"]); restore_rng_state(ckpt.rank_state["rng"])
    # save (pass the raw model's state_dict: a DDP "module." prefix is kept, torch.compile's "_orig_mod." is not)
    save_checkpoint(ckpt_dir, step, raw_model.state_dict(), optimizer.state_dict(), meta,
                    rank_state={"loader": loader.state_dict(), "rng": capture_rng_state()},
                    rank=rank, world_size=world_size, keep_last=cfg.keep_last)

where meta = {"model_config": asdict(gpt_config), "train_config": cfg.to_dict(), "loop_state": {...},
"tokenizer_fingerprint": tok.fingerprint, "data_fingerprint": ..., "optim_sharded": bool} and new_meta is the
same dict built by the resuming run (plus "world_size").

Everything in the .pt files (optimizer and rank state) is plain Python containers, numbers, strings and
tensors, so every file loads with `torch.load(..., weights_only=True)` (the default since torch 2.6);
`save_checkpoint` refuses anything else (a numpy array, a custom object) before it writes a byte.

Where to add a new checkpoint field: run-level facts go into the meta dict the trainer builds (train.run_meta;
meta.json, checked by the resume policy when a resume must match it), per-rank state into rank_state
(rankN.pt), and anything the store itself must guarantee (a new file kind) into _write_rank_files/_finish
here, listed in CHECKSUMS like the others.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import safetensors.torch
import torch

import nanotrain
from nanotrain import distributed
from nanotrain.config import check_keep_last
from nanotrain.errors import UserError

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # the model file of checkpoints written before format 2; loaded, never written
META_FILE = "meta.json"
CHECKSUMS_FILE = "CHECKSUMS"
LATEST_FILE = "latest"
FORMAT_VERSION = 2  # 1: model.pt (torch.save); 2: model.safetensors

_STEP_RE = re.compile(r"^step_(\d+)$")
# Leftovers of interrupted saves and deletions: "<name>.<kind>". Earlier versions tagged them with the saving
# process ("<name>.<kind>-<pid>"); those are leftovers too.
_LEFTOVER_RE = re.compile(r"^(?:step_\d+|latest)\.(?:tmp|old|trash)(?:-[A-Za-z0-9]+)?$")
_PART_PREFIX = ".sums-rank"  # per-rank sums handed to rank 0 inside the temporary folder


class DiskFull(UserError):
    """A save ran out of disk space (ENOSPC/EDQUOT); nothing of it was published, earlier checkpoints are intact."""


@dataclass
class Checkpoint:
    """One loaded checkpoint: the states one rank needs to resume (or evaluate) a run."""
    step: int
    model_state: dict
    optim_state: dict | None
    rank_state: dict | None
    meta: dict
    path: Path


def step_dir_name(step: int) -> str:
    """The folder name of a step: step_000500."""
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------- finding steps
def _read_checksums(step_dir: Path) -> dict[str, str] | None:
    """{file: sha256} from CHECKSUMS, or None when it is missing or malformed."""
    try:
        text = (step_dir / CHECKSUMS_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    sums: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-f]{64})  ([A-Za-z0-9_.\-]+)", line)
        if m is None:
            return None
        sums[m.group(2)] = m.group(1)
    return sums


def _model_file(sums: dict[str, str]) -> str | None:
    """The model file a checkpoint's CHECKSUMS lists: model.safetensors, or model.pt in an older checkpoint."""
    return next((name for name in (MODEL_FILE, LEGACY_MODEL_FILE) if name in sums), None)


def _is_complete(step_dir: Path) -> bool:
    """Cheap structural check (no hashing): CHECKSUMS names a model file and meta.json and every listed file
    exists."""
    sums = _read_checksums(step_dir)
    if sums is None or _model_file(sums) is None or META_FILE not in sums:
        return False
    return all((step_dir / name).is_file() for name in sums)


def _step_dirs(ckpt_dir: Path) -> dict[int, Path]:
    """Every folder named step_<N> (complete or not), by step."""
    found: dict[int, Path] = {}
    try:
        entries = list(Path(ckpt_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1))] = entry
    return found


def list_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in ckpt_dir, ascending (in-progress and broken folders are skipped)."""
    return sorted(step for step, d in _step_dirs(Path(ckpt_dir)).items() if _is_complete(d))


def _read_latest_pointer(ckpt_dir: Path) -> int | None:
    try:
        m = _STEP_RE.match((ckpt_dir / LATEST_FILE).read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    """The step saved last: the `latest` pointer when it names a complete checkpoint, else the highest complete
    step; None when there is no checkpoint.

    The pointer wins over the highest number because a run resumed from an older step saves a newer
    timeline under lower numbers than the abandoned one.
    """
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if not steps:
        return None
    pointed = _read_latest_pointer(ckpt_dir)
    return pointed if pointed in steps else steps[-1]


def _describe_steps(ckpt_dir: Path, steps: list[int]) -> str:
    """'100, 200' (long lists shortened), 'none', plus any step folders skipped as incomplete."""
    if not steps:
        text = "none"
    elif len(steps) > 12:
        text = ", ".join(str(s) for s in steps[:3]) + ", ..., " + ", ".join(str(s) for s in steps[-8:])
    else:
        text = ", ".join(str(s) for s in steps)
    broken = sorted(d.name for s, d in _step_dirs(ckpt_dir).items() if s not in steps)
    if broken:
        text += f"; incomplete, ignored: {', '.join(broken)}"
    return text


def resolve_step(ckpt_dir: str | os.PathLike, spec: int | str) -> int:
    """The step a --resume-from-step / --step value names: "latest", or a step number (int or digits)."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if not steps:
        raise UserError(f"no checkpoint at {ckpt_dir} (steps found: {_describe_steps(ckpt_dir, steps)}); "
                        "train first or check --model-tag/--base-dir")
    if isinstance(spec, str) and spec.strip().lower() == "latest":
        step = latest_step(ckpt_dir)
        assert step is not None
        return step
    try:
        step = int(spec)
        if isinstance(spec, float) or isinstance(spec, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"the checkpoint step must be a step number or 'latest', got {spec!r}; "
                        f"steps at {ckpt_dir}: {_describe_steps(ckpt_dir, steps)}") from None
    if step not in steps:
        raise UserError(f"no checkpoint for step {step} at {ckpt_dir} "
                        f"(steps found: {_describe_steps(ckpt_dir, steps)}); pass one of those steps or 'latest'")
    return step


# ----------------------------------------------------------------------------------------------- low-level I/O
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (so nothing is read back to checksum)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name = f, name
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_torch(path: Path, obj: Any) -> str:
    """torch.save obj to a new file, fsync it, return its sha256."""
    with open(path, "xb") as f:
        w = _HashingWriter(f, path.name)
        torch.save(obj, w)
        w.flush()
        os.fsync(f.fileno())
    return w.sha.hexdigest()


# safetensors dtype names (the format's header spells each tensor's dtype this way)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _write_model(path: Path, model_state: dict[str, torch.Tensor]) -> str:
    """Write the model state as a safetensors file, new, fsynced; return its sha256.

    The file is streamed tensor by tensor (an 8-byte little-endian header length, the JSON header naming each
    tensor's dtype, shape and byte range, then the bytes), so a save never holds a second copy of the whole
    model in memory; `safetensors.torch.load_file` / `safe_open` read it back (tests check that they do).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in model_state.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensor bytes start 8-byte aligned
    with open(path, "xb") as f:
        w = _HashingWriter(f, path.name)
        w.write(len(head).to_bytes(8, "little") + head)
        for t in model_state.values():  # contiguous CPU tensors (_prepare_model_state)
            if t.numel():
                w.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        w.flush()
        os.fsync(f.fileno())
    return w.sha.hexdigest()


def _write_bytes(path: Path, data: bytes) -> str:
    """Write data to a new file, fsync it, return its sha256."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_latest(ckpt_dir: Path, name: str) -> None:
    """Point `latest` at a step folder: write a temporary file, fsync, rename over the old pointer."""
    tmp = ckpt_dir / f"{LATEST_FILE}.tmp"
    tmp.unlink(missing_ok=True)
    _write_bytes(tmp, (name + "\n").encode())
    os.replace(tmp, ckpt_dir / LATEST_FILE)
    _fsync_dir(ckpt_dir)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(ckpt_dir: str | os.PathLike) -> list[str]:
    """Remove what interrupted saves left behind (temporary step folders, half-deleted ones, pointer temp files).

    Returns the names removed. Called by rank 0 at the start of every save (one run saves into a tag at a
    time, so nothing else can be writing them).
    """
    ckpt_dir = Path(ckpt_dir)
    removed = []
    try:
        entries = list(ckpt_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if _LEFTOVER_RE.match(entry.name) is None:
            continue
        _remove(entry)
        removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------------------------- state checks
_PLAIN_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless obj is made of containers, numbers, strings and tensors (weights_only-loadable)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(f"{where} is a tensor subclass ({type(obj).__name__}); save a plain tensor instead")
        return
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
                    "cannot read back; convert it to plain Python containers, numbers, strings or tensors")


def _prepare_model_state(model_state: dict) -> dict:
    """The model state as saved: detached contiguous CPU tensors, float16/bfloat16 upcast to float32 (exact),
    views compacted (so a slice does not drag its whole storage along), tensors that share memory given their
    own copy (safetensors stores each tensor's bytes once), torch.compile's `_orig_mod.` stripped."""
    out = {}
    seen: set[int] = set()
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}] is a {type(value).__name__}, expected a tensor")
        t = value.detach().cpu()  # to the host first: upcasting on the GPU could run out of memory mid-save
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"model_state[{key!r}] has dtype {t.dtype}, which the safetensors model file cannot "
                            "store; convert it to a float or integer tensor")
        ptr = t.untyped_storage().data_ptr()
        if (t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous()
                or (t.numel() and ptr in seen)):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[key.replace("_orig_mod.", "")] = t
    return out


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serializable; put plain values in the checkpoint meta")


def jsonable(obj: Any) -> Any:
    """obj as it reads back from meta.json (dataclasses to dicts, tuples to lists, ...)."""
    return json.loads(json.dumps(obj, default=_json_default))


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"nanotrain": version, "git_commit": sha or None, "git_dirty": bool or None} of the running code."""
    pkg = Path(nanotrain.__file__).resolve().parent
    commit, dirty = None, None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "nanotrain" == pkg:  # the package's own repository, not a repo the venv happens to live in
            commit = git("rev-parse", "HEAD")
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nanotrain": nanotrain.__version__, "git_commit": commit, "git_dirty": dirty}


# ----------------------------------------------------------------------------------------------- saving
def _resolve_barrier(barrier: Callable[[], None] | None, world_size: int) -> Callable[[], None]:
    if barrier is not None:
        return barrier
    if world_size == 1:
        return lambda: None
    if distributed.is_initialized():
        return distributed.barrier
    raise ValueError(f"save_checkpoint with world_size={world_size} needs a barrier: initialize torch.distributed "
                     "or pass barrier=")


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model_state: dict | None, optim_state: dict | None,
                    meta: dict, rank_state: dict | None = None, rank: int = 0, world_size: int = 1,
                    keep_last: int | None = None, *, barrier: Callable[[], None] | None = None) -> Path:
    """Atomically save step `step` into ckpt_dir/step_<N>/ and point `latest` at it; returns that folder.

    Call on EVERY rank with the same step, meta and world_size. model_state is used on rank 0 only (others may
    pass None). optim_state: this rank's optimizer state_dict (None to save none). rank_state: this rank's
    extras, e.g. {"loader": loader.state_dict(), "rng": capture_rng_state()}. meta: JSON-able dict with
    "model_config", "train_config", "loop_state", "tokenizer_fingerprint", "data_fingerprint" and optionally
    "optim_sharded" (default: True when world_size > 1); step, world_size, code version and time are added.
    keep_last: prune to the newest N checkpoints afterwards (None or -1 keeps all; checked before anything is
    written, with the one rule of --keep-last, config.check_keep_last). barrier: synchronizes the
    ranks (default torch.distributed.barrier when world_size > 1).

    Raises UserError when the disk is full (the previous checkpoints stay intact), TypeError when a state holds
    something torch.load(weights_only=True) could not read back.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if keep_last is not None:
        check_keep_last(keep_last)
    sync = _resolve_barrier(barrier, world_size)
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)

    tmp = ckpt_dir / f"{final.name}.tmp"  # every rank derives the same name
    # Every rank calls the barrier exactly three times even when its own work fails (later work is skipped and
    # the first error raised at the end), so one rank's failure never leaves the others waiting forever.
    errors: list[Exception] = []

    def attempt(work: Callable[[], Any]) -> Any:
        if not errors:
            try:
                return work()
            except Exception as e:  # deferred past the barriers; KeyboardInterrupt & co. propagate at once
                errors.append(e)
        return None

    def validate() -> None:  # everything is checked before a byte is written
        nonlocal model_state, meta
        if rank == 0:
            if not isinstance(model_state, dict) or not model_state:
                raise ValueError("rank 0 must pass the model state_dict to save_checkpoint")
            model_state = _prepare_model_state(model_state)
            meta = jsonable(meta)
        if optim_state is not None:
            _check_plain(optim_state, "optim_state")
        if rank_state is not None:
            _check_plain(rank_state, "rank_state")

    sums: dict[str, str] = {}
    try:
        attempt(validate)
        if rank == 0:
            attempt(lambda: _make_tmp(ckpt_dir, tmp))
        sync()
        attempt(lambda: sums.update(_write_rank_files(tmp, rank, model_state, optim_state, rank_state)))
        sync()
        if rank == 0:
            attempt(lambda: _finish(ckpt_dir, tmp, final, step, world_size, sums, meta, keep_last))
        sync()
    except BaseException:
        if rank == 0:
            _remove(tmp)
        raise
    if errors:
        if rank == 0:
            _remove(tmp)
        e = errors[0]
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device while writing checkpoint {final} ({e.strerror}); the "
                            "earlier checkpoints are intact: free disk space or pass --keep-last N") from None
        raise e
    if rank != 0:  # did rank 0 publish this rank's files? (it fails alone when, e.g., its disk fills up)
        published = _read_checksums(final) or {}
        if any(published.get(name) != sha for name, sha in sums.items()):
            raise RuntimeError(f"checkpoint {final} was not completed (rank 0 failed; see its error)")
    return final


def _make_tmp(ckpt_dir: Path, tmp: Path) -> None:
    """Rank 0, before anyone writes: the checkpoint folder exists, leftovers are gone, tmp is new and empty."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(ckpt_dir)
    _remove(tmp)
    tmp.mkdir()


def _write_rank_files(tmp: Path, rank: int, model_state: dict | None, optim_state: dict | None,
                      rank_state: dict | None) -> dict[str, str]:
    """Write this rank's files into tmp; ranks other than 0 also leave their sums there for rank 0."""
    if not tmp.is_dir():
        raise RuntimeError(f"the temporary checkpoint folder {tmp} does not exist on rank {rank}; "
                           "is the checkpoint folder on a filesystem every rank sees?")
    sums: dict[str, str] = {}
    if rank == 0:
        sums[MODEL_FILE] = _write_model(tmp / MODEL_FILE, model_state)
    if optim_state is not None:
        sums[f"optim_rank{rank}.pt"] = _write_torch(tmp / f"optim_rank{rank}.pt", optim_state)
    if rank_state is not None:
        sums[f"rank{rank}.pt"] = _write_torch(tmp / f"rank{rank}.pt", rank_state)
    if rank != 0:
        _write_bytes(tmp / f"{_PART_PREFIX}{rank}.json", json.dumps(sums).encode())
    return sums


def _finish(ckpt_dir: Path, tmp: Path, final: Path, step: int, world_size: int, sums: dict[str, str], meta: dict,
            keep_last: int | None) -> None:
    """Rank 0, after every rank wrote: gather sums, write meta.json and CHECKSUMS, rename, move `latest`, prune."""
    for r in range(1, world_size):
        part = tmp / f"{_PART_PREFIX}{r}.json"
        try:
            sums.update(json.loads(part.read_text()))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"rank {r} did not report its checkpoint files ({e}); "
                               f"is {ckpt_dir} on a filesystem every rank sees?") from None
        part.unlink()
    missing = [name for name in sums if not (tmp / name).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint files missing from {tmp}: {missing}; "
                           f"is {ckpt_dir} on a filesystem every rank sees?")
    has_optim = any(name.startswith("optim_rank") for name in sums)
    meta = dict(meta)
    meta.setdefault("optim_sharded", world_size > 1 and has_optim)
    meta.update(step=step, world_size=world_size, format=FORMAT_VERSION, has_optim=has_optim,
                code_version=code_version(), torch_version=torch.__version__,
                timestamp=time.time(),
                saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    sums[META_FILE] = _write_bytes(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
    lines = "".join(f"{sums[name]}  {name}\n" for name in sorted(sums))
    _write_bytes(tmp / CHECKSUMS_FILE, lines.encode())
    _fsync_dir(tmp)
    old = None
    if final.exists():  # saving a step again: set the old copy aside, then drop it
        old = final.with_name(f"{final.name}.old")
        _remove(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    if old is not None:
        _remove(old)
    _write_latest(ckpt_dir, final.name)
    if keep_last is not None and keep_last != -1:
        try:
            _prune(ckpt_dir, keep_last)
        except OSError as e:  # the new checkpoint is complete; an old one left behind is not worth failing over
            warnings.warn(f"could not prune old checkpoints in {ckpt_dir}: {e}", stacklevel=3)


def prune(ckpt_dir: str | os.PathLike, keep_last: int) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep_last` (-1: none); returns the steps deleted.

    Never deletes the highest step nor the one `latest` points at; never touches a save in progress (those
    are not `step_<N>` folders yet). Each folder is renamed before it is deleted, so a crash mid-delete
    leaves a leftover the next save removes, never a half-deleted folder under a step name.
    """
    check_keep_last(keep_last)
    return [] if keep_last == -1 else _prune(Path(ckpt_dir), keep_last)


def _prune(ckpt_dir: Path, keep_last: int) -> list[int]:
    """prune with keep_last >= 1 already checked."""
    steps = list_steps(ckpt_dir)
    keep = set(steps[-keep_last:])
    latest = latest_step(ckpt_dir)
    if latest is not None:
        keep.add(latest)
    deleted = []
    for step in steps:
        if step in keep:
            continue
        d = ckpt_dir / step_dir_name(step)
        trash = d.with_name(f"{d.name}.trash")
        _remove(trash)
        os.rename(d, trash)
        _remove(trash)
        deleted.append(step)
    if deleted:
        _fsync_dir(ckpt_dir)
    return deleted


# ----------------------------------------------------------------------------------------------- loading
def _intact(step_dir: Path) -> bool:
    """Every file listed in CHECKSUMS exists and matches its sum (reads the whole checkpoint)."""
    sums = _read_checksums(step_dir)
    if sums is None:
        return False
    try:
        return all(_sha256_file(step_dir / name) == sha for name, sha in sums.items())
    except OSError:
        return False


def _corrupt(ckpt_dir: Path, step: int, name: str, why: str) -> UserError:
    """The error for a damaged file, naming the newest older checkpoint that verifies."""
    path = ckpt_dir / step_dir_name(step) / name
    older = [s for s in list_steps(ckpt_dir) if s < step]
    intact = next((s for s in reversed(older) if _intact(ckpt_dir / step_dir_name(s))), None)
    if intact is None:
        hint = "no older checkpoint is intact either" if older else "there is no older checkpoint"
        return UserError(f"checkpoint file {path} is corrupt ({why}); {hint}: restore the file or start a new run")
    return UserError(f"checkpoint file {path} is corrupt ({why}); step {intact} is intact: "
                     f"resume with --resume-from-step={intact} (or delete {path.parent})")


def _verified_path(ckpt_dir: Path, step: int, sums: dict[str, str], name: str) -> Path:
    path = ckpt_dir / step_dir_name(step) / name
    try:
        actual = _sha256_file(path)
    except OSError as e:
        raise _corrupt(ckpt_dir, step, name, f"unreadable: {e.strerror or e}") from None
    if actual != sums[name]:
        raise _corrupt(ckpt_dir, step, name, "sha256 mismatch")
    return path


def _unloadable(path: Path, e: Exception) -> UserError:
    # the sums match, so this is a file nanotrain did not write
    return UserError(f"checkpoint file {path} cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                     "it was not written by nanotrain's save_checkpoint: start a new run or restore it")


def _load_torch(ckpt_dir: Path, step: int, sums: dict[str, str], name: str, device) -> Any:
    path = _verified_path(ckpt_dir, step, sums, name)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise _unloadable(path, e) from None


def _load_model_state(ckpt_dir: Path, step: int, sums: dict[str, str], device) -> dict[str, torch.Tensor]:
    """The model state_dict: model.safetensors memory-mapped (no pickle), or an older checkpoint's model.pt."""
    name = _model_file(sums)
    if name == LEGACY_MODEL_FILE:
        return _load_torch(ckpt_dir, step, sums, name, device)
    path = _verified_path(ckpt_dir, step, sums, MODEL_FILE)
    try:
        return safetensors.torch.load_file(path, device=str(torch.device(device)))
    except Exception as e:
        raise _unloadable(path, e) from None


def read_meta(ckpt_dir: str | os.PathLike, step: int | str = "latest") -> dict:
    """meta.json of a checkpoint (verified against CHECKSUMS), without loading any tensor."""
    ckpt_dir = Path(ckpt_dir)
    n = resolve_step(ckpt_dir, step)
    sums = _read_checksums(ckpt_dir / step_dir_name(n))
    if sums is None:  # removed between listing and reading
        raise UserError(f"checkpoint {ckpt_dir / step_dir_name(n)} disappeared while loading; try again")
    path = _verified_path(ckpt_dir, n, sums, META_FILE)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise _corrupt(ckpt_dir, n, META_FILE, f"not JSON: {e}") from None


def load_checkpoint(ckpt_dir: str | os.PathLike, step: int | str = "latest", rank: int = 0, device="cpu",
                    load_optim: bool = True, load_rank_state: bool = True) -> Checkpoint:
    """Load what `rank` needs from a checkpoint, every file verified against CHECKSUMS.

    step: a step number or "latest". Tensors are mapped to `device`. optim_state is None when load_optim is
    False or the checkpoint holds no optimizer state; a rank the saving run did not have reads rank 0's
    optimizer state when it was not sharded (UserError when it was). rank_state is None when this rank saved
    none, or when load_rank_state is False. With load_optim and load_rank_state False (what evaluation needs) no
    .pt file is read: the weights come from model.safetensors, without unpickling anything. Raises UserError
    when there is no such checkpoint (listing the steps found) or a file is corrupt
    (naming the file and the newest older intact step).
    """
    ckpt_dir = Path(ckpt_dir)
    n = resolve_step(ckpt_dir, step)
    step_dir = ckpt_dir / step_dir_name(n)
    meta = read_meta(ckpt_dir, n)
    sums = _read_checksums(step_dir)
    if sums is None:  # removed between reading meta and here (a concurrent prune)
        raise UserError(f"checkpoint {step_dir} disappeared while loading; try again")
    model_state = _load_model_state(ckpt_dir, n, sums, device)
    optim_state = None
    if load_optim:
        own, first = f"optim_rank{rank}.pt", "optim_rank0.pt"
        saved_world = meta["world_size"]
        if own in sums:
            optim_state = _load_torch(ckpt_dir, n, sums, own, device)
        elif first in sums and not meta["optim_sharded"]:
            optim_state = _load_torch(ckpt_dir, n, sums, first, device)
        elif any(name.startswith("optim_rank") for name in sums):
            raise UserError(f"checkpoint {step_dir} has no optimizer shard for rank {rank}: it was written by "
                            f"{saved_world} processes with a sharded optimizer state; resume with {saved_world} "
                            "processes")
    rank_file = f"rank{rank}.pt"
    rank_state = None
    if load_rank_state and rank_file in sums:
        rank_state = _load_torch(ckpt_dir, n, sums, rank_file, "cpu")
    return Checkpoint(step=n, model_state=model_state, optim_state=optim_state, rank_state=rank_state, meta=meta,
                      path=step_dir)


def load_rank_files(ckpt_dir: str | os.PathLike, step: int,
                    device="cpu") -> tuple[list[dict | None], list[dict | None]]:
    """(rank_state, optim_state) of EVERY rank that wrote a checkpoint, each verified against CHECKSUMS (None
    where a rank saved none): what a resume on another number of processes merges and re-shards."""
    ckpt_dir = Path(ckpt_dir)
    n = resolve_step(ckpt_dir, step)
    world = read_meta(ckpt_dir, n)["world_size"]
    sums = _read_checksums(ckpt_dir / step_dir_name(n))
    if sums is None:
        raise UserError(f"checkpoint {ckpt_dir / step_dir_name(n)} disappeared while loading; try again")
    ranks = [_load_torch(ckpt_dir, n, sums, f"rank{r}.pt", "cpu") if f"rank{r}.pt" in sums else None
             for r in range(world)]
    optims = [_load_torch(ckpt_dir, n, sums, f"optim_rank{r}.pt", device) if f"optim_rank{r}.pt" in sums else None
              for r in range(world)]
    return ranks, optims


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """The state of every random generator a training step may draw from: torch CPU, CUDA (current device,
    when CUDA is in use), MPS, Python `random` and numpy's global generator; saveable with weights_only."""
    np_state = np.random.get_state(legacy=False)
    state: dict = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the generator states `capture_rng_state` returned (CUDA/MPS only where present on both sides)."""
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": np.asarray(npst["key"], dtype=np.int64).astype(np.uint32),
                                   "pos": int(npst["pos"])},
                         "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])})
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if "torch_mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["torch_mps"])


__all__ = ["Checkpoint", "DiskFull", "capture_rng_state", "clean_stale", "code_version", "jsonable", "latest_step",
           "list_steps", "load_checkpoint", "load_rank_files", "prune", "read_meta", "resolve_step",
           "restore_rng_state", "save_checkpoint", "step_dir_name"]
