"""The benchmarks speak one language (issue 14 part 5): one model-shape table computed from nanotrain's scaling
rules, one row format that round-trips through the results file, and every bench module producing it.

CPU only and fast: the GPU benchmarks must import and say they need CUDA (a skipped row); the CPU benchmarks run
their --quick case.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import common  # noqa: E402
import shapes  # noqa: E402

from nanotrain import scaling  # noqa: E402
from nanotrain.config import TrainConfig  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A fresh results file for the test (what $NANOTRAIN_RESULTS names)."""
    path = tmp_path / "results.jsonl"
    monkeypatch.setenv("NANOTRAIN_RESULTS", str(path))
    monkeypatch.setenv("NANOTRAIN_COMMIT", "abc1234")
    common._machine_stamp.cache_clear()
    yield path
    common._machine_stamp.cache_clear()


# -- the shape table -------------------------------------------------------------------------------------------------


def test_shape_table_is_scaling_model_shape():
    assert sorted(shapes.SHAPES) == ["d12", "d20", "d26"]
    for name, s in shapes.SHAPES.items():
        model_dim, n_head = scaling.model_shape(s.depth)
        assert name == f"d{s.depth}"
        assert (s.model_dim, s.n_head, s.head_dim) == (model_dim, n_head, model_dim // n_head)
        assert s.windows() == scaling.window_sizes("SSSL", s.depth, 2048)
    assert shapes.SHAPES["d26"].model_dim == 1664 and shapes.SHAPES["d26"].short_window == 1025


def test_shape_defaults_are_train_config_defaults():
    """The table's fixed numbers are TrainConfig's defaults: a changed default must change the benchmarks too."""
    cfg = TrainConfig()
    assert (shapes.ASPECT_RATIO, shapes.HEAD_DIM, shapes.SEQ_LEN, shapes.DEVICE_BATCH_SIZE, shapes.WINDOW_PATTERN) == \
        (cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len, cfg.device_batch_size, cfg.window_pattern)
    from nanotrain.train import model_config_for

    for s in shapes.SHAPES.values():
        assert s.gpt_config() == model_config_for(TrainConfig(depth=s.depth), shapes.VOCAB_SIZE)


def test_muon_groups_are_build_optimizers_groups():
    from nanotrain.model import GPT
    from nanotrain.optim import build_optimizer

    s = shapes.SHAPES["d12"]
    with torch.device("meta"):
        model = GPT(s.gpt_config())
    opt = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                          weight_decay=0.2, sharded=False)
    expected = sorted((len(g["params"]), *g["params"][0].shape) for g in opt.param_groups if g["kind"] == "muon")
    assert sorted(s.muon_groups().values()) == expected
    d26 = shapes.SHAPES["d26"].muon_groups()
    assert d26["attn.c_q attn.c_k attn.c_v attn.c_proj"] == (104, 1664, 1664)
    assert d26["mlp.c_fc"] == (26, 6656, 1664) and d26["mlp.c_proj"] == (26, 1664, 6656)


# -- the row format --------------------------------------------------------------------------------------------------


def test_row_round_trips_through_json():
    row = common.Row("attention", "fwd+bwd", "triton", "d26 B=8 T=2048 H=13 D=128 w=1025", ms=1.25, rate=412.5,
                     unit="TFLOP/s", pct_of_limit=52.1, limit="bf16 matmul", vs_peer=1.31, peer="flex",
                     peak_mb=812.0, note="x", device="NVIDIA H200", commit="abc1234", date="2026-12-02T03:00:00Z")
    line = row.to_json()
    assert "\n" not in line
    assert common.Row.from_json(line) == row
    assert common.Row.from_json(json.loads(line)) == row
    nan = common.Row("x", "op", "p", "s", ms=float("nan"), rate=math.inf)
    back = common.Row.from_json(nan.to_json())  # JSON has no NaN: null
    assert back.ms is None and back.rate is None
    with pytest.raises(ValueError, match="unknown keys"):
        common.Row.from_json({**json.loads(line), "time_ms": 1.0})
    with pytest.raises(ValueError, match="status"):
        common.Row("x", "op", "p", "s", status="fine")


def test_record_appends_stamped_rows_to_one_results_file(results):
    a = common.record(common.Row("packing", "pack loader", "cpp", "T=2049", ms=0.5, rate=4000.0, unit="Mtok/s"))
    common.record(common.Row("attention", "-", "-", "-", status="skipped", note="needs CUDA"))
    assert a.commit == "abc1234" and a.device == common.device_name() and a.date.endswith("Z")
    rows = common.load_rows(str(results))
    assert [r.bench for r in rows] == ["packing", "attention"] and rows[0] == a
    text = common.table(rows)
    assert "commit: abc1234" in text and "SKIPPED: needs CUDA" in text and "4,000 Mtok/s" in text
    cells = a.markdown().strip("|").split(" | ")
    assert len(cells) == len(common.COLUMNS) == common.MARKDOWN_HEADER.splitlines()[0].count("|") - 1


def test_limits_are_read_back_from_the_results_file(results):
    """A second benchmark of the same run on the same device reuses the measured ceilings (no GPU needed here)."""
    dev = common.device_name()
    for op, rate in (("bf16 matmul", 780.0), ("copy", 4300.0)):
        common.record(common.Row("limits", op, "torch", "-", rate=rate, device=dev))
    assert common.limits() == {"matmul": 780.0, "copy": 4300.0}


# -- every bench module speaks it --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["attention", "fp8", "muon"])
def test_gpu_benchmarks_import_and_record_a_skip_without_cuda(name, results):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    import run

    rows = run.bench([name], quick=True)
    assert len(rows) == 1 and rows[0].status == "skipped" and "CUDA" in rows[0].note, rows
    assert common.load_rows(str(results)) == rows


def test_packing_benchmark_quick_rows(results):
    import bench_packing

    rows = common.run_collect("packing", bench_packing.collect, True)
    ref = [r for r in rows if r.provider == "reference"]
    assert {r.op for r in ref} == {"pack loader", "pack drain"}
    for r in ref:
        assert r.status == "ok" and r.ms > 0 and r.unit == "Mtok/s" and r.rate > 0 and r.shape.startswith("T=2049")
    for r in rows:
        if r.provider == "cpp" and r.status == "ok":
            assert r.peer == "Python reference" and r.vs_peer > 1
    assert common.load_rows(str(results)) == rows


def test_loader_benchmark_quick_rows(results):
    pytest.importorskip("rustbpe")
    import bench_loader

    rows = common.run_collect("loader", bench_loader.collect, True)
    ok = [r for r in rows if r.status == "ok"]
    assert ok and all(r.bench == "loader" and r.unit == "Mtok/s" and r.rate > 0 and "B=2" in r.shape for r in ok)
    assert {r.provider for r in rows} == {f"packing={b}" for b in ("cpp", "reference")}


def test_attention_rows_carry_rate_limit_and_peer(results, monkeypatch):
    """bench_attention's row assembly (FLOPs -> TFLOP/s -> % of the measured limit, the peer of each window, the
    correctness guard's verdict), with the GPU work replaced by fixed timings so it runs here."""
    import bench_attention as BA

    ms = {"triton": 1.0, "sdpa": 1.5, "flex": 2.0, "reference": 10.0}

    def fake_provider(name):
        def provider(q, k, v, do, window, backward):
            if (name == "sdpa" and window is not None) or (name == "reference" and backward):
                return None
            return name  # measure() below maps it to its time
        return provider

    stack_times = [1.0, 4.0]  # the d20 stack: SSSL, then all full
    monkeypatch.setattr(common, "require_cuda", lambda what: None)
    monkeypatch.setattr(common, "limits", lambda path=None: {"matmul": 800.0, "copy": 4000.0})
    monkeypatch.setattr(common, "measure", lambda fn, warmup=5, repeats=20:
                        (ms[fn], 64.0) if isinstance(fn, str) else (stack_times.pop(0), 32.0))
    monkeypatch.setattr(BA, "_inputs", lambda *a, **k: (None, None, None, None))
    monkeypatch.setattr(BA, "PROVIDERS", {n: fake_provider(n) for n in ms})
    monkeypatch.setattr(BA, "correctness_guard", lambda H, D, w: (3e-3 if w else 1e-3, 1e-3))  # windowed: wrong
    rows = BA.collect(quick=True)
    d26 = shapes.SHAPES["d26"]
    triton = {(r.op, r.shape.split("w=")[1]): r for r in rows if r.provider == "triton" and "w=" in r.shape}
    assert set(triton) == {("fwd", "full"), ("fwd+bwd", "full"), ("fwd", "1025"), ("fwd+bwd", "1025")}
    full = triton[("fwd+bwd", "full")]
    flops = BA.attention_flops(BA.B, 2048, d26.n_head, d26.head_dim, None, True)
    assert full.rate == pytest.approx(flops / 1e-3 / 1e12) and full.unit == "TFLOP/s"
    assert full.pct_of_limit == pytest.approx(100 * full.rate / 800.0) and full.peak_mb == 64.0
    assert (full.peer, full.vs_peer, full.status) == ("sdpa", 1.5, "ok")
    windowed = triton[("fwd+bwd", "1025")]
    assert (windowed.peer, windowed.vs_peer, windowed.status) == ("flex", 2.0, "error")
    assert f"H={d26.n_head} D={d26.head_dim}" in windowed.shape and windowed.note.startswith("WRONG")
    assert not any(r.provider == "sdpa" and "w=1025" in r.shape for r in rows)
    stack = rows[-1]
    assert stack.vs_peer == 4.0 and stack.peer == "same stack all full" and "SSSL" in stack.shape


def test_gpu_benchmarks_call_what_the_ops_modules_have():
    """The GPU benchmarks run only on a lent GPU: a renamed op function must fail here, not in those minutes."""
    from nanotrain.ops import attention, fp8, newton_schulz

    needed = {attention: ["triton_attention", "reference"],
              newton_schulz: ["reference", "muon_update_reference", "muon_update_triton", "polar_express_triton",
                              "NORM_SAFETY", "GRAM_MIN_ASPECT"],
              fp8: ["Float8Config", "float8_linear", "quantize", "E4M3", "cublas_scaled_mm", "triton_scaled_mm",
                    "reference_cast", "triton_cast", "reference_cast_dual", "triton_cast_dual", "fp8_available"]}
    for module, names in needed.items():
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{module.__name__} lacks {missing}"
    assert hasattr(fp8.Float8Config, "from_recipe")
