"""CORE and bpb under torchrun (2 ranks, gloo): the all-reduced numbers equal a single process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanotrain.eval.bpb import evaluate_bpb
from nanotrain.eval.core import evaluate_core
from tests.eval.eval_standins import BigramLM, ByteTokenizer, handmade_rows, oracle_table, write_bundle

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from tests.eval.eval_standins import BigramLM, ByteTokenizer, oracle_table
    from nanotrain.eval.bpb import evaluate_bpb
    from nanotrain.eval.core import evaluate_core

    bundle, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    table = torch.randn(257, 257) * 3
    batches = [(torch.randint(0, 257, (2, 9)), torch.randint(-1, 257, (2, 9))) for _ in range(6)]
    tok = ByteTokenizer()
    res = {
        "oracle": evaluate_core(BigramLM(oracle_table()), tok, "cpu", bundle_dir=bundle)["results"],
        "random": evaluate_core(BigramLM(table), tok, "cpu", bundle_dir=bundle, max_per_task=5)["results"],
        "bpb": evaluate_bpb(BigramLM(table), batches[rank::world], 3, tok.token_bytes()),
    }
    if rank == 0:
        open(out, "w").write(json.dumps(res))
    dist.destroy_process_group()
""")


def test_two_ranks_match_one(tmp_path):
    tasks, rows = handmade_rows()
    bundle = write_bundle(tmp_path / "bundle", tasks, rows)
    script = tmp_path / "dist_eval.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(bundle), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())

    torch.manual_seed(0)
    table = torch.randn(257, 257) * 3
    batches = [(torch.randint(0, 257, (2, 9)), torch.randint(-1, 257, (2, 9))) for _ in range(6)]
    tok = ByteTokenizer()
    assert got["oracle"] == evaluate_core(BigramLM(oracle_table()), tok, "cpu", bundle_dir=bundle)["results"]
    assert got["random"] == evaluate_core(BigramLM(table), tok, "cpu", bundle_dir=bundle, max_per_task=5)["results"]
    assert got["oracle"]["mc"] == pytest.approx(5 / 8)
    assert got["bpb"] == pytest.approx(evaluate_bpb(BigramLM(table), batches, 6, tok.token_bytes()), rel=1e-6)
