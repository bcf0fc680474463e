"""Resume on another number of processes (gloo, CPU): a run saved by 2 ranks continues on 1, and one saved by 1
process continues on 2, training on the same rows at every step as the uninterrupted run, with the same losses
up to float32 rounding (1 process accumulates 2 micro-batches where 2 ranks take 1 each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanotrain import checkpoint
from nanotrain.errors import UserError
from nanotrain.resume import check_resume_compatible

TINY = ["--device-type=cpu", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
        "--device-batch-size=4", "--total-batch-size=512", "--window-pattern=SL", "--core-metric-every=-1",
        "--eval-every=-1", "--sample-every=-1", "--warmup-ratio=0.1", "--num-iterations=4", "--save-every=2"]
ROWS_PER_STEP = 512 // 64  # 8 rows: 1 process x 4 rows x 2 micro-steps, or 2 ranks x 4 rows x 1

# Runs the trainer and writes, per rank, a short hash of every training row of every micro-batch, in order.
RECORD_ROWS = """
import hashlib, json, os, sys
from nanotrain import model as gpt, train

real, seen = gpt.GPT.forward, []

def forward(self, idx, targets=None, *args, **kwargs):
    if targets is not None and self.training:
        seen.append([hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in idx.cpu()])
    return real(self, idx, targets, *args, **kwargs)

gpt.GPT.forward = forward
code = train.main(sys.argv[2:])
with open(f"{sys.argv[1]}-rank{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def launch(script: Path, record: Path, args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """The trainer in `nproc` processes (torchrun with gloo when 2), Triton's interpreter off, one thread each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1")
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*head, str(script), str(record), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows_by_step(record: Path, nproc: int, first_step: int) -> dict[int, list[str]]:
    """{step: sorted row hashes of every rank} of a recorded run that started at first_step."""
    accum = ROWS_PER_STEP // (4 * nproc)
    steps: dict[int, list[str]] = {}
    for r in range(nproc):
        for i, rows in enumerate(json.loads(Path(f"{record}-rank{r}.json").read_text())):
            steps.setdefault(first_step + i // accum, []).extend(rows)
    return {s: sorted(v) for s, v in steps.items()}


def final_weights(base: Path, tag: str) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(base / "base_checkpoints" / tag, 4, load_optim=False).model_state


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all the weights that training changes."""
    diff = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in b)
    return (diff / sum(float(b[k].double().norm()) ** 2 for k in b)) ** 0.5


def losses(base: Path, tag: str) -> dict[int, float]:
    path = base / "base_checkpoints" / tag / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["train/loss_raw"] for r in rows if "train/loss_raw" in r}


@pytest.fixture(scope="module")
def straight(tiny_base_dir, tmp_path_factory):
    """The uninterrupted run on one process: its rows and losses (its checkpoint at step 2 is resumed below)."""
    tmp = tmp_path_factory.mktemp("world_size")
    script = tmp / "record_rows.py"
    script.write_text(RECORD_ROWS)
    launch(script, tmp / "straight", [*TINY, f"--base-dir={tiny_base_dir}", "--model-tag=ws-one"], 1)
    rows = rows_by_step(tmp / "straight", 1, 0)
    assert sorted(rows) == [0, 1, 2, 3] and all(len(v) == ROWS_PER_STEP for v in rows.values())
    assert len({h for v in rows.values() for h in v}) == 4 * ROWS_PER_STEP  # no row twice
    return tmp, script, rows, losses(tiny_base_dir, "ws-one"), final_weights(tiny_base_dir, "ws-one")


def test_two_ranks_resume_on_one(tiny_base_dir, straight):
    tmp, script, rows, loss, weights = straight
    args = [*TINY, f"--base-dir={tiny_base_dir}", "--model-tag=ws-two"]
    launch(script, tmp / "two", args, 2)
    assert rows_by_step(tmp / "two", 2, 0) == rows  # 2 ranks x 4 rows train on the rows of 1 process x 2 x 4
    proc = launch(script, tmp / "two-on-one", [*args, "--resume-from-step=2"], 1)
    assert "Re-sharding the checkpoint of 2 process(es) onto 1" in proc.stdout
    assert rows_by_step(tmp / "two-on-one", 1, 2) == {s: rows[s] for s in (2, 3)}  # none repeated, none skipped
    resumed = losses(tiny_base_dir, "ws-two")
    assert sorted(resumed) == [0, 1, 2, 3]
    assert resumed == pytest.approx(loss, rel=1e-4, abs=1e-5)
    # the optimizer state re-sharded: 1.3e-4 measured (float32 rounding); 7.7e-3 when the resume drops it
    assert relative_difference(final_weights(tiny_base_dir, "ws-two"), weights) < 1e-3


def test_one_process_resumes_on_two_ranks(tiny_base_dir, straight):
    tmp, script, rows, loss, weights = straight
    proc = launch(script, tmp / "one-on-two", [*TINY, f"--base-dir={tiny_base_dir}", "--model-tag=ws-one",
                                               "--resume-from-step=2"], 2)
    assert "Re-sharding the checkpoint of 1 process(es) onto 2" in proc.stdout
    assert rows_by_step(tmp / "one-on-two", 2, 2) == {s: rows[s] for s in (2, 3)}
    resumed = losses(tiny_base_dir, "ws-one")
    assert sorted(resumed) == [0, 1, 2, 3]
    assert resumed == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert relative_difference(final_weights(tiny_base_dir, "ws-one"), weights) < 1e-3  # 1.4e-5 measured


def test_a_world_size_that_does_not_divide_the_streams_is_refused():
    saved = {"world_size": 2, "data_streams": 48, "optim_sharded": True}
    with pytest.raises(UserError, match="cannot resume: the checkpoint's data stream is cut into 48 streams, which 5 "
                                        "processes cannot share evenly; relaunch with one of 1, 2, 3, 4, 6, 8, 12, "
                                        "16, 24, 48 processes"):
        check_resume_compatible(saved, dict(saved, world_size=5))
    assert check_resume_compatible(saved, dict(saved, world_size=4)) == []  # 4 divides 48: re-shards
    assert check_resume_compatible(saved, dict(saved, world_size=1)) == []
    # a checkpoint from before the re-shardable loader (no data_streams) resumes only on its own process count
    with pytest.raises(UserError, match="written by 2 processes with a sharded optimizer state and this run has 4"):
        check_resume_compatible({"world_size": 2, "optim_sharded": True}, {"world_size": 4})
