"""The plan for the lent GPU's minutes (benchmarks/gpu_check.sh), its rehearsal script, and the autotune knob the
plan's first call uses (NANOTRAIN_AUTOTUNE=first, kernels/_compile.py). CPU only, seconds."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
REHEARSAL = os.path.join(ROOT, "benchmarks", "gpu_rehearsal.sh")
DEVICE_SECONDS = 15 * 60  # a lent GPU's whole budget, the machine's start included
START_SECONDS = 90  # a machine's start (1-2 minutes)
MAX_FILES_BACK = 8  # files that come back from $OUT

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _plan() -> tuple[dict[str, list[str]], dict[str, int], dict[str, int]]:
    """(stages per call, limit per stage, budget per call) as `gpu_check.sh list` prints them."""
    out = subprocess.run(["bash", CHECK, "list"], capture_output=True, text=True, check=True).stdout
    stages, budgets, limits = {}, {}, {}
    for line in out.splitlines():
        if m := re.match(r"(call\d) \(budget (\d+) s\): (.*)", line):
            stages[m[1]] = m[3].split()
            budgets[m[1]] = int(m[2])
        elif m := re.match(r"limit (\S+) (\d+)", line):
            limits[m[1]] = int(m[2])
    return stages, limits, budgets


@needs_bash
@pytest.mark.parametrize("script", [CHECK, REHEARSAL], ids=["gpu_check", "gpu_rehearsal"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)


@needs_bash
def test_plan_fits_the_device_budget_and_is_consistent():
    stages, limits, budgets = _plan()
    assert set(stages) == {"call1", "call2"}
    assert budgets["call1"] <= 6 * 60 and budgets["call2"] <= 5 * 60
    # both calls and a start fit, with room left to rerun a stage of each call
    rerun = max(limits.values())
    assert START_SECONDS + budgets["call1"] + budgets["call2"] + rerun <= DEVICE_SECONDS
    text = open(CHECK).read()
    for call, names in stages.items():
        # <stage>.log per stage, stages.jsonl, results.jsonl, summary.txt: all must come back
        assert len(names) + 3 <= MAX_FILES_BACK, call
        for name in names:
            assert name in limits, f"{name} has no time limit"
            fn = "stage_" + name.replace("-", "_")
            assert re.search(rf"^{fn}\(\) {{", text, re.M), f"no function {fn} for stage {name}"
            assert fn in re.search(r"export -f (.*)", text)[1], f"{fn} is not exported to its timeout shell"
    defined = set(re.findall(r"^stage_(\w+)\(\) {", text, re.M))
    used = {n.replace("-", "_") for names in stages.values() for n in names}
    assert defined == used, f"stage functions no call runs: {defined - used}"
    # the first call tests and times with one autotune config per kernel, the second times with the full autotune
    quick = [line for line in text.splitlines() if "run.py bench --quick" in line or "-m gpu $KERNEL_TESTS" in line]
    full = [line for line in text.splitlines() if "run.py bench attention" in line]
    assert len(quick) == 2 and all("NANOTRAIN_AUTOTUNE=first" in line for line in quick)
    assert len(full) == 1 and "AUTOTUNE" not in full[0]


@needs_bash
def test_unknown_stage_is_refused():
    proc = subprocess.run(["bash", CHECK, "call1", "train"], capture_output=True, text=True)
    assert proc.returncode == 2 and "call1 has no stage 'train'" in proc.stderr


@needs_bash
def test_dry_run_of_one_stage_writes_its_results(tmp_path):
    """The cheapest path of the dry run: one stage, its log, its stage line (with the commit passed in) and the
    summary, all under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "NANOTRAIN_COMMIT": "feedbee", "PYTHON": sys.executable,
           "DRY_RUN": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", CHECK, "call2", "ext-tests"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(tmp_path))
    assert files == ["ext-tests.log", "stages.jsonl", "summary.txt"], files
    (rec,) = [json.loads(line) for line in open(tmp_path / "stages.jsonl")]
    assert (rec["call"], rec["stage"], rec["status"], rec["commit"]) == ("call2", "ext-tests", "ok", "feedbee")
    assert "skipped" in rec["detail"]  # the extension's gpu tests skip without CUDA, and say so
    summary = proc.stdout[proc.stdout.index("== summary"):]
    assert "ext-tests" in summary and summary.strip() == open(tmp_path / "summary.txt").read().strip()


# -- NANOTRAIN_AUTOTUNE ---------------------------------------------------------------------------------------


def test_autotune_configs_knob(monkeypatch):
    from nanotrain.kernels._compile import autotune_configs

    configs = ["a", "b", "c"]
    monkeypatch.delenv("NANOTRAIN_AUTOTUNE", raising=False)
    assert autotune_configs(configs) == configs
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    assert autotune_configs(configs) == ["a"]
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "all")
    assert autotune_configs(configs) == configs
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "fist")
    with pytest.raises(ValueError, match="'first'"):
        autotune_configs(configs)


@pytest.mark.parametrize("family", ["attention", "fp8", "newton_schulz"])
def test_kernels_honour_the_autotune_knob(family, monkeypatch):
    """Each family's autotuned wrapper is built from autotune_configs: one config under NANOTRAIN_AUTOTUNE=first."""
    import importlib

    K = importlib.import_module(f"nanotrain.kernels.{family}")
    build = {"attention": lambda: K._tuned.__wrapped__("fwd", "sm90"),
             "fp8": lambda: K._fp8_matmul_tuned.__wrapped__(True, False),
             "newton_schulz": lambda: K._tuned.__wrapped__("sym", (9, 0))}[family]
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "all")
    assert len(build().configs) > 1
    monkeypatch.setenv("NANOTRAIN_AUTOTUNE", "first")
    assert len(build().configs) == 1
