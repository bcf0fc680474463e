"""Data parallelism under torchrun (2 ranks, gloo, CPU): DistMuonAdamW equals one process accumulating
twice as many micro-steps, holds about half the optimizer state per rank, re-shards to other world sizes;
the trainer runs, saves and resumes under torchrun with rank 0 alone writing the shared files.

The optimizer comparison runs in float64: in float32 the two runs differ by rounding in the order the
micro-batch gradients are summed, and AdamW (eps 1e-10) turns that rounding into O(lr) differences on the
few elements whose gradient is itself rounding-sized; float64 shows the two runs are the same computation
(they agree to ~1e-15).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanotrain import checkpoint, train
from nanotrain.optim import DistMuonAdamW, MuonAdamW, build_optimizer, merge_optimizer_shards

HERE = Path(__file__).resolve().parent
from tests import dist_optim_worker as worker  # noqa: E402

torch.set_num_threads(1)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=<nproc> <args>`; Triton's interpreter
    off (the reference kernels are faster on CPU), one thread per rank (the CI machine has two cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def optim_runs(tmp_path_factory):
    """The worker's results: {variant: {...}} for rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("dist_optim")
    proc = torchrun([str(HERE / "dist_optim_worker.py"), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("variant", ["default", "all_sharded"])
def test_two_ranks_equal_one_rank_with_twice_the_accumulation(optim_runs, variant):
    r0, r1 = optim_runs[0][variant], optim_runs[1][variant]
    single = r0["single_params"]
    for name, ref in single.items():
        assert torch.equal(r0["dist_params"][name], r1["dist_params"][name]), name  # ranks hold one model
        diff = (r0["dist_params"][name] - ref).abs().max().item()
        assert diff < 1e-12 * max(1.0, ref.abs().max().item()), (name, diff)
    # the runs did train: the parameters moved from the (seeded, identical) start
    fresh = worker.build_model(worker.CONFIG, "cpu").double().state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight", "transformer.h.0.mlp.c_fc.weight", "x0_lambdas"):
        assert (fresh[name] - single[name]).abs().max() > 1e-3, name


@pytest.mark.parametrize("variant", ["default", "all_sharded"])
def test_optimizer_state_per_rank_is_about_half(optim_runs, variant):
    single = optim_runs[0][variant]["single_state_bytes"]
    per_rank = [optim_runs[r][variant]["state_bytes"] for r in range(2)]
    assert single > 300_000
    assert all(0.45 * single < b < 0.52 * single for b in per_rank), (per_rank, single)
    # the shards cover the state once (only tiny replicated tensors are held twice)
    assert single <= sum(per_rank) < 1.01 * single


def _assert_states_close(a: dict, b: dict) -> None:
    assert set(a["state"]) == set(b["state"])
    for index, st in a["state"].items():
        assert set(st) == set(b["state"][index]), index
        for key, value in st.items():
            other = b["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert value.shape == other.shape, (index, key)
                assert torch.allclose(value, other, rtol=1e-10, atol=1e-14), (index, key)
            else:
                assert value == other, (index, key)


@pytest.mark.parametrize("variant", ["default", "all_sharded"])
def test_shards_merge_into_the_single_process_state_and_reshard(optim_runs, variant):
    shards = [optim_runs[r][variant]["shard"] for r in range(2)]
    merged = merge_optimizer_shards(shards[::-1])  # any order
    _assert_states_close(merged, optim_runs[0][variant]["single_state"])

    model = worker.build_model(worker.CONFIG, "cpu").double()
    groups = build_optimizer(model, **worker.LRS, sharded=False).param_groups
    single = MuonAdamW(groups)
    single.load_state_dict(merged)
    with pytest.raises(ValueError, match="merge"):
        single.load_state_dict(shards[0])

    # re-shard onto 3 ranks (two ownership rules): together they are the same state; with every tensor
    # sharded each rank holds about a third of it
    total = worker.state_bytes(single)
    for min_shard in (1, 1024):
        three = [DistMuonAdamW(groups, rank=r, world_size=3, min_shard_numel=min_shard, broadcast=False)
                 for r in range(3)]
        for opt in three:
            opt.load_state_dict(merged)
        _assert_states_close(merge_optimizer_shards([opt.state_dict() for opt in three]), merged)
        sizes = [worker.state_bytes(opt) for opt in three]
        assert total <= sum(sizes) < (1.01 if min_shard == 1 else 1.2) * total, (sizes, total)
        if min_shard == 1:
            assert all(0.3 * total < s < 0.35 * total for s in sizes), (sizes, total)
    with pytest.raises(ValueError, match="merge"):
        three[0].load_state_dict(three[1].state_dict())
    # a rank's own shard round-trips
    again = DistMuonAdamW(groups, rank=1, world_size=3, broadcast=False)
    again.load_state_dict(three[1].state_dict())
    _assert_states_close(again.state_dict(), three[1].state_dict())


# --------------------------------------------------------------------------------------------------
# The trainer under torchrun

TINY = ["--device-type=cpu", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
        "--device-batch-size=4", "--total-batch-size=512", "--window-pattern=SL", "--core-metric-every=-1",
        "--eval-tokens=1024", "--warmup-ratio=0.1", "--sample-every=-1", "--num-iterations=4"]


def _losses(ckpt_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train row of metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss_raw"]) for r in rows if "train/loss_raw" in r]


def test_torchrun_trains_saves_resumes_and_rank0_alone_writes(tiny_base_dir, capsys):
    base, tag = tiny_base_dir, "torchrun2"
    ckpt_dir = base / "base_checkpoints" / tag
    args = ["-m", "nanotrain", *TINY, f"--base-dir={base}", f"--model-tag={tag}", "--save-every=2",
            "--eval-every=2"]
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("2 rank(s)") == 1 and "Tokens per micro-step: 512 | gradient accumulation steps: 1" in out
    for step in range(4):  # rank 0 alone prints the step lines and writes the metrics
        assert out.count(f"step {step:05d}/00004") == 1, out[-2000:]
    assert out.count("Validation bpb") == 3  # steps 0, 2, 4
    first_losses = _losses(ckpt_dir)
    assert [step for step, _ in first_losses] == [0, 1, 2, 3]  # one writer: each step logged once
    assert (ckpt_dir / "plot.png").stat().st_size > 1000
    assert checkpoint.list_steps(ckpt_dir) == [2, 4]
    step4 = ckpt_dir / checkpoint.step_dir_name(4)
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["optim_sharded"] is True
    shards = [torch.load(step4 / f"optim_rank{r}.pt", weights_only=True) for r in range(2)]
    assert [s["zero"]["rank"] for s in shards] == [0, 1] and all(s["zero"]["world_size"] == 2 for s in shards)
    assert (step4 / "rank1.pt").is_file()
    first_model = checkpoint.load_checkpoint(ckpt_dir, 4, load_optim=False).model_state

    # resume from step 2 on 2 ranks: the same losses and the same final weights
    proc = torchrun([*args, "--resume-from-step=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resuming from step 2" in proc.stdout and proc.stdout.count("Resuming from step 2") == 1
    assert _losses(ckpt_dir) == first_losses  # steps 2 and 3 again with the same losses, logged once (not twice)
    assert "Validation bpb" not in proc.stdout.split("Resuming from step 2")[1].split("step 00002")[0]  # done at 2
    again = checkpoint.load_checkpoint(ckpt_dir, 4, load_optim=False).model_state
    assert all(torch.equal(first_model[k], again[k]) for k in first_model)

    # on one process: the two ranks' states re-shard onto it (issue 15; refused before the re-shardable loader)
    code = train.main([*TINY, f"--base-dir={base}", f"--model-tag={tag}", "--resume-from-step=latest"])
    out = capsys.readouterr().out
    assert code == 0 and "Re-sharding the checkpoint of 2 process(es) onto 1" in out, out[-2000:]


NAN_ON_RANK1 = """
import sys
from nanotrain import distributed, model as gpt, train

real, calls = gpt.GPT.forward, {"n": 0}

def forward(self, idx, targets=None, *args, **kwargs):
    out = real(self, idx, targets, *args, **kwargs)
    if targets is not None and self.training:
        calls["n"] += 1
        if calls["n"] == 3 and distributed.get_rank() == 1:  # step 2's micro-batch, on rank 1 only
            out = out * float("nan")
    return out

gpt.GPT.forward = forward
sys.exit(train.main(sys.argv[1:]))
"""


def test_torchrun_a_nan_on_one_rank_stops_every_rank_at_that_step(tiny_base_dir, tmp_path):
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK1)
    tag = "torchrun-nan"
    proc = torchrun([str(script), *TINY, f"--base-dir={tiny_base_dir}", f"--model-tag={tag}", "--save-every=2",
                     "--eval-every=-1"], timeout=120)
    assert proc.returncode != 0
    # both ranks stop with the message at step 2 (not rank 1 alone, leaving rank 0 in a collective)
    assert proc.stderr.count("stopped: training loss became nan at step 2") == 2, proc.stderr[-3000:]
    assert "RuntimeError" not in proc.stderr, proc.stderr[-3000:]  # rank 0 was left in a collective with a dead peer
    assert checkpoint.list_steps(tiny_base_dir / "base_checkpoints" / tag) == [2]


OOM_ON_RANK1 = """
import os, sys
import torch
from nanotrain import train

real = train.train_micro_steps
calls = {"n": 0}

def flaky(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 1 and os.environ["RANK"] == "1":
        raise torch.OutOfMemoryError("CUDA out of memory (simulated on rank 1)")
    return real(*args, **kwargs)

train.train_micro_steps = flaky
sys.exit(train.main(sys.argv[1:]))
"""


def test_torchrun_an_oom_on_one_rank_lowers_the_batch_on_every_rank(tiny_base_dir, tmp_path):
    script = tmp_path / "oom_on_rank1.py"
    script.write_text(OOM_ON_RANK1)
    tag = "torchrun-oom"
    proc = torchrun([str(script), *TINY, f"--base-dir={tiny_base_dir}", f"--model-tag={tag}", "--eval-every=-1",
                     "--oom-auto-batch"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lowering it to 2" in proc.stderr, proc.stderr[-3000:]
    meta = checkpoint.read_meta(tiny_base_dir / "base_checkpoints" / tag)
    assert meta["step"] == 4 and meta["train_config"]["device_batch_size"] == 2


EVAL_FAILS_ON_RANK1 = """
import os, sys
import torch
from nanotrain import model as gpt, train

real_forward, real_attempt, state = gpt.GPT.forward, train._attempt, {"attempts": 0}

def attempt(*args, **kwargs):  # one more evaluation pass (a retry is a pass of its own)
    state["attempts"] += 1
    return real_attempt(*args, **kwargs)

def forward(self, idx, targets=None, *args, **kwargs):
    if not self.training and os.environ["RANK"] == "1":
        if state["attempts"] == 1:  # step 0's bpb pass: out of memory on rank 1 alone
            raise torch.OutOfMemoryError("CUDA out of memory (simulated on rank 1)")
        if state["attempts"] == 3:  # step 2's bpb pass (the 2nd was step 0's retry): a failure of another kind
            raise RuntimeError("simulated read error on rank 1")
    return real_forward(self, idx, targets, *args, **kwargs)

train._attempt = attempt
gpt.GPT.forward = forward
sys.exit(train.main(sys.argv[1:]))
"""


def test_torchrun_an_evaluation_failing_on_one_rank_fails_on_every_rank_and_training_goes_on(tiny_base_dir,
                                                                                               tmp_path):
    """Rank 1's evaluation fails inside the pass while rank 0's succeeds: before, rank 0 waited in the pass's
    collective for a rank that had moved on (a hang, or collectives paired wrongly). Now both ranks retry the out of
    memory at half the batch together, both give up the failed pass, and training goes on to the end."""
    script = tmp_path / "eval_fails_on_rank1.py"
    script.write_text(EVAL_FAILS_ON_RANK1)
    tag = "torchrun-evalfail"
    proc = torchrun([str(script), *TINY, f"--base-dir={tiny_base_dir}", f"--model-tag={tag}", "--eval-every=2"],
                    timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    assert err.count("out of memory in the bpb evaluation at step 0: retrying at half its batch") == 1, err[-3000:]
    assert "WARNING: rank 1: evaluation bpb failed at step 2: RuntimeError: simulated read error on rank 1" in err
    assert "evaluation bpb failed at step 2: it failed on 1 other rank(s)" in err, err[-3000:]
    rows = [json.loads(line) for line in (tiny_base_dir / "base_checkpoints" / tag / "metrics.jsonl").open()]
    assert sorted(r["step"] for r in rows if "val/bpb" in r) == [0, 4]  # step 0 at half the batch; 2 failed
    assert [r["step"] for r in rows if "eval_error" in r] == [2]
    assert checkpoint.read_meta(tiny_base_dir / "base_checkpoints" / tag)["step"] == 4
