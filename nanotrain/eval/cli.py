"""`nanotrain-eval`: evaluate a saved checkpoint (val bpb, CORE, samples) and write a report.

    nanotrain-eval --model-tag d12 [--step N|latest] [--eval core,bpb,sample] [--max-per-task N]
    torchrun --nproc_per_node=8 -m nanotrain.eval.cli --model-tag d12      (CORE and bpb split over ranks)

The report goes next to the checkpoint as base_checkpoints/<tag>/eval_step_<N>.json and .csv (or to
--out FILE.json, with the CSV beside it), and a table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch

from nanotrain import paths
from nanotrain.errors import UserError, exit_code_of

EVALS = ("core", "bpb", "sample")
DEFAULT_EVAL_TOKENS = 40 * 2**20  # 41,943,040, the trainer's --eval-tokens default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanotrain-eval", description="Evaluate a nanotrain checkpoint: "
                                "validation bits per byte, the DCLM CORE metric, and samples.")
    p.add_argument("--model-tag", required=True, help="checkpoint folder under <base>/base_checkpoints (e.g. d12)")
    p.add_argument("--step", default="latest", help="step to load, or 'latest' (default)")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample (default all)")
    p.add_argument("--base-dir", default=None, help="base directory ($NANOTRAIN_BASE_DIR, else ~/.cache/nanotrain)")
    p.add_argument("--device-type", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE rows per task (-1 = all, the real metric)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="validation tokens for bpb")
    p.add_argument("--device-batch-size", type=int, default=32,
                   help="sequences per forward for bpb; on a GPU, CORE forwards hold at most this many x sequence_len "
                        "tokens")
    p.add_argument("--bundle-dir", default=None, help="an unpacked CORE eval bundle (default: <base>/eval_bundle, "
                   "downloaded on first use)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per sample prompt")
    p.add_argument("--out", default=None, help="report path (.json; a .csv is written beside it)")
    return p.parse_args(argv)


def parse_evals(spec: str) -> list[str]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in EVALS]
    if bad or not names:
        raise UserError(f"--eval {spec!r}: unknown evaluation(s) {', '.join(bad) or '(none given)'}; "
                        f"use a comma-separated subset of {','.join(EVALS)}")
    return list(dict.fromkeys(names))


def _check_checkpoint(model_tag: str, step: str, base_dir: str | None) -> None:
    """A one-line error naming the tags (or steps) that do exist, before anything is loaded."""
    from nanotrain.checkpoint import list_steps, resolve_step

    root = paths.base_dir(base_dir) / "base_checkpoints"
    ckpt_dir = paths.checkpoint_dir(model_tag, base_dir)
    if not list_steps(ckpt_dir):
        tags = sorted(d.name for d in root.iterdir() if d.is_dir() and list_steps(d)) if root.is_dir() else []
        have = ", ".join(tags) if tags else "none"
        raise UserError(f"no checkpoint for --model-tag {model_tag} in {root} (tags with checkpoints: {have}); "
                        f"pass one of those tags, or the --base-dir the model was trained in")
    resolve_step(ckpt_dir, step)  # raises a UserError listing the steps when this one is missing


def _autocast(device: torch.device) -> Callable[[], ContextManager]:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return lambda: torch.amp.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _eval_context(model: torch.nn.Module, device: torch.device) -> Callable[[], ContextManager]:
    """bf16 autocast on recent GPUs, with FP8 off when the model has FP8 layers (nanotrain.ops.fp8)."""
    autocast = _autocast(device)
    try:
        from nanotrain.ops.fp8 import disable_fp8
    except ImportError:
        return autocast

    @contextlib.contextmanager
    def ctx():
        with disable_fp8(model), autocast():
            yield

    return ctx


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate and write the report; returns it (rank 0's view; every rank computes the same numbers)."""
    from nanotrain import distributed
    from nanotrain.eval.loading import load_model

    evals = parse_evals(args.eval)
    if args.device_batch_size < 1:
        raise UserError(f"--device-batch-size must be >= 1, got {args.device_batch_size}")
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise UserError(f"--max-per-task is {args.max_per_task}; pass a positive number of rows per task, "
                        f"or -1 for all of them")
    _check_checkpoint(args.model_tag, args.step, args.base_dir)
    bundle = None
    if "core" in evals:  # fail on a missing bundle before the (slow) model load
        from nanotrain.eval.core import ensure_eval_bundle
        bundle = ensure_eval_bundle(args.base_dir, bundle_dir=args.bundle_dir)
    rt = distributed.setup(args.device_type)
    try:
        model, tokenizer, meta = load_model(args.model_tag, args.step, device=rt.device, base_dir=args.base_dir)
        ctx = _eval_context(model, rt.device)
        step = int(meta["step"])
        seq_len = model.config.sequence_len
        report: dict[str, Any] = {"model_tag": args.model_tag, "step": step, "device": str(rt.device),
                                  "world_size": rt.world_size, "evals": evals}
        if "bpb" in evals:
            from nanotrain.data.loader import DataLoader
            from nanotrain.eval.bpb import evaluate_bpb

            steps = max(1, args.eval_tokens // (args.device_batch_size * seq_len * rt.world_size))
            loader = DataLoader(tokenizer, args.device_batch_size, seq_len, split="val", device=rt.device,
                                base_dir=args.base_dir, rank=rt.rank, world_size=rt.world_size)
            t0 = time.perf_counter()
            report["val_bpb"] = evaluate_bpb(model, itertools.islice(iter(loader), steps), steps,
                                             tokenizer.token_bytes(rt.device), autocast_ctx=ctx)
            report["bpb_tokens"] = steps * args.device_batch_size * seq_len * rt.world_size
            report["bpb_seconds"] = time.perf_counter() - t0
        if "core" in evals:
            from nanotrain.eval.core import evaluate_core

            on_gpu = rt.device.type == "cuda"
            core = evaluate_core(model, tokenizer, rt.device, bundle_dir=bundle, max_per_task=args.max_per_task,
                                 batch_size=max(64, args.device_batch_size),
                                 max_batch_tokens=args.device_batch_size * seq_len if on_gpu else None,
                                 autocast_ctx=ctx)
            report["core"] = core
            report["core_metric"] = core["core_metric"]
        if "sample" in evals:
            from nanotrain.eval.engine import sample_text

            t0 = time.perf_counter()
            report["samples"] = sample_text(model, tokenizer, max_tokens=args.max_tokens, autocast_ctx=ctx)
            report["sample_seconds"] = time.perf_counter() - t0
        if rt.master:
            out = Path(args.out) if args.out else paths.checkpoint_dir(args.model_tag, args.base_dir) / \
                f"eval_step_{step:06d}.json"
            write_report(report, out)
            print_table(report)
            print(f"report: {out} and {out.with_suffix('.csv')}")
        return report
    finally:
        distributed.cleanup()


def write_report(report: dict[str, Any], out: Path) -> None:
    """JSON (everything) and CSV (one metric per row: val_bpb, core_metric, then each task's accuracies)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value", "centered", "examples"])
        if "val_bpb" in report:
            w.writerow(["val_bpb", f"{report['val_bpb']:.6f}", "", ""])
        if "core" in report:
            core = report["core"]
            w.writerow(["core_metric", f"{core['core_metric']:.6f}", "", ""])
            for label, acc in core["results"].items():
                w.writerow([label, f"{acc:.6f}", f"{core['centered_results'][label]:.6f}",
                            core["num_examples"][label]])


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['model_tag']} step {report['step']} on {report['device']} (x{report['world_size']})")
    if "core" in report:
        core = report["core"]
        print(f"{'task':<34}{'accuracy':>10}{'centered':>10}{'n':>7}")
        for label, acc in core["results"].items():
            print(f"{label:<34}{acc:>10.4f}{core['centered_results'][label]:>10.4f}{core['num_examples'][label]:>7}")
        print(f"{'CORE':<34}{'':>10}{core['core_metric']:>10.4f}   ({core['seconds']:.1f} s)")
    if "val_bpb" in report:
        bpb = report["val_bpb"]
        shown = f"{bpb:.6f}" if math.isfinite(bpb) else str(bpb)
        print(f"val bpb: {shown} over {report['bpb_tokens']:,} tokens ({report['bpb_seconds']:.1f} s)")
    for text in report.get("samples", []):
        print(f"sample: {text!r}")


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
