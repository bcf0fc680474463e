"""The trainer end to end on CPU: a tiny model trains, evaluates, samples, saves, resumes exactly,
stops cleanly on a signal or a diverged loss."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanotrain import checkpoint, train
from nanotrain.config import parse_args
from nanotrain.errors import UserError

TINY = ["--device-type=cpu", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
        "--device-batch-size=4", "--total-batch-size=512", "--window-pattern=SL", "--core-metric-every=-1",
        "--eval-tokens=1024", "--warmup-ratio=0.1"]


def run(base, tag, *extra):
    return train.main([*TINY, f"--base-dir={base}", f"--model-tag={tag}", *extra])


def metrics(base, tag):
    path = base / "base_checkpoints" / tag / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_trains_evaluates_samples_and_saves(tiny_base_dir, capsys):
    # LRs 4x the defaults: the batch is 1/1024 of the reference batch, which scales the LRs down by 32
    assert run(tiny_base_dir, "e2e", "--num-iterations=30", "--eval-every=15", "--sample-every=30", "--matrix-lr=0.08",
               "--embedding-lr=1.2", "--unembedding-lr=0.016", "--scalar-lr=2") == 0
    out = capsys.readouterr().out
    assert "Vocab size: " in out and "✓ attention:" in out and "step 00029/00030" in out
    assert "sample:" in out and "Minimum validation bpb" in out
    rows = metrics(tiny_base_dir, "e2e")
    bpb = [r["val/bpb"] for r in rows if "val/bpb" in r]
    assert len(bpb) == 3 and bpb[2] < bpb[1] < bpb[0] and bpb[2] < 0.75 * bpb[0], bpb  # steps 0, 15, 30
    losses = [r["train/loss_raw"] for r in rows if "train/loss_raw" in r]
    assert len(losses) == 30 and losses[-1] < losses[0]
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "e2e"
    assert checkpoint.latest_step(ckpt_dir) == 30
    assert (ckpt_dir / "plot.png").stat().st_size > 1000


def test_resume_gives_the_same_losses_and_weights(tiny_base_dir):
    assert run(tiny_base_dir, "straight", "--num-iterations=12", "--eval-every=-1", "--sample-every=-1") == 0
    assert run(tiny_base_dir, "resumed", "--num-iterations=12", "--eval-every=-1", "--sample-every=-1",
               "--save-every=5") == 0
    # throw away everything after step 5 and resume from it
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "resumed"
    assert 5 in checkpoint.list_steps(ckpt_dir)
    assert run(tiny_base_dir, "resumed", "--num-iterations=12", "--eval-every=-1", "--sample-every=-1",
               "--save-every=5", "--resume-from-step=5") == 0
    straight = [r["train/loss_raw"] for r in metrics(tiny_base_dir, "straight") if "train/loss_raw" in r]
    resumed = [r for r in metrics(tiny_base_dir, "resumed") if "train/loss_raw" in r]
    by_step = {r["step"]: r["train/loss_raw"] for r in resumed}  # the resumed run rewrote steps 5..11
    assert [by_step[s] for s in range(12)] == straight
    a = checkpoint.load_checkpoint(tiny_base_dir / "base_checkpoints" / "straight", "latest").model_state
    b = checkpoint.load_checkpoint(ckpt_dir, "latest").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_model(tiny_base_dir, capsys):
    assert run(tiny_base_dir, "shape", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1") == 0
    code = train.main([*TINY, f"--base-dir={tiny_base_dir}", "--model-tag=shape", "--num-iterations=4",
                       "--resume-from-step=latest", "--eval-every=-1", "--sample-every=-1", "--aspect-ratio=64"])
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_missing_checkpoint_is_one_clear_line(tiny_base_dir, capsys):
    assert run(tiny_base_dir, "nothing-here", "--num-iterations=2", "--resume-from-step=7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    assert train.main([*TINY, f"--base-dir={tmp_path}", "--num-iterations=2"]) == 2
    err = capsys.readouterr().err
    assert "nanotrain-data" in err and "Traceback" not in err


def test_fp8_on_cpu_is_refused_before_any_work(tiny_base_dir, capsys):
    assert run(tiny_base_dir, "fp8", "--num-iterations=2", "--fp8") == 2
    assert "--fp8" in capsys.readouterr().err
    assert not (tiny_base_dir / "base_checkpoints" / "fp8" / "latest").exists()


def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tiny_base_dir, monkeypatch, capsys):
    real = train.train_micro_steps
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, x, y = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 5 else loss), x, y

    monkeypatch.setattr(train, "train_micro_steps", poisoned)
    code = run(tiny_base_dir, "nan", "--num-iterations=10", "--save-every=2", "--eval-every=-1", "--sample-every=-1")
    assert code == 3
    err = capsys.readouterr().err
    assert "step 4" in err and "step 4)" in err and "nan" in err  # diverged at step 4, last good checkpoint 4
    assert checkpoint.latest_step(tiny_base_dir / "base_checkpoints" / "nan") == 4


def test_sigterm_saves_a_resumable_checkpoint(tiny_base_dir):
    cmd = [sys.executable, "-m", "nanotrain", *TINY, f"--base-dir={tiny_base_dir}", "--model-tag=sigterm",
           "--num-iterations=30", "--eval-every=-1", "--sample-every=-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 00003"):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume-from-step=latest" in out
    step = checkpoint.latest_step(tiny_base_dir / "base_checkpoints" / "sigterm")
    assert step is not None and step >= 4
    assert step < 30, "the run ended before the signal arrived"
    cfg = parse_args([*TINY, f"--base-dir={tiny_base_dir}", "--model-tag=sigterm", "--num-iterations=30",
                      "--resume-from-step=latest", "--eval-every=-1", "--sample-every=-1"])
    assert train.train(cfg).step == 30


def test_kernel_table_lists_every_op(capsys):
    assert train.main(["--kernels"]) == 0
    out = capsys.readouterr().out
    for op in ("attention", "muon", "packing"):
        assert f"✓ {op}:" in out
    assert "extension nanotrain._C:" in out


def _oom_on_first_call(monkeypatch):
    real = train.train_micro_steps
    calls = {"n": 0, "batch_sizes": [], "tokens": []}

    def flaky(model, x, y, train_iter, grad_accum, *args, **kwargs):
        calls["n"] += 1
        calls["batch_sizes"].append(x.shape[0])
        calls["tokens"].append(x.numel() * grad_accum)  # tokens of the step (every micro-batch is x's size)
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, x, y, train_iter, grad_accum, *args, **kwargs)

    monkeypatch.setattr(train, "train_micro_steps", flaky)
    return calls


def test_first_step_oom_names_a_batch_that_fits(tiny_base_dir, monkeypatch, capsys):
    _oom_on_first_call(monkeypatch)
    assert run(tiny_base_dir, "oom", "--num-iterations=3", "--eval-every=-1", "--sample-every=-1") == 4
    err = capsys.readouterr().err
    assert "out of memory at --device-batch-size=4: --device-batch-size=2 fits" in err
    assert "--oom-auto-batch" in err


def test_first_step_oom_with_auto_batch_halves_and_keeps_the_total(tiny_base_dir, monkeypatch, capsys):
    calls = _oom_on_first_call(monkeypatch)
    assert run(tiny_base_dir, "oom-auto", "--num-iterations=3", "--eval-every=-1", "--sample-every=-1",
               "--oom-auto-batch") == 0
    assert "lowering it to 2 and raising gradient accumulation from 2 to 4" in capsys.readouterr().err
    assert calls["batch_sizes"] == [4, 2, 2, 2]  # 512 tokens a step = 4 micro-steps of 2 x 64 after the halving
    meta = checkpoint.read_meta(tiny_base_dir / "base_checkpoints" / "oom-auto")
    assert meta["train_config"]["device_batch_size"] == 2


REAL_BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "core_eval_bundle"


@pytest.mark.skipif(not REAL_BUNDLE.is_dir(), reason="the CORE bundle is not at ../shared/data/core_eval_bundle")
def test_core_metric_during_training_on_the_real_bundle(tiny_base_dir, capsys):
    assert run(tiny_base_dir, "core", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1",
               "--core-metric-every=2", "--core-metric-max-per-task=2", f"--eval-bundle-dir={REAL_BUNDLE}") == 0
    out = capsys.readouterr().out
    assert "Step 00002 | CORE metric: " in out
    row = [r for r in metrics(tiny_base_dir, "core") if "core_metric" in r][-1]
    assert row["step"] == 2 and -1.0 <= row["core_metric"] <= 1.0


def test_compile_choice_per_device(monkeypatch):
    cfg = parse_args(["--device-type=cpu"])
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert train.use_compile(cfg, cuda, 10)
    assert not train.use_compile(cfg, cpu, train.CPU_COMPILE_MIN_STEPS - 1)
    assert not train.use_compile(cfg, mps, 10**6)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    assert train.use_compile(cfg, cpu, train.CPU_COMPILE_MIN_STEPS)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert not train.use_compile(cfg, cpu, 10**6)  # inductor needs a C++ compiler on CPU
    assert not train.use_compile(parse_args(["--compile=off"]), cuda, 10)
    assert train.use_compile(parse_args(["--compile=on"]), cpu, 1)


def test_fp8_is_not_compiled_on_a_torch_whose_compile_drops_its_gradients(monkeypatch):
    fp8 = parse_args(["--fp8"])
    cuda = torch.device("cuda")
    assert train.use_compile(fp8, cuda, 10)  # the pinned torch (2.14.1) compiles FP8 correctly
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    on, why = train.compile_decision(fp8, cuda, 10)
    assert not on and why.startswith("torch.compile: off (--compile=auto with --fp8: torch 2.11.0+cu130's")
    with pytest.raises(UserError, match="install torch==2.14.1 or pass --compile=off"):
        train.compile_decision(parse_args(["--fp8", "--compile=on"]), cuda, 10)
    assert train.compile_decision(parse_args(["--fp8", "--compile=off"]), cuda, 10) == (False, None)
    assert train.use_compile(parse_args([]), cuda, 10)  # without FP8 it compiles


def test_nanotrain_eval_reads_a_checkpoint_the_trainer_wrote(tiny_base_dir, capsys):
    from nanotrain.eval.cli import main as eval_main

    assert run(tiny_base_dir, "for-eval", "--num-iterations=3", "--eval-every=-1", "--sample-every=-1") == 0
    assert eval_main(["--model-tag=for-eval", f"--base-dir={tiny_base_dir}", "--eval=bpb,sample",
                      "--eval-tokens=1024", "--device-batch-size=4", "--device-type=cpu"]) == 0
    report = json.loads((tiny_base_dir / "base_checkpoints" / "for-eval" / "eval_step_000003.json").read_text())
    assert report["step"] == 3 and 0 < report["val_bpb"] < 20 and len(report["samples"]) == 7


def _record_group_settings(monkeypatch):
    """Record each step's optimizer group settings (initial_lr, betas, eps) by group name."""
    real = train.apply_schedules
    seen = []

    def recording(optimizer, plan, step, cfg):
        real(optimizer, plan, step, cfg)
        seen.append({g["name"]: (g["initial_lr"], g.get("betas"), g.get("eps")) for g in optimizer.param_groups})

    monkeypatch.setattr(train, "apply_schedules", recording)
    return seen


def test_resume_with_a_changed_lr_uses_the_new_lr(tiny_base_dir, monkeypatch):
    # the changes a resume allows (and notes) must take effect: the diverged-loss message itself advises
    # resuming with a lower LR, so the checkpoint's optimizer settings must not override the new options
    quiet = ["--eval-every=-1", "--sample-every=-1"]
    assert run(tiny_base_dir, "lr-change", "--num-iterations=2", *quiet) == 0
    changed = ["--matrix-lr=0.005", "--embedding-lr=0.1", "--adam-beta1=0.7"]
    seen = _record_group_settings(monkeypatch)
    assert run(tiny_base_dir, "lr-change", "--num-iterations=3", "--resume-from-step=latest", *quiet, *changed) == 0
    resumed = seen[-1]
    seen.clear()
    assert run(tiny_base_dir, "lr-fresh", "--num-iterations=3", *quiet, *changed) == 0
    assert resumed == seen[-1]


def test_resume_from_an_older_step_rewrites_the_metrics_log_without_duplicates(tiny_base_dir):
    quiet = ["--num-iterations=6", "--eval-every=3", "--save-every=3", "--sample-every=-1"]
    assert run(tiny_base_dir, "log-straight", *quiet) == 0
    assert run(tiny_base_dir, "log-resumed", *quiet) == 0
    with open(tiny_base_dir / "base_checkpoints" / "log-resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a row cut short by a kill mid-write must not block the resume
    # go back to step 3: the log must read as one uninterrupted run (the plot draws it), not two timelines
    assert run(tiny_base_dir, "log-resumed", *quiet, "--resume-from-step=3") == 0
    straight, resumed = metrics(tiny_base_dir, "log-straight"), metrics(tiny_base_dir, "log-resumed")
    assert [r["step"] for r in resumed if "train/loss_raw" in r] == list(range(6))
    assert [r["step"] for r in resumed if "val/bpb" in r] == [0, 3, 6]
    for key in ("train/loss_raw", "val/bpb"):
        assert [r[key] for r in resumed if key in r] == [r[key] for r in straight if key in r], key


def test_a_refused_run_leaves_the_earlier_runs_files_alone(tiny_base_dir):
    assert run(tiny_base_dir, "keep-log", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1") == 0
    log = tiny_base_dir / "base_checkpoints" / "keep-log" / "metrics.jsonl"
    before = log.read_text()
    assert before
    assert run(tiny_base_dir, "keep-log", "--num-iterations=2", "--fp8") == 2  # refused before any work
    assert log.read_text() == before


def _poison_forward(monkeypatch, call: int):
    """Make the `call`-th training forward (1-based, counting micro-batches) return a NaN loss."""
    from nanotrain import model as gpt

    real = gpt.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, *args, **kwargs):
        out = real(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == call:
                out = out * float("nan")
        return out

    monkeypatch.setattr(gpt.GPT, "forward", forward)


def test_a_nan_in_an_early_micro_batch_stops_before_a_poisoned_save(tiny_base_dir, monkeypatch, capsys):
    # 2 micro-batches a step: call 7 is step 3's first micro-batch; its NaN gradients poison the weights, so
    # the checkpoint at step 4 must not be written as "good"
    _poison_forward(monkeypatch, 7)
    code = run(tiny_base_dir, "nan-micro", "--num-iterations=10", "--save-every=2", "--eval-every=-1",
               "--sample-every=-1")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "at step 3" in err and "(step 2)" in err
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "nan-micro"
    assert checkpoint.list_steps(ckpt_dir) == [2]


def test_first_step_oom_probe_runs_after_the_failed_step_is_released(tiny_base_dir, monkeypatch):
    # the except block's traceback holds the failed step's frames (on a GPU: its activations); probing which
    # batch fits while they are alive finds less memory than the run will have
    import weakref

    held = []

    def failing(model, x, y, *args, **kwargs):
        activations = torch.randn(1000)  # stands for the tensors of the failed forward
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    alive = []

    def probe(model, candidates, *args, **kwargs):
        alive.append(held[0]() is not None)
        return candidates[0] if isinstance(candidates, list) else candidates

    monkeypatch.setattr(train, "train_micro_steps", failing)
    monkeypatch.setattr(train, "largest_fitting_batch", probe)
    assert run(tiny_base_dir, "oom-release", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1") == 4
    assert alive == [False]


def _record_training_rows(monkeypatch) -> list:
    """The input rows of every training forward, in order."""
    from nanotrain import model as gpt

    real, rows = gpt.GPT.forward, []

    def forward(self, idx, targets=None, *args, **kwargs):
        if targets is not None and self.training:
            rows.append(idx.clone())
        return real(self, idx, targets, *args, **kwargs)

    monkeypatch.setattr(gpt.GPT, "forward", forward)
    return rows


def test_first_step_oom_on_resume_continues_the_data_stream(tiny_base_dir, monkeypatch):
    quiet = ["--num-iterations=3", "--eval-every=-1", "--sample-every=-1", "--save-every=2"]
    rows = _record_training_rows(monkeypatch)
    assert run(tiny_base_dir, "oom-resume", *quiet) == 0
    straight = list(rows)  # 2 micro-batches of 4 rows a step
    rows.clear()
    _oom_on_first_call(monkeypatch)
    assert run(tiny_base_dir, "oom-resume", *quiet, "--resume-from-step=2", "--oom-auto-batch") == 0
    # step 2 trains on the batch the checkpoint held back, cut in two, then the stream goes on from there
    assert torch.equal(rows[0], straight[4][:2]) and torch.equal(rows[1], straight[4][2:])
    assert not any(torch.equal(r, straight[0][:2]) for r in rows), "the data stream started over"


def test_first_step_oom_with_auto_batch_keeps_the_total_for_an_odd_batch(tiny_base_dir, monkeypatch, capsys):
    calls = _oom_on_first_call(monkeypatch)
    assert run(tiny_base_dir, "oom-odd", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1",
               "--oom-auto-batch", "--device-batch-size=3", "--total-batch-size=384") == 0
    assert "lowering it to 1 and raising gradient accumulation from 2 to 6" in capsys.readouterr().err
    assert calls["tokens"] == [384, 384, 384]  # 3 rows would not halve: 1 row x 6, not 1 row x 4


def test_resume_command_printed_after_an_oom_halving_resumes(tiny_base_dir, monkeypatch, capsys):
    import shlex

    calls = _oom_on_first_call(monkeypatch)
    real = train.train_micro_steps

    def stop_at_step_2(*args, **kwargs):
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a spot preemption during step 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_micro_steps", stop_at_step_2)
    assert run(tiny_base_dir, "oom-stop", "--num-iterations=4", "--eval-every=-1", "--sample-every=-1",
               "--oom-auto-batch") == 0
    out = capsys.readouterr().out
    command = shlex.split(out.split("Resume with: ")[1].splitlines()[0])
    assert command[0] == "nanotrain" and "--device-batch-size=2" in command
    monkeypatch.setattr(train, "train_micro_steps", real)
    assert train.main(command[1:]) == 0, capsys.readouterr().err
    assert checkpoint.latest_step(tiny_base_dir / "base_checkpoints" / "oom-stop") == 4


def test_resume_command_names_the_launch(monkeypatch):
    # a checkpoint of N processes resumes only on N processes: the printed command must say so
    from nanotrain.distributed import Runtime

    cpu = torch.device("cpu")
    assert train.launch_command(Runtime(cpu)) == "nanotrain"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.launch_command(Runtime(cpu, rank=3, local_rank=3, world_size=8)) == \
        "torchrun --nproc_per_node=8 -m nanotrain"
    assert "torchrun --nnodes=2 --nproc_per_node=8 " in train.launch_command(Runtime(cpu, world_size=16))


def test_a_stop_request_saves_before_the_evaluations_and_the_resume_runs_them(tiny_base_dir, monkeypatch, capsys):
    # a preempted machine gives seconds: the save must not wait for the val bpb / CORE / samples of its step
    real, calls = train.train_micro_steps, {"n": 0}

    def stop_during_step_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_micro_steps", stop_during_step_1)
    opts = ["--num-iterations=4", "--eval-every=2", "--sample-every=2"]
    assert run(tiny_base_dir, "stop-first", *opts) == 0
    out = capsys.readouterr().out
    assert "Step 00002 | Validation bpb" not in out and "sample:" not in out
    assert "Saved checkpoint" in out and checkpoint.latest_step(tiny_base_dir / "base_checkpoints" / "stop-first") == 2
    monkeypatch.setattr(train, "train_micro_steps", real)
    assert run(tiny_base_dir, "stop-first", *opts, "--resume-from-step=latest") == 0
    assert "Step 00002 | Validation bpb" in capsys.readouterr().out  # measured by the resumed run
    assert [r["step"] for r in metrics(tiny_base_dir, "stop-first") if "val/bpb" in r] == [0, 2, 4]


def test_corrupt_shard_is_one_clear_line_naming_a_fix_the_user_has(tiny_base_dir, tmp_path, capsys):
    import shutil

    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base_dir / name, tmp_path / name)
    (tmp_path / "base_data" / "shard_00001.parquet").write_bytes(b"not a parquet file")
    assert train.main([*TINY, f"--base-dir={tmp_path}", "--num-iterations=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corrupt or truncated parquet file"), err
    assert "shard_00001.parquet" in err[0] and "skip_corrupt" not in err[0]  # not an option of nanotrain


def test_a_fresh_run_never_overwrites_saved_checkpoints(tiny_base_dir, capsys):
    args = ("--num-iterations=2", "--eval-every=-1", "--sample-every=-1")
    assert run(tiny_base_dir, "taken", *args) == 0
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "taken"
    before = (ckpt_dir / "step_000002" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run(tiny_base_dir, "taken", *args, "--seed=7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has checkpoints (steps 2)" in err[0] and "--overwrite" in err[0]
    assert (ckpt_dir / "step_000002" / "model.safetensors").read_bytes() == before
    # --overwrite starts over and keeps the earlier folder under another name
    assert run(tiny_base_dir, "taken", *args, "--seed=7", "--overwrite") == 0
    moved = [p for p in ckpt_dir.parent.iterdir() if p.name.startswith("taken.replaced-")]
    assert len(moved) == 1 and (moved[0] / "step_000002" / "model.safetensors").read_bytes() == before
    assert (ckpt_dir / "step_000002" / "model.safetensors").read_bytes() != before


def test_wandb_only_with_run_and_a_resume_continues_the_same_wandb_run(tiny_base_dir, tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    env.pop("TRITON_INTERPRET", None)
    common = [*TINY, f"--base-dir={tiny_base_dir}", "--num-iterations=4", "--eval-every=2", "--sample-every=-1"]
    probe = ("import sys; from nanotrain.train import main; code = main(sys.argv[1:]); "
             "sys.exit(code or (3 if 'wandb' in sys.modules else 0))")
    # --run dummy (the default) never imports wandb
    r = subprocess.run([sys.executable, "-c", probe, *common, "--model-tag=nowandb"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "nanotrain", *common, "--model-tag=wandb", "--run=t1", "--save-every=2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = checkpoint.read_meta(tiny_base_dir / "base_checkpoints" / "wandb", 2)["wandb_run_id"]
    assert run_id
    r = subprocess.run([sys.executable, "-m", "nanotrain", *common, "--model-tag=wandb", "--run=t1", "--save-every=2",
                        "--resume-from-step=2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.read_meta(tiny_base_dir / "base_checkpoints" / "wandb", 4)["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs


def test_oom_in_the_first_optimizer_step_is_one_clear_line(tiny_base_dir, monkeypatch, capsys):
    from nanotrain import optim

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(optim.MuonAdamW, "step", no_memory)
    assert run(tiny_base_dir, "optim-oom", "--num-iterations=2", "--eval-every=-1", "--sample-every=-1") == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer state" in err[0] and "--depth" in err[0]
