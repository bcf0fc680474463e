"""Time the CORE metric for a d12-sized model (random init) on this machine.

    python benchmarks/bench_core.py --max-per-task 16 [--tasks a,b] [--tokenizer-base DIR] [--device cpu]

One common.Row per task and one for the total go to the run's results file (common.results_path(), or
--results), like every benchmark's rows.

A random model's accuracy means nothing; the point is the wall time of the evaluation itself (prompt
rendering, tokenization, batched forwards), per task and in total. The tokenizer comes from
--tokenizer-base (a base dir with tokenizer/, e.g. one made by `nanotrain-data sample` and
`nanotrain-data tokenizer`); without one, a small BPE tokenizer is trained on the bundle's own text
(shorter prompts per token count differ, so say which in any recorded number).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: the row format and the results file)

from nanotrain.eval.core import ensure_eval_bundle, evaluate_core, load_rows, load_tasks  # noqa: E402
from nanotrain.model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-per-task", type=int, default=16)
    p.add_argument("--tasks", default=None, help="comma-separated task labels (default: all 22)")
    p.add_argument("--bundle-dir", default=None)
    p.add_argument("--tokenizer-base", default=None, help="base dir whose tokenizer/ to use")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="default: 32 x 2048 on a GPU, else evaluate_core's")
    p.add_argument("--share-prefix", choices=["auto", "on", "off"], default="auto",
                   help="run each example's shared context once through the KV cache (auto: on CPU)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--results", default=None, help="results file for the rows (default: common.results_path())")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = Path(args.bundle_dir) if args.bundle_dir else ensure_eval_bundle()
    tasks = args.tasks.split(",") if args.tasks else None
    if args.tokenizer_base:
        from nanotrain.data.tokenizer import load_tokenizer
        tok = load_tokenizer(args.tokenizer_base)
        tok_desc = f"{args.tokenizer_base} (vocab {tok.vocab_size})"
    else:
        from nanotrain.data.tokenizer import train_tokenizer
        text = [json.dumps(r) for t in load_tasks(bundle) for r in load_rows(t)[:200]]
        tok = train_tokenizer(text, vocab_size=4096)
        tok_desc = f"trained on the bundle's text (vocab {tok.vocab_size})"

    device = torch.device(args.device)
    if args.max_batch_tokens is None and device.type == "cuda":
        args.max_batch_tokens = 32 * 2048
    share = {"auto": None, "on": True, "off": False}[args.share_prefix]
    cfg = GPTConfig(sequence_len=2048, vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_embd // 128,
                    n_kv_head=args.n_embd // 128, n_embd=args.n_embd)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    autocast = None
    if device.type == "cuda":
        def autocast():
            return torch.amp.autocast("cuda", dtype=torch.bfloat16)

    per_task = {}
    t0 = time.perf_counter()
    for task in load_tasks(bundle, tasks):
        t = time.perf_counter()
        res = evaluate_core(model, tok, device, bundle_dir=bundle, max_per_task=args.max_per_task,
                            tasks=[task.label], batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                            autocast_ctx=autocast, share_prefix=share)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_task[task.label] = time.perf_counter() - t
        print(f"{task.label:<34} {per_task[task.label]:8.2f} s  accuracy {res['results'][task.label]:.3f}",
              flush=True)
    total = time.perf_counter() - t0
    shape = f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} seq={cfg.sequence_len} vocab={cfg.vocab_size}"
    note = (f"{tok_desc}; share_prefix={args.share_prefix}; max_per_task={args.max_per_task}; "
            f"{torch.get_num_threads()} threads")
    rows = [common.Row("core", f"CORE task {label}", "evaluate_core", shape, ms=seconds * 1e3, note=note)
            for label, seconds in per_task.items()]
    rows.append(common.Row("core", f"CORE, {len(per_task)} tasks", "evaluate_core", shape, ms=total * 1e3, note=note))
    rows = [common.record(r, args.results) for r in rows]
    print(f"total {total:.1f} s over {len(per_task)} tasks ({tok_desc}; {shape}; {rows[-1].device}, "
          f"{torch.get_num_threads()} threads, commit {rows[-1].commit})")
    print(f"{len(rows)} rows appended to {args.results or common.results_path()}")


if __name__ == "__main__":
    main()
