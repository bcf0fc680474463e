"""TrainConfig: every option of `nanotrain` (the seed's names and defaults), parsed and validated up front.

A bad value stops the run before any work with one line saying what is wrong and what to do
(`UserError`); `nanotrain.train.main` prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from nanotrain.errors import UserError

EVAL_TOKENS_DEFAULT = 40 * 1024 * 1024  # 41,943,040 (the seed's "40M")


# Resume rules: what a run resumed from a checkpoint (--resume-from-step) may change, one per option (resume.py
# applies them). The rule is "a resumed run continues the same run": an option that changes the model, the data
# stream, the optimization trajectory or the numerics MUST_MATCH (changing it means starting a new run); the
# horizon and the optimizer hyperparameters may change on purpose (extend the run, lower the LR after a diverged
# loss), which makes it no longer the uninterrupted run, so each such change is NOTED in the log; everything else
# (cadences, names, paths, runtime choices) is FREE.
MUST_MATCH, NOTED, FREE = "must match", "noted", "free"


def option(default: Any, help: str, resume: str, why: str) -> Any:
    """A TrainConfig field: its default, its --help text, its resume rule (MUST_MATCH, NOTED or FREE) and why."""
    if resume not in (MUST_MATCH, NOTED, FREE):
        raise ValueError(f"unknown resume rule {resume!r}")
    return field(default=default, metadata={"help": help, "resume": resume, "why": why})


_HORIZON = "training horizon (LR schedule)"
_OPTIM = "optimizer hyperparameters"
_CADENCE = "a cadence: when to evaluate, sample or save, not what is trained"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `nanotrain`. Each field carries its --help text and its resume rule (see `option`); add a
    new option here, with both, and validate its value in `validate`."""
    # logging
    run: str = option("dummy", "wandb run name; 'dummy' disables wandb", FREE, "logging only")
    # runtime
    device_type: str = option("auto", "cuda, cpu or mps (default: autodetect)", FREE,
                              "where the run computes, not what it computes")
    # FP8
    fp8: bool = option(False, "FP8 matmuls for the large linears (H100-class GPUs)", MUST_MATCH, "matmul numerics")
    fp8_recipe: str = option("tensorwise", "FP8 scaling: tensorwise (faster) or rowwise", MUST_MATCH,
                             "matmul numerics")
    # model
    depth: int = option(20, "transformer layers: the one dial that sizes everything else", MUST_MATCH, "model shape")
    aspect_ratio: int = option(64, "model_dim = depth x aspect_ratio, rounded up to a multiple of --head-dim",
                               MUST_MATCH, "model shape")
    head_dim: int = option(128, "target attention head dimension", MUST_MATCH, "model shape")
    max_seq_len: int = option(2048, "context length", MUST_MATCH, "model shape and the rows the loader cuts")
    window_pattern: str = option(
        "SSSL", "sliding-window pattern tiled over layers: L = full context, S = half; last layer always L",
        MUST_MATCH, "model shape (attention windows)")
    # horizon (in this order of precedence)
    num_iterations: int = option(-1, "explicit number of optimizer steps (-1 = use the next horizon option)", NOTED,
                                 _HORIZON)
    target_flops: float = option(-1.0, "train until this many FLOPs (-1 = off)", NOTED, _HORIZON)
    target_param_data_ratio: float = option(10.5, "tokens : scaling-params ratio of the horizon (-1 = off)", NOTED,
                                            _HORIZON)
    # optimization
    # The loader's saved position is a position in a stream cut into rows of device_batch_size x max_seq_len; with
    # another micro-batch the same state would continue a different stream.
    device_batch_size: int = option(32, "sequences per device per micro-step (reduce on out-of-memory)", MUST_MATCH,
                                    "data stream (rows per micro-batch)")
    # Tokens per optimizer step: sets gradient accumulation, the data each step consumes and the LR/WD scaling.
    total_batch_size: int = option(-1, "tokens per optimizer step (-1 = auto from the horizon)", MUST_MATCH,
                                   "tokens per step")
    embedding_lr: float = option(0.3, "AdamW LR of the token embedding", NOTED, _OPTIM)
    unembedding_lr: float = option(0.004, "AdamW LR of the output head", NOTED, _OPTIM)
    matrix_lr: float = option(0.02, "Muon LR of the transformer matrices", NOTED, _OPTIM)
    scalar_lr: float = option(0.5, "AdamW LR of the per-layer scalars", NOTED, _OPTIM)
    weight_decay: float = option(0.2, "cautious weight decay of the Muon matrices (scaled with batch and horizon)",
                                 NOTED, _OPTIM)
    adam_beta1: float = option(0.8, "AdamW beta1", NOTED, _OPTIM)
    adam_beta2: float = option(0.95, "AdamW beta2", NOTED, _OPTIM)
    warmup_ratio: float = option(0.0, "fraction of steps of linear LR warmup", NOTED, "LR schedule")
    warmdown_ratio: float = option(0.5, "fraction of steps of linear LR warmdown", NOTED, "LR schedule")
    final_lr_frac: float = option(0.0, "LR at the end, as a fraction of the peak", NOTED, "LR schedule")
    resume_from_step: int | str = option(-1, "resume from this saved step, or 'latest' (-1 = start fresh)", FREE,
                                         "names the checkpoint to resume from")
    # evaluation
    eval_every: int = option(250, "val bpb every N steps (-1 = off)", FREE, _CADENCE)
    eval_tokens: int = option(EVAL_TOKENS_DEFAULT, "tokens per val bpb evaluation", FREE,
                              "measures the model, does not change it")
    core_metric_every: int = option(2000, "CORE metric every N steps (-1 = off)", FREE, _CADENCE)
    core_metric_max_per_task: int = option(500, "CORE examples per task (-1 = all)", FREE,
                                           "measures the model, does not change it")
    sample_every: int = option(2000, "print samples every N steps (-1 = off)", FREE, _CADENCE)
    # output
    save_every: int = option(-1, "checkpoint every N steps (-1 = at the end only)", FREE, _CADENCE)
    model_tag: str | None = option(None, "checkpoint folder name (default d{depth})", FREE,
                                   "names the folder the checkpoint is read from")
    # beyond the seed
    base_dir: str | None = option(
        None, "where data, tokenizer and checkpoints live (default $NANOTRAIN_BASE_DIR or ~/.cache/nanotrain)", FREE,
        "a path; the data and tokenizer behind it are compared by fingerprint")
    kernels: str | None = option(
        None, "force op backends, e.g. attention=triton,muon=reference; alone: print the backend table", FREE,
        "backends compute the same ops within the bounds of DESIGN.md")
    check: bool = option(False, "with --kernels alone: also run every fused backend's self-check here and print the "
                         "table", FREE, "a one-off report, not part of training")
    seed: int = option(42, "random seed of the weights init", FREE,
                       "the weights and RNG states come from the checkpoint")
    keep_last: int = option(-1, "keep only the newest N checkpoints (-1 = keep all)", FREE, "output housekeeping")
    compile: str = option("auto", "torch.compile the model: auto (CUDA, and CPU runs of 200+ steps), on, off", FREE,
                          "the same computation, compiled or not")
    oom_auto_batch: bool = option(
        False, "on out-of-memory at the first step, halve --device-batch-size (or lower it to a divisor) and keep the "
        "total batch", FREE, "acts only at the first step of a fresh run")
    overwrite: bool = option(
        False, "start fresh in a --model-tag that has checkpoints (its folder is renamed aside, not deleted)", FREE,
        "acts only on a fresh start")
    eval_bundle_dir: str | None = option(
        None, "folder of the CORE eval bundle (default: <base-dir>/eval_bundle, downloaded on first use)", FREE,
        "a path to evaluation data")

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
    if c.check and c.kernels != "list":
        raise UserError("--check runs the kernel self-checks and goes with --kernels alone: "
                        "run `nanotrain --kernels --check`.")
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
    check_keep_last(c.keep_last)
    if c.compile not in ("auto", "on", "off"):
        _fail("compile", f"is '{c.compile}'", "use auto, on or off")
    if c.model_tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", c.model_tag):
        _fail("model_tag", f"is '{c.model_tag}'", "use letters, digits, '.', '_' and '-' only")


def check_keep_last(keep_last: int) -> None:
    """The one rule of --keep-last (also applied by checkpoint.save_checkpoint and prune to their callers)."""
    if keep_last != -1 and keep_last < 1:
        raise UserError(f"--keep-last must be at least 1, got {keep_last}; pass how many checkpoints to keep, "
                        "or -1 to keep every checkpoint")


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


def build_parser() -> argparse.ArgumentParser:
    """The `nanotrain` command line: one flag per TrainConfig field, its help text read from the field."""
    p = _Parser(prog="nanotrain", description="Pretrain a compute-optimal GPT base model; --depth sizes everything.")
    for f in dataclasses.fields(TrainConfig):
        flag, default, help = "--" + f.name.replace("_", "-"), f.default, f.metadata["help"]
        if f.name == "kernels":
            p.add_argument(flag, nargs="?", const="list", default=None, help=help)
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help)
        elif f.name == "resume_from_step":
            p.add_argument(flag, type=_resume_step, default=default, help=help)
        else:
            kind = {"target_flops": float}.get(f.name) or (type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=default, help=help)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated TrainConfig (UserError on a bad value)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def resume_rules() -> dict[str, tuple[str, str]]:
    """{option: (resume rule, why)} of every TrainConfig field, in field order (what nanotrain/resume.py applies)."""
    return {f.name: (f.metadata["resume"], f.metadata["why"]) for f in dataclasses.fields(TrainConfig)}


__all__ = ["FREE", "MUST_MATCH", "NOTED", "TrainConfig", "build_parser", "check_keep_last", "option", "parse_args",
           "resume_rules", "validate"]
