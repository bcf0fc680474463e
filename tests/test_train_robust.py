"""The end of a run never loses the run, on any device: saves come before evaluations, a failing evaluation
never ends training, a full disk stops cleanly, fp16 with a gradient scaler trains and resumes, and
platforms without fcntl, Triton or a compiler still import and train."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from nanotrain import checkpoint, train
from nanotrain.precision import Precision

TINY = ["--device-type=cpu", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
        "--device-batch-size=4", "--total-batch-size=512", "--window-pattern=SL", "--core-metric-every=-1",
        "--eval-tokens=1024", "--warmup-ratio=0.1", "--sample-every=-1"]


def run(base, tag, *extra):
    return train.main([*TINY, f"--base-dir={base}", f"--model-tag={tag}", *extra])


def metrics(base, tag):
    path = base / "base_checkpoints" / tag / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _failing_bpb(monkeypatch, fail_at: set[int] | None = None, error=RuntimeError("damaged validation shard")):
    """Make val bpb raise `error` at the steps in fail_at (None: always); returns the steps it was called at."""
    real, calls = train.evaluate_bpb, []

    def bpb(model, batches, steps, token_bytes, *args, **kwargs):
        calls.append(len(calls))
        if fail_at is None or len(calls) - 1 in fail_at:
            raise error
        return real(model, batches, steps, token_bytes, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate_bpb", bpb)
    return calls


def test_a_final_evaluation_that_raises_keeps_the_final_checkpoint_and_names_the_rerun(tiny_base_dir, monkeypatch,
                                                                                       capsys):
    _failing_bpb(monkeypatch, fail_at={1})  # evaluations at steps 0 and 3: the final one fails
    code = run(tiny_base_dir, "eval-fails-last", "--num-iterations=3", "--eval-every=100")
    err = capsys.readouterr().err
    assert code == train.EXIT_EVAL_FAILED, err
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "eval-fails-last"
    assert checkpoint.latest_step(ckpt_dir) == 3, "the final checkpoint was lost with the evaluation"
    assert "evaluation bpb failed at step 3: RuntimeError: damaged validation shard" in err
    assert "nanotrain-eval --model-tag=eval-fails-last --step=3 --eval=bpb" in err
    rows = metrics(tiny_base_dir, "eval-fails-last")
    assert {"step": 3, "eval_error": {"name": "bpb", "error": "RuntimeError: damaged validation shard"}}.items() <= \
        [r for r in rows if "eval_error" in r][0].items()


def test_the_final_checkpoint_is_written_before_the_final_evaluations(tiny_base_dir, monkeypatch, capsys):
    # a process killed during the final evaluation (here: Ctrl-C twice, which exits at once) keeps the trained run
    _failing_bpb(monkeypatch, fail_at={1}, error=KeyboardInterrupt())
    assert run(tiny_base_dir, "killed-in-eval", "--num-iterations=2", "--eval-every=100") == 130
    assert checkpoint.latest_step(tiny_base_dir / "base_checkpoints" / "killed-in-eval") == 2


def test_an_evaluation_that_raises_mid_run_lets_training_continue(tiny_base_dir, monkeypatch, capsys):
    _failing_bpb(monkeypatch, fail_at={1})  # steps 0, 2, 4: the one at step 2 fails
    assert run(tiny_base_dir, "eval-fails-mid", "--num-iterations=4", "--eval-every=2") == 0
    err = capsys.readouterr().err
    assert "evaluation bpb failed at step 2" in err and "training goes on" in err
    rows = metrics(tiny_base_dir, "eval-fails-mid")
    assert [r["step"] for r in rows if "train/loss_raw" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "val/bpb" in r] == [0, 4]
    assert [r["step"] for r in rows if "eval_error" in r] == [2]


def test_an_out_of_memory_evaluation_retries_once_at_half_its_batch(tiny_base_dir, monkeypatch, capsys):
    real, batch_sizes = train.evaluate_bpb, []

    def bpb(model, batches, steps, token_bytes, *args, **kwargs):
        if not batch_sizes:
            batch_sizes.append(None)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        def seen(batches):
            for x, y in batches:
                batch_sizes.append(x.shape[0])
                yield x, y
        return real(model, seen(batches), steps, token_bytes, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate_bpb", bpb)
    assert run(tiny_base_dir, "eval-oom", "--num-iterations=1", "--eval-every=100") == 0
    assert "out of memory in the bpb evaluation at step 0: retrying at half its batch" in capsys.readouterr().err
    assert batch_sizes[:9] == [None] + [2] * 8  # 1024 tokens: 8 batches of 2 x 64 instead of 4 of 4 x 64
    rows = [r for r in metrics(tiny_base_dir, "eval-oom") if "val/bpb" in r]
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["val/tokens"] == 1024


def test_a_small_validation_split_says_how_many_tokens_it_measured(tiny_base_dir, capsys):
    assert run(tiny_base_dir, "short-val", "--num-iterations=1", "--eval-every=100", "--eval-tokens=50000000") == 0
    out = capsys.readouterr().out
    row = [r for r in metrics(tiny_base_dir, "short-val") if "val/bpb" in r][0]
    assert 0 < row["val/tokens"] < 50_000_000 and row["val/tokens"] % 256 == 0
    assert f"(measured on {row['val/tokens']:,} tokens: the validation split holds fewer than" in out


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_base_dir, monkeypatch, capsys):
    real, saves = checkpoint._write_torch, []

    def writer(path, obj):
        if path.parent.name.startswith("step_000004"):
            raise OSError(errno.ENOSPC, "No space left on device")
        saves.append(path)
        return real(path, obj)

    monkeypatch.setattr(checkpoint, "_write_torch", writer)
    ckpt_dir = tiny_base_dir / "base_checkpoints" / "disk-full"
    code = run(tiny_base_dir, "disk-full", "--num-iterations=6", "--save-every=2", "--eval-every=-1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == train.EXIT_DISK_FULL, err
    assert len(err) == 1 and err[0].startswith("stopped: no space left on the device for the checkpoint of step 4")
    assert "needs about" in err[0] and str(ckpt_dir) in err[0] and "--resume-from-step=2" in err[0]
    assert checkpoint.list_steps(ckpt_dir) == [2] and checkpoint.latest_step(ckpt_dir) == 2
    assert (ckpt_dir / "latest").read_text().strip().endswith("step_000002")
    assert not [p.name for p in ckpt_dir.iterdir() if ".tmp" in p.name]  # no half-written folder left
    assert checkpoint.load_checkpoint(ckpt_dir, "latest").step == 2  # the previous checkpoint still loads


def _fp16_on_cpu(monkeypatch, init_scale: float):
    """Train in fp16 autocast with a gradient scaler on the CPU (what a pre-Ampere GPU gets)."""
    monkeypatch.setattr(train, "choose_precision", lambda device: Precision(
        device, torch.float16, torch.amp.GradScaler("cpu", init_scale=init_scale), reason="test: fp16 on CPU"))


def test_fp16_with_a_gradient_scaler_counts_skipped_steps_and_a_resume_continues_the_scale(tiny_base_dir,
                                                                                           monkeypatch, capsys):
    _fp16_on_cpu(monkeypatch, init_scale=2.0**40)  # far too high: the first steps overflow and are skipped
    opts = ["--num-iterations=4", "--eval-every=-1", "--save-every=2"]
    assert run(tiny_base_dir, "fp16", *opts) == 0
    out = capsys.readouterr().out
    assert "Precision: fp16 autocast with a gradient scaler" in out and "| skipped " in out
    straight = [r for r in metrics(tiny_base_dir, "fp16") if "train/loss_raw" in r]
    skipped = [r["train/skipped_steps"] for r in straight]
    assert skipped[0] == 1 and skipped == sorted(skipped)  # counted, and shown on every step line
    assert straight[0]["train/step_skipped"] and straight[0]["train/loss_scale"] == 2.0**39
    assert f"Steps skipped by the fp16 gradient scaler (overflow): {skipped[-1]}" in out
    ckpt = checkpoint.load_checkpoint(tiny_base_dir / "base_checkpoints" / "fp16", 2)
    assert ckpt.rank_state["precision"] == {"skipped_steps": skipped[1],
                                            "scaler": ckpt.rank_state["precision"]["scaler"]}
    assert ckpt.rank_state["precision"]["scaler"]["scale"] == straight[1]["train/loss_scale"]
    # a resume continues the scale and the count (a fresh scaler would overflow again from 2**40)
    assert run(tiny_base_dir, "fp16", *opts, "--resume-from-step=2") == 0
    resumed = [r for r in metrics(tiny_base_dir, "fp16") if "train/loss_raw" in r]
    for key in ("train/loss_raw", "train/skipped_steps", "train/loss_scale"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_compile_auto_turns_itself_off_without_a_compiler_and_says_so_once(tiny_base_dir, monkeypatch, capsys):
    monkeypatch.setattr(train, "CPU_COMPILE_MIN_STEPS", 1)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert run(tiny_base_dir, "no-compiler", "--num-iterations=2", "--eval-every=-1") == 0
    out = capsys.readouterr().out
    assert out.count("torch.compile: off (--compile=auto: no C++ compiler found") == 1
    assert "torch.compile: on" not in out


def test_compile_auto_on_a_gpu_needs_triton_and_a_c_compiler(monkeypatch):
    import importlib.util

    cfg, cuda = train.parse_args(["--device-type=cpu"]), torch.device("cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    on, note = train.compile_decision(cfg, cuda, 10)
    assert not on and "Triton is not installed" in note
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr("shutil.which", lambda name: None)
    on, note = train.compile_decision(cfg, cuda, 10)
    assert not on and "no C compiler" in note
    assert train.compile_decision(train.parse_args(["--compile=on"]), cuda, 10) == (True, None)


NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # what Windows has: `import fcntl` raises ImportError
import nanotrain.train, nanotrain.eval.core as core, nanotrain.data.download as download
from pathlib import Path
d = Path(sys.argv[1])
with open(d / "lock", "w") as f:
    core._wait_for_lock(f)
download._lock(d).close()
print("ok")
"""


def test_importing_and_locking_work_without_fcntl(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_FCNTL, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("path", ["nanotrain/eval/core.py", "nanotrain/data/download.py"])
def test_no_module_level_fcntl_import(path):
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / path).read_text()
    assert "\nimport fcntl" not in source and "\nfrom fcntl" not in source
