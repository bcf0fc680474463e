"""TrainConfig: every option of `nanotrain` (the seed's names and defaults), parsed and validated up front.

A bad value stops the run before any work with one line saying what is wrong and what to do
(`UserError`); `nanotrain.train.main` prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass

from nanotrain.errors import UserError

EVAL_TOKENS_DEFAULT = 40 * 1024 * 1024  # 41,943,040 (the seed's "40M")


@dataclass(frozen=True)
class TrainConfig:
    # logging
    run: str = "dummy"
    # runtime
    device_type: str = "auto"
    # FP8
    fp8: bool = False
    fp8_recipe: str = "tensorwise"
    # model
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    # horizon (in this order of precedence)
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 10.5
    # optimization
    device_batch_size: int = 32
    total_batch_size: int = -1
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.2
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    resume_from_step: int | str = -1
    # evaluation
    eval_every: int = 250
    eval_tokens: int = EVAL_TOKENS_DEFAULT
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    # output
    save_every: int = -1
    model_tag: str | None = None
    # beyond the seed
    base_dir: str | None = None
    kernels: str | None = None
    seed: int = 42
    keep_last: int = -1
    compile: str = "auto"
    oom_auto_batch: bool = False
    overwrite: bool = False
    eval_bundle_dir: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    @property
    def tag(self) -> str:
        """Checkpoint folder name: --model-tag, else d{depth}."""
        return self.model_tag or f"d{self.depth}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fail(option: str, problem: str, fix: str) -> None:
    raise UserError(f"--{option.replace('_', '-')} {problem}; {fix}")


def validate(c: TrainConfig) -> None:
    """Check every option on its own; checks that need the world size or the data run later."""
    if c.device_type not in ("auto", "", "cuda", "cpu", "mps"):
        _fail("device_type", f"is '{c.device_type}'", "use cuda, cpu or mps (or leave it out to autodetect)")
    if c.fp8_recipe not in ("tensorwise", "rowwise"):
        _fail("fp8_recipe", f"is '{c.fp8_recipe}'", "use tensorwise or rowwise")
    for name in ("depth", "aspect_ratio", "head_dim", "device_batch_size"):
        if getattr(c, name) < 1:
            _fail(name, f"must be a positive integer, got {getattr(c, name)}", "pass a value of 1 or more")
    if c.head_dim % 2:
        _fail("head_dim", f"must be even for rotary embeddings, got {c.head_dim}", "pass e.g. 64 or 128")
    if c.max_seq_len < 2:
        _fail("max_seq_len", f"must be at least 2, got {c.max_seq_len}", "pass e.g. 2048 (or 256 on CPU)")
    if not c.window_pattern or not re.fullmatch(r"[SLsl]+", c.window_pattern):
        _fail("window_pattern", f"is '{c.window_pattern}'",
              "use only the letters S (short window) and L (full context), e.g. SSSL or L")
    if c.num_iterations != -1 and c.num_iterations < 1:
        _fail("num_iterations", f"is {c.num_iterations}", "pass a positive number of steps or -1")
    if c.target_flops != -1 and c.target_flops <= 0:
        _fail("target_flops", f"is {c.target_flops}", "pass a positive FLOP count (e.g. 1e18) or -1")
    if c.target_param_data_ratio != -1 and c.target_param_data_ratio <= 0:
        _fail("target_param_data_ratio", f"is {c.target_param_data_ratio}", "pass a positive ratio (e.g. 10.5) or -1")
    if c.num_iterations == -1 and c.target_flops == -1 and c.target_param_data_ratio == -1:
        raise UserError("no training horizon; set one of --num-iterations, --target-flops or --target-param-data-ratio")
    if c.total_batch_size != -1 and c.total_batch_size < 1:
        _fail("total_batch_size", f"is {c.total_batch_size}", "pass a positive number of tokens or -1 (auto)")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay"):
        if getattr(c, name) < 0:
            _fail(name, f"must not be negative, got {getattr(c, name)}", "pass 0 or a positive value")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            _fail(name, f"must be in [0, 1), got {getattr(c, name)}", "pass e.g. 0.8 or 0.95")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0 <= getattr(c, name) <= 1:
            _fail(name, f"must be in [0, 1], got {getattr(c, name)}", "pass a fraction between 0 and 1")
    if c.warmup_ratio + c.warmdown_ratio > 1:
        raise UserError(f"--warmup-ratio ({c.warmup_ratio}) + --warmdown-ratio ({c.warmdown_ratio}) exceed 1; "
                        "make them add up to at most 1")
    if not (c.resume_from_step == "latest" or (isinstance(c.resume_from_step, int) and c.resume_from_step >= -1)):
        _fail("resume_from_step", f"is '{c.resume_from_step}'", "pass a saved step number, 'latest', or -1")
    for name in ("eval_every", "core_metric_every", "sample_every", "save_every"):
        v = getattr(c, name)
        if v != -1 and v < 1:
            _fail(name, f"is {v}", "pass a positive number of steps, or -1 to turn it off")
    if c.eval_tokens < 1:
        _fail("eval_tokens", f"is {c.eval_tokens}", "pass a positive number of tokens")
    if c.core_metric_max_per_task != -1 and c.core_metric_max_per_task < 1:
        _fail("core_metric_max_per_task", f"is {c.core_metric_max_per_task}", "pass a positive count or -1 (all)")
    if c.keep_last != -1 and c.keep_last < 1:
        _fail("keep_last", f"is {c.keep_last}", "pass how many checkpoints to keep (1 or more), or -1 to keep all")
    if c.compile not in ("auto", "on", "off"):
        _fail("compile", f"is '{c.compile}'", "use auto, on or off")
    if c.model_tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", c.model_tag):
        _fail("model_tag", f"is '{c.model_tag}'", "use letters, digits, '.', '_' and '-' only")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see `nanotrain --help`", file=sys.stderr)
        sys.exit(2)


def _resume_step(value: str) -> int | str:
    if value == "latest":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step '{value}' (pass a step number, 'latest', or -1)")


HELP = {
    "run": "wandb run name; 'dummy' disables wandb",
    "device_type": "cuda, cpu or mps (default: autodetect)",
    "fp8": "FP8 matmuls for the large linears (H100-class GPUs)",
    "fp8_recipe": "FP8 scaling: tensorwise (faster) or rowwise",
    "depth": "transformer layers: the one dial that sizes everything else",
    "aspect_ratio": "model_dim = depth x aspect_ratio, rounded up to a multiple of --head-dim",
    "head_dim": "target attention head dimension",
    "max_seq_len": "context length",
    "window_pattern": "sliding-window pattern tiled over layers: L = full context, S = half; last layer always L",
    "num_iterations": "explicit number of optimizer steps (-1 = use the next horizon option)",
    "target_flops": "train until this many FLOPs (-1 = off)",
    "target_param_data_ratio": "tokens : scaling-params ratio of the horizon (-1 = off)",
    "device_batch_size": "sequences per device per micro-step (reduce on out-of-memory)",
    "total_batch_size": "tokens per optimizer step (-1 = auto from the horizon)",
    "embedding_lr": "AdamW LR of the token embedding", "unembedding_lr": "AdamW LR of the output head",
    "matrix_lr": "Muon LR of the transformer matrices", "scalar_lr": "AdamW LR of the per-layer scalars",
    "weight_decay": "cautious weight decay of the Muon matrices (scaled with batch and horizon)",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2",
    "warmup_ratio": "fraction of steps of linear LR warmup",
    "warmdown_ratio": "fraction of steps of linear LR warmdown",
    "final_lr_frac": "LR at the end, as a fraction of the peak",
    "resume_from_step": "resume from this saved step, or 'latest' (-1 = start fresh)",
    "eval_every": "val bpb every N steps (-1 = off)", "eval_tokens": "tokens per val bpb evaluation",
    "core_metric_every": "CORE metric every N steps (-1 = off)",
    "core_metric_max_per_task": "CORE examples per task (-1 = all)",
    "sample_every": "print samples every N steps (-1 = off)",
    "save_every": "checkpoint every N steps (-1 = at the end only)",
    "model_tag": "checkpoint folder name (default d{depth})",
    "base_dir": "where data, tokenizer and checkpoints live (default $NANOTRAIN_BASE_DIR or ~/.cache/nanotrain)",
    "seed": "random seed of the weights init",
    "keep_last": "keep only the newest N checkpoints (-1 = keep all)",
    "compile": "torch.compile the model: auto (CUDA, and CPU runs of 200+ steps), on, off",
    "oom_auto_batch": "on out-of-memory at the first step, halve --device-batch-size (or lower it to a divisor) and "
                      "keep the total batch",
    "overwrite": "start fresh in a --model-tag that has checkpoints (its folder is renamed aside, not deleted)",
    "eval_bundle_dir": "folder of the CORE eval bundle (default: <base-dir>/eval_bundle, downloaded on first use)",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nanotrain", description="Pretrain a compute-optimal GPT base model; --depth sizes everything.")
    defaults = TrainConfig.__dataclass_fields__
    for name, f in defaults.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        if name == "kernels":
            continue
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP.get(name))
        elif name == "resume_from_step":
            p.add_argument(flag, type=_resume_step, default=default, help=HELP[name])
        else:
            kind = {"target_flops": float}.get(name) or (type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=default, help=HELP.get(name))
    p.add_argument("--kernels", nargs="?", const="list", default=None,
                   help="force op backends, e.g. attention=triton,muon=reference; alone: print the backend table")
    p.add_argument("--check", action="store_true",
                   help="with --kernels alone: also run every fused backend's self-check here and print the table")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated TrainConfig (UserError on a bad value).

    `--kernels --check` becomes kernels="check" (print the table and run the self-checks)."""
    ns = vars(build_parser().parse_args(argv))
    if ns.pop("check"):
        if ns["kernels"] != "list":
            raise UserError("--check runs the kernel self-checks and goes with --kernels alone: "
                            "run `nanotrain --kernels --check`.")
        ns["kernels"] = "check"
    return TrainConfig(**ns)


def replace(c: TrainConfig, **changes) -> TrainConfig:
    """A copy of `c` with some options changed (validated again)."""
    return dataclasses.replace(c, **changes)


__all__ = ["TrainConfig", "parse_args", "validate", "replace", "build_parser"]
