"""Checkpoints: round trips, the safetensors model file (and older model.pt checkpoints), the latest pointer,
pruning, corruption, crashes mid-save (SIGKILL), multi-rank saves, resume compatibility, RNG capture.
(load_model is tested in tests/eval/test_loading.py.)"""
from __future__ import annotations

import errno
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

import nanotrain.checkpoint as ck
from nanotrain.checkpoint import (
    capture_rng_state,
    latest_step,
    list_steps,
    load_checkpoint,
    prune,
    read_meta,
    resolve_step,
    restore_rng_state,
    save_checkpoint,
)
from nanotrain.errors import UserError
from nanotrain.resume import check_resume_compatible


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.randn(5).to(torch.bfloat16))  # upcast to fp32 on save, exact

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 5)
        return self.fc(self.emb(idx)) * self.scale.float()


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        idx = torch.randint(0, 11, (2, 3))
        loss = model(idx).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _resume(ckpt) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh process's view of a checkpoint: a new model and optimizer with its states loaded, RNG restored."""
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(ckpt.optim_state)
    restore_rng_state(ckpt.rank_state["rng"])
    return model, opt


def _meta(**over) -> dict:
    meta = {
        "model_config": {"sequence_len": 16, "vocab_size": 11, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
                         "n_embd": 8, "window_pattern": "L"},
        "train_config": {"depth": 2, "device_batch_size": 4, "total_batch_size": 128, "eval_every": 10,
                         "save_every": 5, "run": "dummy", "matrix_lr": 0.02},
        "loop_state": {"smooth_train_loss": 2.5, "min_val_bpb": float("inf"), "total_training_time": 12.5},
        "tokenizer_fingerprint": "tok0",
        "data_fingerprint": "data0",
    }
    meta.update(over)
    return meta


def _quick_save(d: Path, step: int, **kw) -> Path:
    state = {"w": torch.full((4,), float(step)) + torch.randn(4)}
    return save_checkpoint(d, step, state, {"m": torch.randn(3)}, _meta(), rank_state={"pos": step}, **kw)


# ----------------------------------------------------------------------------------------------- round trip
def test_round_trip_resumes_the_same_trajectory(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, opt, 2)
    rank_state = {"loader": {"shard": 3, "row": 17, "epoch": 1, "buffer": [5, 6, 7]}, "rng": capture_rng_state()}
    meta = _meta(loop_state={"smooth_train_loss": 2.5, "min_val_bpb": float("inf"), "step_times": [0.1, 0.2]})
    path = save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), meta, rank_state=rank_state)
    assert path == tmp_path / "step_000002"
    assert sorted(p.name for p in path.iterdir()) == ["CHECKSUMS", "meta.json", "model.safetensors",
                                                      "optim_rank0.pt", "rank0.pt"]
    expected_losses = _train_steps(model, opt, 3)  # the uninterrupted run continues

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 2 and ckpt.path == path
    assert ckpt.model_state["scale"].dtype == torch.float32  # bf16 saved as fp32
    assert ckpt.rank_state["loader"] == rank_state["loader"]
    assert ckpt.meta["step"] == 2 and ckpt.meta["world_size"] == 1 and ckpt.meta["optim_sharded"] is False
    assert ckpt.meta["loop_state"]["min_val_bpb"] == float("inf")
    assert ckpt.meta["loop_state"]["step_times"] == [0.1, 0.2]
    assert ckpt.meta["tokenizer_fingerprint"] == "tok0" and ckpt.meta["data_fingerprint"] == "data0"
    assert ckpt.meta["code_version"]["nanotrain"] and "saved_at" in ckpt.meta

    # A fresh process's view: new model and optimizer, states loaded, RNG restored -> the same losses, bitwise.
    torch.manual_seed(999)
    model2, opt2 = _resume(ckpt)
    assert _train_steps(model2, opt2, 3) == expected_losses
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_files_load_with_weights_only_and_sums_verify(tmp_path):
    path = _quick_save(tmp_path, 1)
    for name in ("optim_rank0.pt", "rank0.pt"):
        torch.load(path / name, weights_only=True)
    out = subprocess.run(["sha256sum", "-c", "CHECKSUMS"], cwd=path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == 4


def test_model_weights_are_a_safetensors_file(tmp_path):
    """model.safetensors holds every tensor under its state_dict name, float16/bfloat16 as float32, and no
    model.pt is written."""
    model = Tiny()
    path = save_checkpoint(tmp_path, 1, model.state_dict(), None, _meta())
    assert (path / "model.safetensors").is_file() and not (path / "model.pt").exists()
    assert "model.safetensors" in (path / "CHECKSUMS").read_text()
    with safetensors.safe_open(path / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
        for name, want in model.state_dict().items():
            got = f.get_tensor(name)
            assert got.dtype == torch.float32 and torch.equal(got, want.float()), name
    assert read_meta(tmp_path)["format"] == 2


def test_every_kind_of_tensor_round_trips_through_safetensors(tmp_path):
    """Tied, transposed and sliced tensors (safetensors stores each tensor's bytes once, contiguous), integer
    and bool buffers, a 0-d scalar and an empty tensor all read back equal, also through safetensors itself."""
    w = torch.randn(4, 6)
    state = {"a": w, "tied": w, "t": w.t(), "row": w[1], "ids": torch.arange(5), "mask": torch.tensor([True, False]),
             "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.empty(0, 3),
             "i8": torch.tensor([-3], dtype=torch.int8)}
    path = save_checkpoint(tmp_path, 1, state, None, _meta())
    for got in (load_checkpoint(tmp_path).model_state, safetensors.torch.load_file(path / "model.safetensors")):
        assert sorted(got) == sorted(state)
        for name, want in state.items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    with safetensors.safe_open(path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(TypeError, match=r"model_state\['z'\] has dtype torch.complex64"):
        save_checkpoint(tmp_path, 2, {"z": torch.zeros(2, dtype=torch.complex64)}, None, _meta())
    assert list_steps(tmp_path) == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def test_model_load_runs_no_pickle(tmp_path, monkeypatch):
    """Loading the weights (what evaluating a downloaded model does) never unpickles: torch.load is not called."""
    model = Tiny()
    save_checkpoint(tmp_path, 1, model.state_dict(), {"m": torch.ones(1)}, _meta(), rank_state={"pos": 1})

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called on the model load path")

    monkeypatch.setattr(torch, "load", no_pickle)
    ckpt = load_checkpoint(tmp_path, load_optim=False, load_rank_state=False)
    assert ckpt.optim_state is None and ckpt.rank_state is None
    for name, want in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], want.float()), name
    with pytest.raises(UserError, match="torch.load called"):  # the resume path still reads its .pt files
        load_checkpoint(tmp_path)


def _write_format1_checkpoint(ckpt_dir: Path, step: int, model_state: dict, optim_state: dict | None,
                              rank_state: dict | None, meta: dict) -> Path:
    """A checkpoint as nanotrain wrote it before model.safetensors (format 1): model.pt by torch.save, the same
    meta.json, CHECKSUMS and `latest`."""
    import hashlib

    d = ckpt_dir / f"step_{step:06d}"
    d.mkdir(parents=True)
    torch.save({k: v.float() for k, v in model_state.items()}, d / "model.pt")
    if optim_state is not None:
        torch.save(optim_state, d / "optim_rank0.pt")
    if rank_state is not None:
        torch.save(rank_state, d / "rank0.pt")
    meta = dict(meta, step=step, world_size=1, format=1, has_optim=optim_state is not None, optim_sharded=False,
                code_version={"nanotrain": "0.1.0", "git_commit": None, "git_dirty": None})
    (d / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    (d / "CHECKSUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    (ckpt_dir / "latest").write_text(d.name + "\n")
    return d


def test_format1_checkpoint_with_model_pt_still_loads_and_resumes(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, opt, 2)
    rng = capture_rng_state()
    old = _write_format1_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), {"rng": rng}, _meta())
    expected = _train_steps(model, opt, 2)
    assert list_steps(tmp_path) == [2] and latest_step(tmp_path) == 2
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == old and ckpt.meta["format"] == 1
    assert _train_steps(*_resume(ckpt), 2) == expected
    # a flipped byte in the old model file is caught by its checksum too
    data = bytearray((old / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (old / "model.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.pt is corrupt \(sha256 mismatch\)"):
        load_checkpoint(tmp_path)
    # the next save writes the new format beside the old one, and pruning counts both
    _quick_save(tmp_path, 3, keep_last=1)
    assert list_steps(tmp_path) == [3]
    assert (tmp_path / "step_000003" / "model.safetensors").is_file()


def test_save_refuses_state_weights_only_cannot_read(tmp_path):
    with pytest.raises(TypeError, match=r"rank_state\['loader'\]\['perm'\].*numpy"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, None, _meta(),
                        rank_state={"loader": {"perm": np.arange(3)}})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_compiled_prefix_stripped_and_views_compacted(tmp_path):
    big = torch.randn(1000)
    save_checkpoint(tmp_path, 1, {"_orig_mod.w": big[:4]}, None, _meta())
    ckpt = load_checkpoint(tmp_path)
    assert list(ckpt.model_state) == ["w"]
    assert torch.equal(ckpt.model_state["w"], big[:4])
    assert (tmp_path / "step_000001" / "model.safetensors").stat().st_size < 2000  # not the 4000-byte storage
    assert ckpt.optim_state is None and ckpt.meta["has_optim"] is False


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, None, _meta())
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, None, _meta())
    assert list_steps(tmp_path) == [3]
    assert torch.equal(load_checkpoint(tmp_path, 3).model_state["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003"]


# ----------------------------------------------------------------------------------------------- steps, latest, prune
def test_latest_pointer_and_resolve_step(tmp_path):
    for step in (5, 10, 20):
        _quick_save(tmp_path, step)
    assert (tmp_path / "latest").read_text() == "step_000020\n"
    assert list_steps(tmp_path) == [5, 10, 20]
    assert latest_step(tmp_path) == 20
    assert resolve_step(tmp_path, "latest") == 20
    assert resolve_step(tmp_path, 10) == 10 and resolve_step(tmp_path, "5") == 5
    with pytest.raises(UserError, match=r"no checkpoint for step 7 at .* \(steps found: 5, 10, 20\)"):
        resolve_step(tmp_path, 7)
    with pytest.raises(UserError, match=r"step number or 'latest'.*5, 10, 20"):
        resolve_step(tmp_path, "newest")
    # A run resumed from step 5 saves step 6: latest follows the save, not the highest number.
    _quick_save(tmp_path, 6)
    assert latest_step(tmp_path) == 6 and load_checkpoint(tmp_path).step == 6
    # A missing or garbled pointer falls back to the highest complete step.
    (tmp_path / "latest").write_text("garbage")
    assert latest_step(tmp_path) == 20
    (tmp_path / "latest").unlink()
    assert latest_step(tmp_path) == 20


def test_no_checkpoint_message(tmp_path):
    d = tmp_path / "base_checkpoints" / "d4"
    expected = f"no checkpoint at {d} (steps found: none); train first or check --model-tag/--base-dir"
    with pytest.raises(UserError) as exc:
        load_checkpoint(d)
    assert str(exc.value) == expected
    assert latest_step(d) is None and list_steps(d) == []
    with pytest.raises(UserError, match="no checkpoint at"):
        resolve_step(d, 3)


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        _quick_save(tmp_path, step, keep_last=2)
    assert list_steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004", "step_000005"]
    # Resumed from 4, saving 4.5-ish steps under lower numbers: keep the newest (5) and the latest save.
    _quick_save(tmp_path, 3, keep_last=1)
    assert list_steps(tmp_path) == [3, 5] and latest_step(tmp_path) == 3
    assert prune(tmp_path, 1) == []
    with pytest.raises(UserError, match="--keep-last must be at least 1"):
        prune(tmp_path, 0)
    with pytest.raises(UserError, match="--keep-last must be at least 1"):
        _quick_save(tmp_path, 9, keep_last=0)
    assert list_steps(tmp_path) == [3, 5]  # the refused save wrote nothing
    _quick_save(tmp_path, 9, keep_last=-1)
    assert list_steps(tmp_path) == [3, 5, 9]


# ----------------------------------------------------------------------------------------------- damage
def test_corruption_names_the_file_and_the_intact_step(tmp_path):
    _quick_save(tmp_path, 1)
    _quick_save(tmp_path, 2)
    target = tmp_path / "step_000002" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert list_steps(tmp_path) == [1, 2]  # structure intact; the bytes are checked on load
    with pytest.raises(UserError) as exc:
        load_checkpoint(tmp_path)
    msg = str(exc.value)
    assert str(target) in msg and "sha256 mismatch" in msg
    assert "step 1 is intact" in msg and "--resume-from-step=1" in msg
    assert load_checkpoint(tmp_path, 1).step == 1


def test_corruption_without_intact_fallback(tmp_path):
    _quick_save(tmp_path, 1)
    meta = tmp_path / "step_000001" / "meta.json"
    meta.write_text(meta.read_text().replace('"tok0"', '"tok1"'))
    with pytest.raises(UserError, match=r"meta\.json is corrupt \(sha256 mismatch\); there is no older checkpoint"):
        read_meta(tmp_path)


def test_incomplete_folders_ignored_and_leftovers_cleaned(tmp_path):
    _quick_save(tmp_path, 1)
    _quick_save(tmp_path, 4)
    # a step folder whose listed file is gone, and one without CHECKSUMS (e.g. copied by hand, half done)
    (tmp_path / "step_000004" / "rank0.pt").unlink()
    (tmp_path / "step_000003").mkdir()
    (tmp_path / "step_000003" / "model.pt").write_bytes(b"x")
    # a crashed save: a temporary folder with a truncated file (owner: a pid that has exited)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tmp_path / f"step_000002.tmp-{dead.pid}"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"PK\x03\x04trunc")
    (tmp_path / "latest.tmp-shared").write_text("step_000004")  # the pid/"shared" tags of earlier versions
    (tmp_path / "step_000006.tmp").mkdir()  # and this version's untagged name
    (tmp_path / "step_000006.tmp" / "model.safetensors").write_bytes(b"trunc")
    assert tmp.exists()
    assert list_steps(tmp_path) == [1]
    assert latest_step(tmp_path) == 1
    with pytest.raises(UserError, match=r"steps found: 1; incomplete, ignored: step_000003, step_000004"):
        resolve_step(tmp_path, 4)
    _quick_save(tmp_path, 5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_000001", "step_000003", "step_000004", "step_000005"]


def test_disk_full_is_a_user_error_and_leaves_previous(tmp_path, monkeypatch):
    _quick_save(tmp_path, 1)
    real = ck._write_torch

    def full(path, obj):
        if path.name == "optim_rank0.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(ck, "_write_torch", full)
    with pytest.raises(UserError, match=r"no space left on the device while writing checkpoint .*step_000002"):
        _quick_save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    assert load_checkpoint(tmp_path).step == 1


# ----------------------------------------------------------------------------------------------- SIGKILL mid-save
def _stall_in_child(phase: str, notify: int) -> None:
    """In the forked saver: make the save of step 2 stop at `phase` and tell the parent it got there."""
    def stall(*_args) -> None:
        os.write(notify, b"STALLED\n")
        time.sleep(120)

    if phase == "mid-file":  # inside the write of model.safetensors, half of the tensor's bytes on disk
        write = ck._HashingWriter.write

        def slow_write(self, data):
            if self.name == "model.safetensors" and len(data) >= 200_000:
                write(self, data[: len(data) // 2])
                os.fsync(self.f.fileno())
                stall()
            return write(self, data)
        ck._HashingWriter.write = slow_write
    elif phase == "before-rename":  # every file and CHECKSUMS written, the folder not yet renamed
        rename = os.rename

        def slow_rename(src, dst):
            if ".tmp" in str(src):
                stall()
            return rename(src, dst)
        ck.os.rename = slow_rename
    elif phase == "before-pointer":  # renamed, `latest` not yet moved
        ck._write_latest = stall


@pytest.mark.parametrize("phase", ["mid-file", "before-rename", "before-pointer"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, phase):
    """A saver process SIGKILLed at each stage of writing step 2 leaves step 1 loadable and `latest` on it.

    The saver is a fork of this process (a fresh interpreter would spend seconds importing torch); it only
    writes files, and leaves through os._exit whatever happens, so it never runs pytest's code.
    """
    d = tmp_path / "ckpts"
    w1 = torch.randn(256, 256)  # 256 kB: a model file large enough to stop half-way through
    save_checkpoint(d, 1, {"w": w1}, {"m": torch.ones(3)}, {"loop_state": {"step": 1}}, rank_state={"pos": 1})
    w2 = torch.randn(256, 256)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the saver
        code = 1
        try:
            os.close(read_end)
            _stall_in_child(phase, write_end)
            save_checkpoint(d, 2, {"w": w2}, {"m": torch.zeros(3)}, {"loop_state": {"step": 2}},
                            rank_state={"pos": 2})
            os.write(write_end, b"FINISHED\n")
            code = 0
        except BaseException as e:
            os.write(write_end, f"ERROR {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        said = os.read(read_end, 4096).decode().strip() if ready else "nothing within 60 s"
        assert said == "STALLED", f"the saver said {said!r}"
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(read_end)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    leftovers = [p.name for p in d.iterdir() if ".tmp" in p.name]
    assert (d / "latest").read_text() == "step_000001\n"
    assert latest_step(d) == 1
    ckpt = load_checkpoint(d, "latest")
    assert ckpt.step == 1 and ckpt.rank_state == {"pos": 1} and ckpt.meta["loop_state"] == {"step": 1}
    assert torch.equal(ckpt.model_state["w"], w1) and torch.equal(ckpt.optim_state["m"], torch.ones(3))
    if phase == "before-pointer":
        assert leftovers == [] and list_steps(d) == [1, 2]  # step 2 is complete and can be asked for by number
        assert torch.equal(load_checkpoint(d, 2).model_state["w"], w2)
    else:
        assert leftovers == ["step_000002.tmp"] and list_steps(d) == [1]
        if phase == "mid-file":
            assert 100_000 < (d / leftovers[0] / "model.safetensors").stat().st_size < w2.numel() * 4
        else:  # the folder has every file and valid sums, yet is not a checkpoint
            assert ck._is_complete(d / leftovers[0])
    _quick_save(d, 3)  # the next save cleans up
    assert [p.name for p in d.iterdir() if ".tmp" in p.name] == []
    assert latest_step(d) == 3


# ----------------------------------------------------------------------------------------------- several ranks
def _save_as_ranks(d: Path, step: int, world_size: int, optim_sharded: bool | None = None,
                   check: bool = True, bad_rank: int | None = None) -> list:
    """Save from `world_size` threads acting as ranks; each rank's returned path or raised exception."""
    gate = threading.Barrier(world_size, timeout=30)  # a hang (a rank skipping a barrier) fails, never blocks
    results: list = [None] * world_size

    def run(rank: int) -> None:
        try:
            meta = _meta() if optim_sharded is None else _meta(optim_sharded=optim_sharded)
            model_state = {"w": torch.arange(6.0)} if rank == 0 else None
            rank_state = {"rank": rank, "rng": capture_rng_state()}
            if rank == bad_rank:
                rank_state["perm"] = np.arange(3)  # not loadable with weights_only
            results[rank] = save_checkpoint(d, step, model_state, {"shard": torch.full((2,), float(rank))}, meta,
                                            rank_state=rank_state, rank=rank,
                                            world_size=world_size, barrier=gate.wait)
        except BaseException as e:  # returned to the test
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if check:
        for r in results:
            if isinstance(r, BaseException):
                raise r
    return results


def test_multi_rank_save_into_one_folder(tmp_path):
    paths = _save_as_ranks(tmp_path, 7, world_size=3)
    assert paths == [tmp_path / "step_000007"] * 3
    names = sorted(p.name for p in paths[0].iterdir())
    assert names == ["CHECKSUMS", "meta.json", "model.safetensors", "optim_rank0.pt", "optim_rank1.pt",
                     "optim_rank2.pt", "rank0.pt", "rank1.pt", "rank2.pt"]
    assert len((paths[0] / "CHECKSUMS").read_text().splitlines()) == 8
    for rank in range(3):
        ckpt = load_checkpoint(tmp_path, "latest", rank=rank)
        assert torch.equal(ckpt.optim_state["shard"], torch.full((2,), float(rank)))
        assert ckpt.rank_state["rank"] == rank
        assert torch.equal(ckpt.model_state["w"], torch.arange(6.0))
    meta = read_meta(tmp_path)
    assert meta["world_size"] == 3 and meta["optim_sharded"] is True
    # a 4th rank cannot invent a shard of a sharded optimizer state
    with pytest.raises(UserError, match="no optimizer shard for rank 3.*resume with 3 processes"):
        load_checkpoint(tmp_path, rank=3)
    assert load_checkpoint(tmp_path, rank=3, load_optim=False).rank_state is None


def test_multi_rank_unsharded_optimizer_serves_new_ranks(tmp_path):
    _save_as_ranks(tmp_path, 1, world_size=2, optim_sharded=False)
    ckpt = load_checkpoint(tmp_path, rank=2)
    assert torch.equal(ckpt.optim_state["shard"], torch.zeros(2))  # rank 0's copy
    assert ckpt.rank_state is None


@pytest.mark.parametrize("failing", ["rank1.pt", "model.safetensors"])
def test_multi_rank_failure_on_one_rank_fails_all_without_hanging(tmp_path, monkeypatch, failing):
    _save_as_ranks(tmp_path, 1, world_size=2)
    for writer in ("_write_torch", "_write_model"):
        def full(path, obj, real=getattr(ck, writer)):
            if path.name == failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, obj)

        monkeypatch.setattr(ck, writer, full)
    results = _save_as_ranks(tmp_path, 2, world_size=2, check=False)
    failed_rank = 1 if failing == "rank1.pt" else 0
    assert isinstance(results[failed_rank], UserError) and "no space left" in str(results[failed_rank])
    other = results[1 - failed_rank]
    expected = "rank 1 did not report" if failed_rank == 1 else "was not completed (rank 0 failed"
    assert isinstance(other, RuntimeError) and expected in str(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    assert load_checkpoint(tmp_path, rank=1).rank_state["rank"] == 1


def _gloo_rank(d: Path, store: Path, rank: int) -> None:
    """One rank of a two-process gloo group: saves steps 1 and 2 (keep_last=1), loads its part back."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for step in (1, 2):
            model = {"w": torch.arange(4.0) * step} if rank == 0 else None
            path = save_checkpoint(d, step, model, {"shard": torch.full((3,), 10.0 * step + rank)},
                                   {"loop_state": {"step": step}}, rank_state={"rank": rank}, rank=rank,
                                   world_size=2, keep_last=1)
            assert path == d / f"step_{step:06d}"
        dist.barrier()
        got = load_checkpoint(d, "latest", rank=rank)
        assert got.step == 2 and got.rank_state == {"rank": rank}, got
        assert torch.equal(got.optim_state["shard"], torch.full((3,), 20.0 + rank))
    finally:
        dist.destroy_process_group()


def test_torch_distributed_gloo_two_ranks(tmp_path):
    """The default barrier (torch.distributed) and the shared temporary folder (one name every rank derives).

    The ranks are forks of this process (a fresh interpreter each would spend seconds importing torch); each
    leaves through os._exit and reports through a pipe.
    """
    d, store = tmp_path / "ckpts", tmp_path / "store"
    children = []
    for rank in range(2):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                _gloo_rank(d, store, rank)
                os.write(write_end, b"OK")
                code = 0
            except BaseException as e:
                os.write(write_end, f"rank {rank}: {e!r}".encode())
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    reports = []
    try:
        for pid, read_end in children:
            ready, _, _ = select.select([read_end], [], [], 60)
            reports.append(os.read(read_end, 4096).decode() if ready else "no report within 60 s")
    finally:
        for pid, read_end in children:
            if reports != ["OK", "OK"]:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
    assert reports == ["OK", "OK"]
    assert list_steps(d) == [2]
    meta = read_meta(d)
    assert meta["world_size"] == 2 and meta["optim_sharded"] is True
    assert [p.name for p in d.iterdir() if ".tmp" in p.name] == []


def test_multi_rank_invalid_state_on_one_rank_writes_nothing(tmp_path):
    results = _save_as_ranks(tmp_path, 1, world_size=2, check=False, bad_rank=1)
    assert isinstance(results[1], TypeError) and "rank_state['perm']" in str(results[1])
    assert isinstance(results[0], RuntimeError) and "rank 1 did not report" in str(results[0])
    assert list(tmp_path.iterdir()) == []


def test_multi_rank_without_barrier_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a barrier"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, None, _meta(), rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------- resume checks
def _both(**changes):
    saved = _meta(world_size=2, optim_sharded=True)
    new = json.loads(json.dumps(saved))
    for key, value in changes.items():
        if key in ("depth", "device_batch_size", "total_batch_size", "eval_every", "save_every", "run",
                   "matrix_lr", "sample_every", "core_metric_every"):
            new["train_config"][key] = value
        elif key == "n_layer":
            new["model_config"]["n_layer"] = value
        else:
            new[key] = value
    return saved, new


@pytest.mark.parametrize("changes, message", [
    ({"n_layer": 3, "depth": 3},
     r"cannot resume: the model shape differs from the checkpoint's \(n_layer 2 -> 3\); resume with the "
     r"checkpoint's options \(--depth=2\) or start a new run under another --model-tag"),
    ({"tokenizer_fingerprint": "tok9"},
     r"cannot resume: the tokenizer differs .* \(fingerprint tok0 -> tok9\); restore the tokenizer/ folder"),
    ({"data_fingerprint": "data9"},
     r"cannot resume: the training data differs .* \(fingerprint data0 -> data9\); restore the base_data/ shards"),
    ({"world_size": 4},
     r"cannot resume: the checkpoint was written by 2 processes with a sharded optimizer state and this run has 4; "
     r"relaunch with 2 processes \(e\.g\. torchrun --nproc_per_node=2\)"),
    ({"device_batch_size": 8},
     r"cannot resume: --device-batch-size 4 -> 8 \(data stream \(rows per micro-batch\)\) changed since the "
     r"checkpoint"),
    ({"total_batch_size": 256, "matrix_lr": 0.04},
     r"cannot resume: --total-batch-size 128 -> 256 \(tokens per step\) changed"),
])
def test_resume_mismatch_refused(changes, message):
    saved, new = _both(**changes)
    with pytest.raises(UserError, match=message):
        check_resume_compatible(saved, new)


def test_resume_cadence_changes_allowed():
    saved, new = _both(eval_every=50, save_every=100, run="second-try", sample_every=-1, core_metric_every=-1)
    new["loop_state"] = {"anything": 1}
    assert check_resume_compatible(saved, new) == []


def test_resume_lr_and_horizon_changes_allowed_and_noted():
    saved, new = _both(matrix_lr=0.01)
    saved["train_config"]["num_iterations"] = 300
    new["train_config"]["num_iterations"] = 900
    assert check_resume_compatible(saved, new) == [
        "--num-iterations changed from 300 to 900 (training horizon (LR schedule))",
        "--matrix-lr changed from 0.02 to 0.01 (optimizer hyperparameters)"]


def test_resume_world_size_change_allowed_when_not_sharded():
    saved, new = _both(world_size=4)
    saved["optim_sharded"] = False
    check_resume_compatible(saved, new)
    # unknown fields on either side are not compared (older checkpoints)
    check_resume_compatible({"model_config": saved["model_config"]}, new)


def test_resume_check_against_a_saved_meta(tmp_path):
    _quick_save(tmp_path, 1)
    saved = read_meta(tmp_path)
    new = _meta(world_size=1)
    check_resume_compatible(saved, new)
    new["model_config"] = dict(new["model_config"], n_embd=16)
    with pytest.raises(UserError, match=r"n_embd 8 -> 16"):
        check_resume_compatible(saved, new)


# ----------------------------------------------------------------------------------------------- RNG
def _draw() -> tuple:
    return torch.rand(4).tolist(), torch.randn(3).tolist(), random.random(), random.gauss(0, 1), \
        np.random.rand(3).tolist(), np.random.randn(2).tolist()


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(7)
    np.random.seed(7)
    random.gauss(0, 1)  # leave a cached gaussian in both generators
    np.random.randn(1)
    state = capture_rng_state()
    first = _draw()
    _draw()
    restore_rng_state(state)
    assert _draw() == first
    # and through a checkpoint file (weights_only load)
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, None, _meta(), rank_state={"rng": state})
    _draw()
    restore_rng_state(load_checkpoint(tmp_path).rank_state["rng"])
    assert _draw() == first


@pytest.mark.gpu
def test_cuda_states_and_rng(tmp_path):
    torch.cuda.manual_seed(3)
    torch.randn(5, device="cuda")
    state = capture_rng_state()
    assert "torch_cuda" in state
    expected = torch.randn(4, device="cuda")
    w = torch.randn(3, device="cuda").to(torch.bfloat16)
    save_checkpoint(tmp_path, 1, {"w": w}, {"m": torch.randn(2, device="cuda")}, _meta(), rank_state={"rng": state})
    ckpt = load_checkpoint(tmp_path, device="cuda")
    assert ckpt.model_state["w"].is_cuda and ckpt.model_state["w"].dtype == torch.float32
    assert torch.equal(ckpt.model_state["w"], w.float()) and ckpt.optim_state["m"].is_cuda
    restore_rng_state(ckpt.rank_state["rng"])
    assert torch.equal(torch.randn(4, device="cuda"), expected)
