"""nanotrain-eval on a tiny checkpoint saved in a temporary base directory."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import re

import pytest
import torch

from nanotrain import paths
from nanotrain.checkpoint import save_checkpoint
from nanotrain.data.shards import shard_name, write_shard
from nanotrain.data.tokenizer import train_tokenizer
from nanotrain.eval import cli
from nanotrain.eval.bpb import evaluate_bpb
from nanotrain.model import GPT, GPTConfig
from tests.eval.eval_standins import handmade_rows, write_bundle

WORDS = ("river stone light green quiet window paper seven after under bright small garden north "
         "music table winter open number yellow capital France planet color").split()


def made_up_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(made_up_docs(200, 0), vocab_size=300)
    tok.save(paths.tokenizer_dir(base))
    data = paths.data_dir(base)
    data.mkdir(parents=True)
    write_shard(made_up_docs(40, 1), data / shard_name(0))
    write_shard(made_up_docs(40, 2), data / shard_name(1))  # the validation split
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    meta = {"model_config": dataclasses.asdict(cfg), "train_config": {}, "loop_state": {},
            "tokenizer_fingerprint": tok.fingerprint, "data_fingerprint": None}
    save_checkpoint(paths.checkpoint_dir("tiny", base), 7, model.state_dict(), None, meta)
    tasks, rows = handmade_rows()
    write_bundle(base / "handmade_bundle", tasks, rows)
    return base


def test_cli_core_bpb_sample_report(base, capsys, monkeypatch):
    monkeypatch.delenv("NANOTRAIN_EVAL_BUNDLE", raising=False)
    out = base / "reports" / "r.json"
    argv = ["--model-tag", "tiny", "--base-dir", str(base), "--device-type", "cpu", "--eval", "core,bpb,sample",
            "--bundle-dir", str(base / "handmade_bundle"), "--eval-tokens", "512", "--device-batch-size", "4",
            "--max-tokens", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["step"] == 7 and report["model_tag"] == "tiny"
    assert set(report["core"]["results"]) == {"mc", "schema", "lm", "lm_space"}
    assert report["core_metric"] == pytest.approx(sum(report["core"]["centered_results"].values()) / 4)
    assert len(report["samples"]) == 7 and report["samples"][0].startswith("The capital of France is")
    # bpb equals a direct evaluation over the same validation batches (2 batches of 4 x 64 tokens)
    from nanotrain.data.loader import DataLoader
    from nanotrain.eval.loading import load_model

    model, tok, _ = load_model("tiny", "latest", base_dir=base)
    loader = DataLoader(tok, 4, 64, split="val", base_dir=base)
    direct = evaluate_bpb(model, iter(loader), 2, tok.token_bytes())
    assert report["val_bpb"] == pytest.approx(direct, rel=1e-6) and math.isfinite(direct)
    assert report["bpb_tokens"] == 512
    rows = list(csv.reader(open(out.with_suffix(".csv"))))
    assert rows[0] == ["metric", "value", "centered", "examples"]
    assert [r[0] for r in rows[1:]] == ["val_bpb", "core_metric", "mc", "schema", "lm", "lm_space"]
    printed = capsys.readouterr().out
    assert "CORE" in printed and "val bpb" in printed


def test_cli_default_report_path_and_step(base, monkeypatch):
    monkeypatch.delenv("NANOTRAIN_EVAL_BUNDLE", raising=False)
    assert cli.main(["--model-tag", "tiny", "--base-dir", str(base), "--step", "7", "--eval", "sample",
                     "--device-type", "cpu", "--max-tokens", "2"]) == 0
    report = paths.checkpoint_dir("tiny", base) / "eval_step_000007.json"
    assert json.loads(report.read_text())["evals"] == ["sample"]


@pytest.mark.parametrize("argv, message", [
    (["--model-tag", "nope"], "no checkpoint for --model-tag nope.*tags with checkpoints: tiny"),
    (["--model-tag", "tiny", "--step", "99"], "no checkpoint for step 99.*steps found: 7"),
    (["--model-tag", "tiny", "--eval", "core,perplexity"], "unknown evaluation.*perplexity"),
    (["--model-tag", "tiny", "--eval", "core", "--bundle-dir", "/nonexistent/bundle"], "not a CORE eval bundle"),
    (["--model-tag", "tiny", "--eval", "core", "--max-per-task", "0"], "--max-per-task.*-1"),
])
def test_cli_user_errors(base, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("NANOTRAIN_EVAL_BUNDLE", raising=False)
    assert cli.main(argv + ["--base-dir", str(base), "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_missing_bundle_offline(base, capsys, monkeypatch):
    """No bundle in the base dir and no network: one line saying how to point at a local folder."""
    monkeypatch.delenv("NANOTRAIN_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("NANOTRAIN_EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # nothing listens
    assert cli.main(["--model-tag", "tiny", "--base-dir", str(base), "--eval", "core", "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "could not download the CORE eval bundle" in err and "--bundle-dir" in err
