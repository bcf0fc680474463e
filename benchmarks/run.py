"""Run benchmarks into one results file, and the Python steps of the lent-GPU plan (benchmarks/gpu_check.sh).

    python benchmarks/run.py bench [--quick] [NAME ...]     # bench_<NAME>.py collect() -> the results file
    python benchmarks/run.py graph-breaks [--depth 12 --seq-len 2048 --batch 1]
    python benchmarks/run.py train --base DIR [--depth 12 --steps 30] [-- extra nanotrain options]
    python benchmarks/run.py prepare --base DIR [--vocab-size 32768]   # here, on the CPU, before the GPU calls
    python benchmarks/run.py stage NAME STATUS SECONDS DETAIL [--stages FILE]   # one stage line (gpu_check.sh)
    python benchmarks/run.py summary [--stages FILE] [--results FILE]           # the stages and rows, as tables

Every measurement becomes a common.Row appended to the run's results file (common.results_path(): $OUT/results.jsonl
on the device machine); `summary` prints the stage table and the row table last.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

BENCHES = ("attention", "fp8", "muon", "packing", "loader")  # bench_<name>.py with collect(quick)
GPU_BENCHES = ("attention", "fp8", "muon")


def bench(names: list[str], quick: bool, path: str | None = None) -> list[common.Row]:
    """Run each bench_<name>.collect(quick) into the results file (skips and errors recorded as rows)."""
    rows = []
    for name in names:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}: choose from {', '.join(BENCHES)}")
        t0 = time.time()
        try:
            module = importlib.import_module(f"bench_{name}")
        except Exception as e:  # noqa: BLE001 - an import failure is a result too
            rows.append(common.record(common.Row(name, "-", "-", "-", status="error",
                                                 note=f"import: {type(e).__name__}: {e}"[:300]), path))
            continue
        got = common.run_collect(name, module.collect, quick, path)
        print(f"bench {name}: {len(got)} rows in {time.time() - t0:.0f} s "
              f"({', '.join(sorted({r.status for r in got}))})", flush=True)
        rows += got
    return rows


# -- graph breaks of a compiled forward --------------------------------------------------------------------------


def graph_breaks(depth: int, seq_len: int, batch: int, path: str | None = None) -> common.Row:
    """torch._dynamo.explain of a d<depth> forward (with targets, the training call): graphs and graph breaks.

    One graph and no break is the goal (issue 13: every backend chosen once, when the model is built, so dynamo
    traces no registry lookup). Built with nanotrain.train's own model_config_for/build_model."""
    import torch

    from nanotrain.config import TrainConfig
    from nanotrain.train import build_model, model_config_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(depth=depth, max_seq_len=seq_len)
    model = build_model(model_config_for(cfg, 32768), device)
    idx = torch.randint(0, 32768, (batch, seq_len), device=device)
    torch._dynamo.reset()
    t0 = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        explained = torch._dynamo.explain(model)(idx, idx)
    seconds = time.time() - t0
    reasons = []
    for b in explained.break_reasons:
        where = b.user_stack[-1] if getattr(b, "user_stack", None) else None
        at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where is not None else ""
        reasons.append(f"{b.reason.splitlines()[0][:120]}{at}")
    row = common.Row("compile", "graph breaks, forward+loss", "torch._dynamo.explain",
                     f"d{depth} B={batch} T={seq_len} on {device.type}", ms=seconds * 1e3,
                     rate=float(explained.graph_break_count), unit="breaks",
                     note=f"{explained.graph_count} graphs, {explained.op_count} ops"
                          + ("; " + " | ".join(dict.fromkeys(reasons)) if reasons else ""))
    return common.record(row, path)


# -- training throughput -----------------------------------------------------------------------------------------


def train(base: str, depth: int, steps: int, extra: list[str], path: str | None = None) -> common.Row:
    """Train `steps` steps of d<depth> on the prepared base dir and record tokens/s and MFU (medians over the steps
    after the first few, which include compilation), read back from the run's metrics.jsonl."""
    from nanotrain.paths import checkpoint_dir
    from nanotrain.train import main as train_main

    tag = f"gpucheck_d{depth}"
    args = [f"--depth={depth}", f"--num-iterations={steps}", "--eval-every=-1", "--core-metric-every=-1",
            "--sample-every=-1", "--save-every=-1", f"--model-tag={tag}", f"--base-dir={base}", "--overwrite",
            *extra]
    t0 = time.time()
    rc = train_main(args)
    seconds = time.time() - t0
    metrics = checkpoint_dir(tag, base) / "metrics.jsonl"
    steps_seen = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("train/tok_per_sec") is not None:
                steps_seen.append(rec)
    shape = f"d{depth} x{steps} steps " + " ".join(a.lstrip("-") for a in extra if "batch" in a or "seq" in a)
    if rc not in (0, None) or not steps_seen:
        return common.record(common.Row("train", "train step", "nanotrain", shape.strip(), status="error",
                                        note=f"exit {rc}, {len(steps_seen)} step lines in {metrics}"), path)
    steady = steps_seen[min(5, len(steps_seen) - 1):]  # the first steps compile and autotune
    tok = statistics.median(r["train/tok_per_sec"] for r in steady)
    mfus = [r["train/mfu"] for r in steady if r.get("train/mfu") is not None]
    dt = statistics.median(r["train/dt"] for r in steady)
    return common.record(common.Row(
        "train", "train step", "nanotrain", shape.strip(), ms=dt * 1e3, rate=tok, unit="tok/s",
        pct_of_limit=statistics.median(mfus) if mfus else None, limit="MFU (nanotrain.monitor.peak_flops)" if mfus
        else "", note=f"median of steps {len(steps_seen) - len(steady) + 1}..{len(steps_seen)}; "
                      f"whole run {seconds:.0f} s"), path)


def prepare(base: str, vocab_size: int, min_bytes: int) -> None:
    """Build, on this CPU machine, what the training stage needs on a device without rustbpe or internet: the
    offline sample corpus (`nanotrain-data sample`) and a tokenizer trained on it, in `base` (carry it)."""
    from nanotrain.data.cli import main as data

    os.makedirs(base, exist_ok=True)
    t0 = time.time()
    if data(["sample", f"--base-dir={base}", f"--min-bytes={min_bytes}", "--force"]) != 0:
        raise SystemExit("prepare: nanotrain-data sample failed")
    if data(["tokenizer", f"--base-dir={base}", f"--vocab-size={vocab_size}"]) != 0:
        raise SystemExit("prepare: nanotrain-data tokenizer failed")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(base) for f in fs)
    print(f"prepare: {base} holds {size / 2**20:.1f} MiB (corpus + tokenizer) after {time.time() - t0:.0f} s")


# -- stages and the summary --------------------------------------------------------------------------------------

STAGE_KEYS = ("call", "stage", "status", "seconds", "detail", "commit", "device", "date")


def stages_path() -> str:
    out = os.environ.get("OUT") or os.path.join(HERE, "out")
    return os.path.join(out, "stages.jsonl")


def stage(name: str, status: str, seconds: float, detail: str, path: str | None = None) -> dict:
    """Append one stage's outcome (with the call, commit, device and date) to the stages file."""
    rec = dict(call=os.environ.get("GPU_CHECK_CALL", ""), stage=name, status=status, seconds=round(seconds, 1),
               detail=detail, commit=common.git_commit(), device=os.environ.get("GPU_CHECK_DEVICE", ""),
               date=common._now())
    path = path or stages_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def summary(stages_file: str | None, results_file: str | None) -> str:
    """The stage table, then every benchmark row (common.table), as one text."""
    stages_file = stages_file or stages_path()
    lines = []
    if os.path.exists(stages_file):
        with open(stages_file) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        if recs:
            lines.append(f"commit {recs[0]['commit']}, {recs[0]['device'] or 'device unknown'}")
            w = max(len(r["stage"]) for r in recs)
            lines.append(f"{'call':<5} {'stage':<{w}} {'status':<8} {'time':>6}  detail")
            lines += [f"{r['call']:<5} {r['stage']:<{w}} {r['status']:<8} {r['seconds']:>5.0f}s  {r['detail'][:150]}"
                      for r in recs]
    rows = common.load_rows(results_file)
    lines.append("")
    lines.append(common.table(rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="run benchmarks into the results file")
    b.add_argument("names", nargs="*", default=list(GPU_BENCHES))
    b.add_argument("--quick", action="store_true")
    b.add_argument("--results", default=None)
    g = sub.add_parser("graph-breaks", help="torch._dynamo.explain of a model forward")
    g.add_argument("--depth", type=int, default=12)
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--results", default=None)
    t = sub.add_parser("train", help="train a few steps, record tokens/s and MFU")
    t.add_argument("--base", required=True)
    t.add_argument("--depth", type=int, default=12)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--results", default=None)
    t.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more nanotrain options")
    pr = sub.add_parser("prepare", help="corpus + tokenizer for the device, built here")
    pr.add_argument("--base", required=True)
    pr.add_argument("--vocab-size", type=int, default=32768)
    pr.add_argument("--min-bytes", type=int, default=6_000_000)
    s = sub.add_parser("stage", help="append one stage line")
    s.add_argument("name")
    s.add_argument("status", choices=["ok", "failed", "timeout", "skipped"])
    s.add_argument("seconds", type=float)
    s.add_argument("detail")
    s.add_argument("--stages", default=None)
    m = sub.add_parser("summary", help="print the stage and row tables")
    m.add_argument("--stages", default=None)
    m.add_argument("--results", default=None)
    args = p.parse_args(argv)

    if args.cmd == "bench":
        rows = bench(args.names, args.quick, args.results)
        print(common.table(rows))
        return 1 if any(r.status == "error" for r in rows) else 0
    if args.cmd == "graph-breaks":
        row = graph_breaks(args.depth, args.seq_len, args.batch, args.results)
        print(common.table([row]))
        return 0
    if args.cmd == "train":
        extra = [a for a in args.extra if a != "--"]
        row = train(args.base, args.depth, args.steps, extra, args.results)
        print(common.table([row]))
        return 0 if row.status == "ok" else 1
    if args.cmd == "prepare":
        prepare(args.base, args.vocab_size, args.min_bytes)
        return 0
    if args.cmd == "stage":
        stage(args.name, args.status, args.seconds, args.detail, args.stages)
        return 0
    print(summary(args.stages, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
