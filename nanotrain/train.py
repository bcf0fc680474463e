"""`nanotrain`: pretrain a GPT base model whose size, batch, learning rates and horizon follow from --depth.

The story of a run, top to bottom: `setup` builds every part of the run into one `Run` (the device and
process group, the tokenizer, the model and the plan its size implies, the precision, the optimizer,
the data loaders, and a resumed run's state), checking everything that can fail before any work;
`fit_first_step` runs the first step's forward/backward, where memory peaks, and settles the batch size
before the loop; then the loop: save when a checkpoint is due (before that step's evaluations, so a
failing evaluation never costs trained steps), evaluate when due (a failure is one line and a metrics
row, never the end of training), and take one optimizer step, until the horizon, a signal, or a
diverged loss ends the run. The math lives in scaling.py, model.py and optim.py; the arithmetic
(autocast, gradient scaling) in precision.py.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import itertools
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from nanotrain import __version__, checkpoint, distributed, scaling
from nanotrain import model as gpt
from nanotrain.config import TrainConfig, parse_args
from nanotrain.data.loader import DEFAULT_TRAIN_STREAMS, DataLoader, merge_loader_states
from nanotrain.data.shards import data_fingerprint
from nanotrain.data.tokenizer import Tokenizer, load_tokenizer
from nanotrain.distributed import Runtime
from nanotrain.errors import UserError
from nanotrain.eval.bpb import evaluate_bpb
from nanotrain.eval.core import ensure_eval_bundle, evaluate_core
from nanotrain.eval.engine import sample_text
from nanotrain.monitor import Monitor, mfu, peak_flops, step_line
from nanotrain.ops import registry
from nanotrain.ops.fp8 import Float8Config, check_fp8_supported, convert_to_float8, disable_fp8
from nanotrain.optim import (
    build_optimizer,
    lr_multiplier,
    merge_optimizer_shards,
    muon_momentum,
    weight_decay_multiplier,
)
from nanotrain.paths import checkpoint_dir
from nanotrain.precision import Precision
from nanotrain.precision import choose as choose_precision
from nanotrain.resume import check_resume_compatible

# Exit codes besides 0 (done, or stopped by a signal after saving) and 2 (a user error, see main)
EXIT_DIVERGED = 3      # a non-finite training loss; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 4  # the first step does not fit (and --oom-auto-batch is off or cannot help)
EXIT_DISK_FULL = 5     # a checkpoint did not fit on the disk; the previous one and `latest` are untouched
EXIT_EVAL_FAILED = 6   # a final evaluation failed; the final checkpoint is saved


class RunStopped(Exception):
    """The run ended early on purpose (diverged loss, out of memory, full disk, failed final evaluation); the
    message says what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LoopState:
    """Everything besides model/optimizer/loader that a resumed run must continue from."""
    step: int = 0
    smooth_loss: float = 0.0
    val_bpb: float | None = None
    val_bpb_step: int = -1  # the step val_bpb was measured at
    min_val_bpb: float = float("inf")
    total_training_time: float = 0.0
    timed_steps: int = 0


@dataclass
class Run:
    """Every part of one run, built once by setup(); the loop reads it and advances its state."""
    cfg: TrainConfig
    rt: Runtime
    mon: Monitor
    ckpt_dir: Path
    tokenizer: Tokenizer
    token_bytes: Tensor  # (V,) UTF-8 bytes per token, for val bpb
    model: torch.nn.Module  # the weights: saved, evaluated, updated by the optimizer
    step_model: torch.nn.Module  # what a training step calls: the compiled model, or `model`
    optimizer: torch.optim.Optimizer
    plan: scaling.TrainingPlan
    precision: Precision
    meta: dict  # what every checkpoint records about the run (see checkpoint_meta)
    state: LoopState
    train_loader: DataLoader  # the training stream (its first batch already drawn into `batch`)
    batch: tuple[Tensor, Tensor]  # the batch the next step trains on (drawn ahead while the device works)
    loader_start: dict | None  # the loader state the run started from (None: the stream's beginning)
    device_batch_size: int  # --device-batch-size, or what an out-of-memory first step lowered it to
    grad_accum: int
    peak_flops: float | None
    bundle_dir: Path | None  # the CORE bundle (None: CORE is off)
    first_step: int
    resume_step: int | None
    logged_at_resume: frozenset[str] = frozenset()  # evaluations the earlier run logged at resume_step
    pending: tuple[Tensor, float] | None = None  # fit_first_step's loss and seconds; its gradients are in place
    failed_final: list[str] = field(default_factory=list)  # final evaluations that failed

    @property
    def last_step(self) -> int:
        return self.plan.num_iterations


# --------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> LoopState:
    """Train from the options to the horizon (or a stop); returns the final loop state."""
    run = setup(cfg)
    with StopSignals() as stop:
        fit_first_step(run)
        while True:
            step = run.state.step
            stopping = step > run.first_step and stop.agreed(run.rt)
            if stopping or should_save(run, step):
                save(run)  # before this step's evaluations: a failing (or preempted) evaluation loses nothing
            if stopping:
                announce_stop(run, stop)
                break
            for name in EVALUATORS:  # bpb, core, sample: in this order
                if should_eval(run, step, name):
                    evaluate(run, name)
            if step == run.last_step:
                break
            take_step(run)
    finish(run)
    return run.state


def should_save(run: Run, step: int) -> bool:
    """The final step, and every --save-every steps (a resumed run does not save its first step again)."""
    periodic = run.cfg.save_every > 0 and step > run.first_step and step % run.cfg.save_every == 0
    return step == run.last_step or periodic


def should_eval(run: Run, step: int, name: str) -> bool:
    """Whether evaluation `name` is due at `step` (every one is due at the final step). A checkpoint is written
    before its step's evaluations: a run resumed at that step measures those the earlier run did not log (it was
    stopped first, or they failed); samples, which are not logged, are not repeated."""
    cfg, last = run.cfg, step == run.last_step
    if name == "sample":
        return cfg.sample_every > 0 and run.rt.master and (last or (step > run.first_step and
                                                                    step % cfg.sample_every == 0))
    if step == run.resume_step and name in run.logged_at_resume:
        return False
    if name == "bpb":
        return cfg.eval_every > 0 and (last or step % cfg.eval_every == 0)
    return run.bundle_dir is not None and (last or (step > 0 and step % cfg.core_metric_every == 0))


def take_step(run: Run) -> None:
    """One optimizer step: grad_accum micro-steps of forward/backward (done by fit_first_step for the first
    step), the update, then the step's line and metrics row. A non-finite loss stops the run."""
    step = run.state.step
    if run.pending is not None:
        (loss, seconds), run.pending = run.pending, None
        t0 = time.time() - seconds
    else:
        synchronize(run.rt)
        t0 = time.time()
        loss, x, y = train_micro_steps(run.step_model, *run.batch, run.train_loader, run.grad_accum, run.precision)
        run.batch = (x, y)
    apply_schedules(run.optimizer, run.plan, step, run.cfg)
    try:
        applied = run.precision.step(run.optimizer)
    except torch.OutOfMemoryError:
        if step != run.first_step:
            raise
        raise RunStopped(OPTIMIZER_OOM, exit_code=EXIT_OUT_OF_MEMORY) from None
    run.model.zero_grad(set_to_none=True)
    loss_f = distributed.all_reduce_sum(loss).item() / run.rt.world_size  # every rank sees a NaN on any rank
    synchronize(run.rt)
    dt = time.time() - t0
    if not math.isfinite(loss_f):
        raise RunStopped(diverged_message(run.ckpt_dir, step, loss_f), exit_code=EXIT_DIVERGED)
    record_step(run, loss_f, dt, applied)
    if step == run.first_step:  # setup garbage is done: keep the collector from stalling steps
        gc.collect()
        gc.freeze()


# --------------------------------------------------------------------------------------------
# Setup: every part of the run, checked before any work


def setup(cfg: TrainConfig) -> Run:
    """Build the run's parts in order; everything that can be refused (missing data or checkpoint, a changed
    model on resume, FP8 off-GPU) is refused before the metrics log is touched or a step is taken."""
    rt = distributed.setup(cfg.device_type)
    ckpt_dir = checkpoint_dir(cfg.tag, cfg.base_dir)
    resume_step = checkpoint.resolve_step(ckpt_dir, cfg.resume_from_step) if cfg.resume_from_step != -1 else None
    if resume_step is None:
        check_fresh_start(ckpt_dir, cfg)
    mon = Monitor(master=rt.master, run=cfg.run, out_dir=ckpt_dir, config=cfg.to_dict())  # prints; files at start()
    mon.print(f"nanotrain {__version__} | torch {torch.__version__} | {rt.world_size} rank(s)")
    peak = describe_device(rt, mon)
    if cfg.fp8:
        check_fp8_supported(rt.device)
    precision = choose_precision(rt.device)
    mon.print(precision.describe())

    tokenizer = load_tokenizer(cfg.base_dir)  # fails here, before any work, when the data is missing
    mon.print(f"Vocab size: {tokenizer.vocab_size:,}")
    model_config = model_config_for(cfg, tokenizer.vocab_size, kv_heads=saved_kv_heads(ckpt_dir, resume_step))
    mon.print(f"Model config: {asdict(model_config)}")
    model = build_model(model_config, rt.device, cfg.seed, compute_dtype=precision.dtype or torch.float32)
    mon.print("Parameter counts: " + ", ".join(f"{k} {v:,}" for k, v in model.num_scaling_params().items()))
    mon.print(f"FLOPs per token (fwd+bwd): {model.estimate_flops():.3e}")
    plan = plan_for(cfg, rt, model, tokenizer.vocab_size, mon)
    meta = run_meta(cfg, rt, model_config, tokenizer, data_fingerprint(cfg.base_dir), plan)
    ckpt = (load_resume_checkpoint(cfg, rt, ckpt_dir, resume_step, meta, model, plan.num_iterations, mon)
            if resume_step is not None else None)

    if cfg.fp8:
        converted, total = convert_to_float8(model, Float8Config.from_recipe(cfg.fp8_recipe))
        mon.print(f"✓ FP8 ({cfg.fp8_recipe} scaling): converted {converted} of {total} linear layers")
    report_kernels(mon, rt, model_config, cfg.fp8, precision.dtype or torch.float32)
    compile_on, compile_note = compile_decision(cfg, rt.device, plan.num_iterations)
    if compile_note:
        mon.print(compile_note)
    step_model = torch.compile(model, dynamic=False) if compile_on else model
    if compile_on:
        mon.print("torch.compile: on")
    optimizer = build_optimizer(
        model, embedding_lr=cfg.embedding_lr * plan.lr_scale, unembedding_lr=cfg.unembedding_lr * plan.lr_scale,
        matrix_lr=cfg.matrix_lr * plan.lr_scale, scalar_lr=cfg.scalar_lr * plan.lr_scale,
        weight_decay=plan.weight_decay, adam_betas=(cfg.adam_beta1, cfg.adam_beta2), sharded=rt.distributed)
    state, loader_start = LoopState(), None
    if ckpt is not None and not ckpt.meta.get("weights_only"):
        state, loader_start = restore_training_state(ckpt, optimizer, precision)
    train_loader = make_loader(cfg, rt, tokenizer, cfg.device_batch_size, "train", loader_start)
    bundle_dir = core_bundle(cfg, rt)

    if resume_step is None and cfg.overwrite:
        move_aside(ckpt_dir, rt, mon)
    mon.start(resume_step, ckpt.meta.get("wandb_run_id") if ckpt is not None else None)  # the checks passed
    logged = frozenset() if resume_step is None else frozenset(  # rank 0 keeps the log: every rank follows it
        name for name, key in (("bpb", "val/bpb"), ("core", "core_metric"))
        if distributed.any_rank(mon.logged(resume_step, key), rt.device))
    batch = next(train_loader)  # the batch the first step trains on
    return Run(cfg=cfg, rt=rt, mon=mon, ckpt_dir=ckpt_dir, tokenizer=tokenizer,
               token_bytes=tokenizer.token_bytes(device=rt.device), model=model, step_model=step_model,
               optimizer=optimizer, plan=plan, precision=precision, meta=dict(meta, wandb_run_id=mon.wandb_id),
               state=state, train_loader=train_loader, batch=batch, loader_start=loader_start,
               device_batch_size=cfg.device_batch_size,
               grad_accum=plan.grad_accum_steps, peak_flops=peak, bundle_dir=bundle_dir, first_step=state.step,
               resume_step=resume_step, logged_at_resume=logged)


def model_config_for(cfg: TrainConfig, vocab_size: int, depth: int | None = None,
                     kv_heads: int | None = None) -> gpt.GPTConfig:
    """The GPTConfig for a depth (default: --depth) under the run's shape options. The trainer builds models with
    one key/value head per query head, unless `kv_heads` (a resumed checkpoint's, see saved_kv_heads) says GQA."""
    depth = cfg.depth if depth is None else depth
    model_dim, num_heads = scaling.model_shape(depth, cfg.aspect_ratio, cfg.head_dim)
    kv = kv_heads if kv_heads and num_heads % kv_heads == 0 else num_heads  # else the resume check names the shape
    return gpt.GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                         n_kv_head=kv, n_embd=model_dim, window_pattern=cfg.window_pattern.upper())


def saved_kv_heads(ckpt_dir: Path, step: int | None) -> int | None:
    """The key/value heads of the checkpoint a run resumes from (None for a fresh start): a model imported with GQA
    (e.g. from nanochat) trains on with its own heads, since no option of the trainer sets them."""
    if step is None:
        return None
    return checkpoint.read_meta(ckpt_dir, step).get("model_config", {}).get("n_kv_head")


def build_model(model_config: gpt.GPTConfig, device: torch.device | None = None, seed: int = 42,
                compute_dtype: torch.dtype | None = None) -> gpt.GPT:
    """The model, initialized on `device` with `seed`, its kernels resolved for `compute_dtype` (the run's autocast
    dtype; default: the device's); device=None builds it on the meta device (shapes only)."""
    if device is None:
        with torch.device("meta"):
            return gpt.GPT(model_config)
    torch.manual_seed(seed)
    return gpt.build_model(model_config, device, compute_dtype=compute_dtype)


def scaling_params(model: gpt.GPT) -> int:
    """The parameter count the tokens:params ratio is measured against (matrices + head, as nanochat)."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan_for(cfg: TrainConfig, rt: Runtime, model: gpt.GPT, vocab_size: int, mon: Monitor) -> scaling.TrainingPlan:
    """The training plan that follows from the model's size and the options (printed)."""
    micro_tokens = cfg.device_batch_size * cfg.max_seq_len * rt.world_size
    reference = build_model(model_config_for(cfg, vocab_size, scaling.REF_DEPTH))
    plan = scaling.plan_training(
        scaling_params=scaling_params(model), ref_scaling_params=scaling_params(reference),
        flops_per_token=model.estimate_flops(), ratio=cfg.target_param_data_ratio,
        num_iterations_opt=cfg.num_iterations, target_flops=cfg.target_flops,
        total_batch_size_opt=cfg.total_batch_size, weight_decay=cfg.weight_decay, tokens_per_micro_step=micro_tokens)
    report_plan(mon, cfg, plan, micro_tokens)
    return plan


def describe_device(rt: Runtime, mon: Monitor) -> float | None:
    """Print the device line and return its peak BF16 FLOP/s (None on CPU/MPS or unknown GPUs)."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        peak = peak_flops(name)
        mon.print(f"GPU: {name} | Peak FLOPS (BF16): {peak:.2e}" if peak else
                  f"GPU: {name} | Peak FLOPS (BF16): unknown (MFU not shown)")
        return peak
    mon.print(f"Device: {rt.device_type} ({torch.get_num_threads()} threads) | MFU not shown off-GPU")
    return None


CPU_COMPILE_MIN_STEPS = 200
# torch 2.11 (the lent GPU's image) compiles a Float8Linear whose backward then gives zero gradients to every
# parameter before it (found by gpu-rehearsal in tests/ops/test_fp8.py test_custom_ops_opcheck_and_compile; the
# autograd.Function alone reproduces it, with backend="eager" too); 2.14.1 computes them exactly.
FP8_COMPILE_MIN_TORCH = (2, 14)


def torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def compile_decision(cfg: TrainConfig, device: torch.device, num_iterations: int) -> tuple[bool, str | None]:
    """Whether to torch.compile, and the line to print when --compile=auto turned itself off for a missing tool.

    Always worth it on CUDA, where inductor needs Triton and a C compiler (Triton builds its launchers with
    one). On CPU (d4, measured): 1.26x faster steps for ~20 s of compilation, so auto turns it on for runs of
    CPU_COMPILE_MIN_STEPS steps or more where a C++ compiler (which inductor needs there) is installed. Never
    on MPS. Never for FP8 on a torch older than FP8_COMPILE_MIN_TORCH (see there)."""
    if cfg.fp8 and torch_release() < FP8_COMPILE_MIN_TORCH and cfg.compile != "off":
        why = (f"torch {torch.__version__}'s torch.compile drops the gradients of the FP8 layers (measured on "
               f"torch 2.11; correct on 2.14.1, the project's pin)")
        if cfg.compile == "on":
            raise UserError(f"--fp8 with --compile=on: {why}; install torch==2.14.1 or pass --compile=off")
        return False, f"torch.compile: off (--compile=auto with --fp8: {why})"
    if cfg.compile != "auto":
        return cfg.compile == "on", None
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "torch.compile: off (--compile=auto: Triton is not installed, and inductor needs it on a GPU)"
        if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "cl")):
            return False, "torch.compile: off (--compile=auto: no C compiler found, and Triton needs one)"
        return True, None
    if device.type != "cpu" or num_iterations < CPU_COMPILE_MIN_STEPS:
        return False, None
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        return False, "torch.compile: off (--compile=auto: no C++ compiler found, and inductor needs one on CPU)"
    return True, None


def use_compile(cfg: TrainConfig, device: torch.device, num_iterations: int) -> bool:
    """Whether the run is torch.compile'd (see compile_decision)."""
    return compile_decision(cfg, device, num_iterations)[0]


def load_resume_checkpoint(cfg: TrainConfig, rt: Runtime, ckpt_dir: Path, step: int, meta: dict, model: gpt.GPT,
                           num_iterations: int, mon: Monitor) -> checkpoint.Checkpoint:
    """Check that the run may resume from checkpoint `step` (notes for allowed changes) and load its weights
    into `model`; the optimizer, loader and loop state are restored once they exist (restore_training_state).
    On another number of processes than the checkpoint's, every saved rank's loader and optimizer states are
    merged (each rank then takes its streams and its optimizer slice) and the RNG state of saved rank
    `rank % saved` continues."""
    saved_meta = checkpoint.read_meta(ckpt_dir, step)
    for note in check_resume_compatible(saved_meta, meta):
        mon.warn(f"resuming with a change: {note}")
    if saved_meta.get("weights_only"):
        return load_weights_only(cfg, rt, ckpt_dir, step, model, num_iterations, mon)
    saved_world = saved_meta["world_size"]
    resharding = saved_world != rt.world_size
    ckpt = checkpoint.load_checkpoint(ckpt_dir, step, rank=rt.rank, device=rt.device, load_optim=not resharding)
    if resharding:
        rank_states, optim_states = checkpoint.load_rank_files(ckpt_dir, step, device=rt.device)
        ckpt.optim_state = merge_optimizer_shards(optim_states)
        ckpt.rank_state = dict(rank_states[rt.rank % saved_world],
                               loader=merge_loader_states([s["loader"] for s in rank_states]))
        mon.print(f"Re-sharding the checkpoint of {saved_world} process(es) onto {rt.world_size}")
    model.load_state_dict(ckpt.model_state, strict=True)
    mon.print(f"Resuming from step {ckpt.step} ({ckpt.path})")
    return ckpt


def load_weights_only(cfg: TrainConfig, rt: Runtime, ckpt_dir: Path, step: int, model: gpt.GPT, num_iterations: int,
                      mon: Monitor) -> checkpoint.Checkpoint:
    """A weights-only checkpoint (`nanotrain-convert import-nanochat`) has no optimizer, data or loop state: the
    run starts a new schedule at step 0 from its weights. Its checkpoints go beside the imported one, so a horizon
    that reaches the imported step (whose folder a save there would replace) is refused."""
    if num_iterations >= step:
        raise UserError(f"--model-tag {cfg.tag} holds a weights-only checkpoint at step {step}, which this run would "
                        f"save over (its horizon is {num_iterations} steps); pass --num-iterations below {step}, or "
                        "import the model again under another --model-tag for this run")
    ckpt = checkpoint.load_checkpoint(ckpt_dir, step, rank=rt.rank, device=rt.device, load_optim=False,
                                      load_rank_state=False)
    model.load_state_dict(ckpt.model_state, strict=True)
    mon.print(f"Starting from the weights of {ckpt.path} (a weights-only checkpoint: the optimizer, the data stream "
              "and the LR schedule start fresh at step 0)")
    return ckpt


def restore_training_state(ckpt: checkpoint.Checkpoint, optimizer: torch.optim.Optimizer,
                           precision: Precision) -> tuple[LoopState, dict]:
    """Continue the optimizer moments, the gradient scaler, the RNG and the loop state of a checkpoint. Returns
    the loop state and the loader state (the position before the batch the next step trains on)."""
    # the moments resume; the settings (LRs, betas, eps, weight decay) are this run's options, which a resume
    # may change on purpose (torch's load_state_dict would put the checkpoint's settings back)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt.optim_state)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    precision.load_state_dict(ckpt.rank_state.get("precision"))
    checkpoint.restore_rng_state(ckpt.rank_state["rng"])
    return LoopState(**ckpt.meta["loop_state"]), ckpt.rank_state["loader"]


def make_loader(cfg: TrainConfig, rt: Runtime, tokenizer: Tokenizer, batch_size: int, split: str,
                state: dict | None = None) -> DataLoader:
    """This rank's loader of a split (train loops forever; val makes one pass)."""
    return DataLoader(tokenizer, batch_size, cfg.max_seq_len, split=split, device=rt.device, base_dir=cfg.base_dir,
                      rank=rt.rank, world_size=rt.world_size, state=state)


def core_bundle(cfg: TrainConfig, rt: Runtime) -> Path | None:
    """The CORE eval bundle when CORE is on (rank 0 downloads it first, the others then find it)."""
    if cfg.core_metric_every <= 0:
        return None
    if rt.master:
        ensure_eval_bundle(cfg.base_dir, bundle_dir=cfg.eval_bundle_dir)
    distributed.barrier()
    return ensure_eval_bundle(cfg.base_dir, bundle_dir=cfg.eval_bundle_dir)


def print_kernel_table(device: torch.device | None = None, check: bool = False) -> bool:
    """`nanotrain --kernels [--check]`: see registry.print_table (False when a self-check failed)."""
    return registry.print_table(device or torch.device(distributed.autodetect_device_type()), check=check)




# --------------------------------------------------------------------------------------------
# The first step: where memory peaks, settled before the loop


OPTIMIZER_OOM = ("out of memory allocating the optimizer state at the first step (its size does not depend on "
                 "--device-batch-size); use more GPUs (the state is sharded across ranks) or a smaller --depth")


def fit_first_step(run: Run) -> None:
    """Run the first step's forward/backward (the memory peak of training) before the loop. On out of memory,
    every rank together: with --oom-auto-batch lower the device batch and try again, otherwise stop naming a
    batch that fits. The loss and the gradients wait for take_step, which applies them after the first step's
    evaluations (evaluations leave gradients alone)."""
    if run.state.step >= run.last_step:
        return
    while True:
        synchronize(run.rt)
        t0 = time.time()
        try:
            loss, x, y = train_micro_steps(run.step_model, *run.batch, run.train_loader, run.grad_accum, run.precision)
        except torch.OutOfMemoryError:
            loss = None  # handled below: this block's traceback holds the failed step's activations
        out_of_memory = loss is None
        if run.rt.distributed:  # every rank lowers its batch together (one rank alone would hang the others)
            out_of_memory = distributed.any_rank(out_of_memory, run.rt.device)
        if not out_of_memory:
            synchronize(run.rt)
            run.pending, run.batch = (loss, time.time() - t0), (x, y)
            return
        lower_batch_after_oom(run)


def lower_batch_after_oom(run: Run) -> None:
    """Out of memory on the first step: with --oom-auto-batch lower the device batch to its largest divisor up to
    half, raising the accumulation so the total batch is unchanged; otherwise say which batch fits and stop. The
    step then trains on the rows of its first batch in smaller micro-batches, and the stream goes on right after them
    (nothing repeated or skipped, on a resume too). Called outside the `except` block, whose traceback holds the
    failed step's tensors."""
    cfg, rt = run.cfg, run.rt
    run.model.zero_grad(set_to_none=True)
    release_memory()
    size = run.device_batch_size
    smaller = [bs for bs in range(size // 2, 0, -1) if size % bs == 0]
    if not smaller:
        raise RunStopped("out of memory even at --device-batch-size=1; use a smaller --depth or --max-seq-len",
                         EXIT_OUT_OF_MEMORY)
    if not cfg.oom_auto_batch:
        fits = largest_fitting_batch(run.model, smaller, cfg.max_seq_len, rt, run.precision.autocast)
        hint = (f"--device-batch-size={fits} fits" if fits else "even --device-batch-size=1 does not fit")
        raise RunStopped(f"out of memory at --device-batch-size={size}: {hint} (the total batch is kept "
                         "by gradient accumulation); or pass --oom-auto-batch to lower it automatically",
                         EXIT_OUT_OF_MEMORY)
    new_bs, factor = smaller[0], size // smaller[0]
    run.mon.warn(f"out of memory at --device-batch-size={size}: lowering it to {new_bs} and raising gradient "
                 f"accumulation from {run.grad_accum} to {run.grad_accum * factor} (the total batch is unchanged)")
    # the global stream does not depend on the device batch: from the first batch's position, the new loader yields
    # the same rows new_bs at a time (nothing repeated or skipped, on a resume too)
    run.train_loader.close()
    run.train_loader = make_loader(cfg, rt, run.tokenizer, new_bs, "train", run.loader_start)
    run.batch = next(run.train_loader)
    run.device_batch_size, run.grad_accum = new_bs, run.grad_accum * factor


def largest_fitting_batch(model: gpt.GPT, candidates: list[int], seq_len: int, rt: Runtime,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> int | None:
    """The first (largest) of the candidate batch sizes for which one forward/backward fits in memory."""
    vocab = model.config.vocab_size
    for bs in candidates:
        try:
            x = torch.randint(0, vocab, (bs, seq_len), device=rt.device)
            with autocast():
                model(x, x).backward()
            model.zero_grad(set_to_none=True)
            return bs
        except torch.OutOfMemoryError:
            pass
        model.zero_grad(set_to_none=True)  # outside the except block, which holds the failed pass's tensors
        release_memory()
    return None


def release_memory() -> None:
    """Give freed device memory back after an out-of-memory error (a no-op without CUDA)."""
    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# One step


def train_micro_steps(model: torch.nn.Module, x: Tensor, y: Tensor, train_iter: Iterator[tuple[Tensor, Tensor]],
                      grad_accum: int, precision: Precision) -> tuple[Tensor, Tensor, Tensor]:
    """Forward/backward over grad_accum micro-batches (gradients summed, loss averaged).
    Returns the mean loss of the micro-batches (non-finite when any of them was: its gradients are in this
    step) and the next (x, y), fetched while the device works."""
    total = 0.0
    for _ in range(grad_accum):
        with precision.autocast():
            loss = model(x, y)
        precision.backward(loss / grad_accum)
        total = total + loss.detach()
        x, y = next(train_iter)
    return total / grad_accum, x, y


def lr_multiplier_at(step: int, num_iterations: int, cfg: TrainConfig) -> float:
    return lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)


def apply_schedules(optimizer: torch.optim.Optimizer, plan: scaling.TrainingPlan, step: int, cfg: TrainConfig) -> None:
    """Set this step's LR (all groups), Muon momentum and Muon weight decay."""
    lrm = lr_multiplier_at(step, plan.num_iterations, cfg)
    momentum = muon_momentum(step, plan.num_iterations, cfg.warmdown_ratio)
    wd = plan.weight_decay * weight_decay_multiplier(step, plan.num_iterations)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = wd


def record_step(run: Run, loss_f: float, dt: float, applied: bool) -> None:
    """Advance the loop state past a finished step; print its line and log its metrics row."""
    state, plan, step = run.state, run.plan, run.state.step
    state.step = step + 1
    beta = 0.9
    state.smooth_loss = beta * state.smooth_loss + (1 - beta) * loss_f
    smooth = state.smooth_loss / (1 - beta ** state.step)  # debiased EMA
    if step - run.first_step >= min(10, plan.num_iterations // 10):  # the first steps include compilation
        state.total_training_time += dt
        state.timed_steps += 1
    avg = state.total_training_time / state.timed_steps if state.timed_steps else None
    tok_per_sec = plan.total_batch_size / dt
    mfu_pct = mfu(plan.flops_per_token, tok_per_sec, run.peak_flops, run.rt.world_size)
    lrm = lr_multiplier_at(step, plan.num_iterations, run.cfg)
    scaler = run.precision.scaler
    skipped = run.precision.skipped_steps if scaler is not None else None
    run.mon.print(step_line(step, plan.num_iterations, smooth, lrm, dt, tok_per_sec, mfu_pct,
                            state.total_training_time, avg * (plan.num_iterations - state.step) if avg else None,
                            skipped=skipped))
    row = {"step": step, "total_training_flops": plan.flops_per_token * plan.total_batch_size * step,
           "total_training_time": state.total_training_time, "train/loss": smooth, "train/loss_raw": loss_f,
           "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu_pct,
           "train/cropped_fraction": run.train_loader.cropped_fraction}
    if scaler is not None:
        row.update({"train/skipped_steps": skipped, "train/step_skipped": not applied,
                    "train/loss_scale": scaler.get_scale()})
    run.mon.log(row)


# --------------------------------------------------------------------------------------------
# Evaluations: none of them can end the training


OUT_OF_MEMORY = "out of memory"


def evaluate(run: Run, name: str) -> None:
    """Run evaluation `name` at this step; on out of memory once more at half its batch. A failure prints one
    line naming the evaluation and the cause and logs {"step", "eval_error": {"name", "error"}}, and training
    goes on; a failed final evaluation makes the run exit non-zero at the end (see finish)."""
    error = _attempt(run, name, half=False)
    everywhere = name != "sample" and run.rt.distributed  # evaluations other than samples run on every rank
    retry = error == OUT_OF_MEMORY
    if everywhere:  # every rank retries, or none: the retry's collectives must meet
        retry = distributed.any_rank(retry, run.rt.device)
    if retry and name != "sample":  # samples decode one sequence at a time: nothing to halve
        release_memory()  # outside the except block, whose traceback held the failed pass's tensors
        run.mon.warn(f"out of memory in the {name} evaluation at step {run.state.step}: retrying at half its batch")
        error = _attempt(run, name, half=True)
        if error == OUT_OF_MEMORY:
            error = "out of memory, at its batch and at half of it"
    step = run.state.step
    if everywhere:  # all ranks ran it: all agree whether it failed
        if error is not None and not run.rt.master and not error.startswith("it failed on"):
            # the log and the warning lines are rank 0's: the rank where it failed says why, on its stderr
            print(f"WARNING: rank {run.rt.rank}: evaluation {name} failed at step {step}: {error}", file=sys.stderr,
                  flush=True)
        failed = distributed.any_rank(error is not None, run.rt.device)
        error = error or ("it failed on another rank (its warning line says why)" if failed else None)
    if error is None:
        return
    release_memory()
    after = "the final checkpoint is saved" if step == run.last_step else "training goes on"
    run.mon.warn(f"evaluation {name} failed at step {step}: {error}; {after}")
    run.mon.log({"step": step, "eval_error": {"name": name, "error": error}})
    if step == run.last_step:
        run.failed_final.append(name)


def _attempt(run: Run, name: str, half: bool) -> str | None:
    """One try of an evaluation: None when it worked, else what went wrong."""
    try:
        with evaluating(run):
            EVALUATORS[name](run, half)
    except torch.OutOfMemoryError:
        return OUT_OF_MEMORY
    except distributed.PeerFailed as e:  # its collective met a rank whose part failed: that rank says why
        return f"it {e} (their warning lines say why)"
    except Exception as e:  # any failure of an evaluation (a damaged file, a bug): reported, training goes on
        return f"{type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def evaluating(run: Run) -> Iterator[None]:
    """Evaluation mode, FP8 off and the run's autocast for a block; afterwards training mode and the random state
    of before (the checkpoint of a step precedes its evaluations, and a resumed run may skip or repeat them: the
    training stream must not depend on them)."""
    rng = checkpoint.capture_rng_state()
    run.model.eval()
    try:
        with disable_fp8(run.model), run.precision.autocast():
            yield
    finally:
        run.model.train()
        checkpoint.restore_rng_state(rng)


def measure_val_bpb(run: Run, half: bool) -> None:
    """Val bpb over --eval-tokens validation tokens (fewer when the validation split holds fewer: said so)."""
    cfg, rt, state = run.cfg, run.rt, run.state
    batch_size = max(1, cfg.device_batch_size // 2) if half else cfg.device_batch_size
    batch_tokens = batch_size * cfg.max_seq_len * rt.world_size
    steps = max(1, cfg.eval_tokens // batch_tokens)
    seen = torch.zeros((), dtype=torch.int64, device=rt.device)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        # a generator: the loader is made inside evaluate_bpb's pass, so that a failure to read the validation
        # split on one rank fails the evaluation on every rank instead of leaving the others in its collective
        nonlocal seen
        for x, y in itertools.islice(make_loader(cfg, rt, run.tokenizer, batch_size, "val"), steps):
            seen += y.numel()
            yield x, y

    bpb = evaluate_bpb(run.model, batches(), steps, run.token_bytes)
    tokens = int(distributed.all_reduce_sum(seen).item())
    state.val_bpb, state.val_bpb_step = bpb, state.step
    state.min_val_bpb = min(state.min_val_bpb, bpb)
    short = (f" (measured on {tokens:,} tokens: the validation split holds fewer than the {steps * batch_tokens:,} "
             "--eval-tokens asks for)" if tokens < steps * batch_tokens else "")
    run.mon.print(f"Step {state.step:05d} | Validation bpb: {bpb:.6f}{short}")
    run.mon.log({"step": state.step, "total_training_flops": flops_so_far(run),
                 "total_training_time": state.total_training_time, "val/bpb": bpb, "val/tokens": tokens})
    run.mon.plot()


def measure_core(run: Run, half: bool) -> None:
    """The CORE metric over --core-metric-max-per-task rows per task."""
    # half: half of evaluate_core's default rows and padded tokens per forward
    vocab = run.model.config.vocab_size
    smaller = {"batch_size": 32, "max_batch_tokens": max(1024, 2**27 // vocab) // 2} if half else {}
    results = evaluate_core(run.model, run.tokenizer, run.rt.device, bundle_dir=run.bundle_dir,
                            max_per_task=run.cfg.core_metric_max_per_task, **smaller)
    step = run.state.step
    run.mon.print(f"Step {step:05d} | CORE metric: {results['core_metric']:.4f}")
    run.mon.log({"step": step, "total_training_flops": flops_so_far(run),
                 "total_training_time": run.state.total_training_time, "core_metric": results["core_metric"]})


def print_samples(run: Run, half: bool) -> None:
    """Greedy completions of the sample prompts (rank 0 only)."""
    for text in sample_text(run.model, run.tokenizer, max_tokens=16):
        run.mon.print(f"  sample: {text!r}")


EVALUATORS: dict[str, Callable[[Run, bool], None]] = {"bpb": measure_val_bpb, "core": measure_core,
                                                      "sample": print_samples}


def flops_so_far(run: Run) -> float:
    return run.plan.flops_per_token * run.plan.total_batch_size * run.state.step


# --------------------------------------------------------------------------------------------
# Saving, stopping, finishing


def checkpoint_meta(run: Run) -> dict:
    """The run's meta at this step: the options as this run trains them (an out-of-memory first step may have
    lowered --device-batch-size; a resume must use that) and the loop state."""
    train_config = dict(run.meta["train_config"], device_batch_size=run.device_batch_size)
    return dict(run.meta, train_config=train_config, step=run.state.step, val_bpb=run.state.val_bpb,
                loop_state=asdict(run.state))


def save(run: Run) -> None:
    """Save the run. The loader has already produced the next step's batch, and its state is the position before
    that batch, so a resumed run trains on it first. A full disk stops the run (the store leaves the previous
    checkpoint and `latest` untouched); every rank stops together."""
    cfg, rt = run.cfg, run.rt
    rank_state = {"loader": run.train_loader.state_dict(), "rng": checkpoint.capture_rng_state(),
                  "precision": run.precision.state_dict()}
    failure: Exception | None = None
    try:
        path = checkpoint.save_checkpoint(
            run.ckpt_dir, run.state.step, run.model.state_dict() if rt.master else {}, run.optimizer.state_dict(),
            checkpoint_meta(run), rank_state=rank_state, rank=rt.rank, world_size=rt.world_size,
            keep_last=cfg.keep_last if cfg.keep_last > 0 else None)
    except (OSError, UserError, RuntimeError) as e:
        failure = e
    full = failure is not None and is_disk_full(failure)
    if rt.distributed:
        full = distributed.any_rank(full, rt.device)
    if full:
        raise RunStopped(disk_full_message(run), exit_code=EXIT_DISK_FULL) from None
    if failure is not None:
        raise failure
    run.mon.print(f"Saved checkpoint: {path}")


def is_disk_full(e: BaseException) -> bool:
    """Whether a save failed for lack of space (the store raises checkpoint.DiskFull for ENOSPC/EDQUOT)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, checkpoint.DiskFull)


def disk_full_message(run: Run) -> str:
    """One line: how much the checkpoint needs, where, what is kept, and what to do."""
    def nbytes(obj: object) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    need = nbytes(run.model.state_dict()) + nbytes(run.optimizer.state_dict()) * run.rt.world_size
    free = shutil.disk_usage(run.ckpt_dir if run.ckpt_dir.exists() else run.ckpt_dir.parent).free
    last = checkpoint.latest_step(run.ckpt_dir)
    kept = (f"the checkpoint of step {last} and `latest` are untouched: free space (or pass --keep-last N) and "
            f"resume with --resume-from-step={last}" if last is not None else "no earlier checkpoint exists: free "
            "space and start again")
    return (f"no space left on the device for the checkpoint of step {run.state.step}: it needs about "
            f"{need / 2**30:.2f} GiB in {run.ckpt_dir} ({free / 2**30:.2f} GiB free); {kept}")


def announce_stop(run: Run, stop: StopSignals) -> None:
    """The line after a stop request's save: which signal, and the command that resumes the run."""
    hint = resume_hint(replace(run.cfg, device_batch_size=run.device_batch_size))  # as the checkpoint has it
    run.mon.print(f"Stopped by {stop.requested or 'a signal on another rank'} at step {run.state.step}. "
                  f"Resume with: {launch_command(run.rt)} {hint} --resume-from-step=latest")


def finish(run: Run) -> None:
    """The run's closing lines and records; a failed final evaluation then stops the run non-zero, naming the
    command that measures it again from the saved final checkpoint."""
    mon, state = run.mon, run.state
    if run.rt.device_type == "cuda":
        mon.print(f"Peak memory: {torch.cuda.max_memory_allocated(run.rt.device) / 2**30:.2f} GiB")
    mon.print(f"Total training time: {state.total_training_time / 60:.2f}m")
    if state.min_val_bpb < float("inf"):
        mon.print(f"Minimum validation bpb: {state.min_val_bpb:.4f}")
    if run.precision.scaler is not None:
        mon.print(f"Steps skipped by the fp16 gradient scaler (overflow): {run.precision.skipped_steps} | final "
                  f"loss scale {run.precision.scaler.get_scale():g}")
    mon.plot()
    mon.finish()
    if run.failed_final:
        names = ", ".join(run.failed_final)
        raise RunStopped(f"the final evaluation ({names}) failed; the checkpoint of step {state.step} is saved: "
                         f"measure it with: {eval_command(run)}", exit_code=EXIT_EVAL_FAILED)


def eval_command(run: Run) -> str:
    """The nanotrain-eval command that runs the failed final evaluations on the saved checkpoint."""
    cfg, rt = run.cfg, run.rt
    launch = (f"torchrun --nproc_per_node={rt.world_size} -m nanotrain.eval.cli" if rt.distributed
              else "nanotrain-eval")
    parts = [launch, f"--model-tag={shlex.quote(cfg.tag)}", f"--step={run.state.step}",
             f"--eval={','.join(run.failed_final)}", f"--device-type={rt.device_type}"]
    if cfg.base_dir is not None:
        parts.append(f"--base-dir={shlex.quote(str(cfg.base_dir))}")
    if "bpb" in run.failed_final:
        parts += [f"--eval-tokens={cfg.eval_tokens}", f"--device-batch-size={cfg.device_batch_size}"]
    if "core" in run.failed_final:
        parts.append(f"--max-per-task={cfg.core_metric_max_per_task}")
        if cfg.eval_bundle_dir:
            parts.append(f"--bundle-dir={shlex.quote(str(cfg.eval_bundle_dir))}")
    return " ".join(parts)


class StopSignals:
    """SIGTERM/SIGINT: finish the current step, save, exit with a resume hint. A second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def agreed(self, rt: Runtime) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        return distributed.any_rank(self.requested is not None, rt.device)



def run_meta(cfg, rt, model_config, tokenizer, data_fp: str, plan) -> dict:
    """What a checkpoint records about the run (for resume checks and for evaluation)."""
    return {"model_config": asdict(model_config), "train_config": cfg.to_dict(), "world_size": rt.world_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "data_fingerprint": data_fp,
            "plan": asdict(plan), "optim_sharded": rt.distributed, "data_streams": DEFAULT_TRAIN_STREAMS}


def check_fresh_start(ckpt_dir, cfg: TrainConfig) -> None:
    """A fresh run must not overwrite or prune another run's checkpoints: refuse unless --overwrite."""
    steps = checkpoint.list_steps(ckpt_dir)
    if steps and not cfg.overwrite:
        raise UserError(f"--model-tag {cfg.tag} already has checkpoints (steps {', '.join(map(str, steps))}) in "
                        f"{ckpt_dir}; resume with --resume-from-step=latest, choose another --model-tag, or pass "
                        "--overwrite to start over (the old folder is kept under a new name)")


def move_aside(ckpt_dir, rt: Runtime, mon: Monitor) -> None:
    """--overwrite: rename the tag's folder to <tag>.replaced-<time> (nothing is deleted)."""
    if rt.master and checkpoint.list_steps(ckpt_dir):
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        mon.warn(f"--overwrite: moved the earlier checkpoints of {ckpt_dir.name} to {aside}")
    distributed.barrier()


def diverged_message(ckpt_dir, step: int, loss: float) -> str:
    last = checkpoint.latest_step(ckpt_dir)
    kept = (f"the last good checkpoint (step {last}) is kept; resume with --resume-from-step={last} and a "
            "lower LR" if last is not None else "no checkpoint was saved yet (use --save-every to keep some)")
    return f"training loss became {loss} at step {step}; stopped without saving it: {kept}"


def resume_hint(cfg: TrainConfig) -> str:
    """The options of this run, for the resume command we print (quoted for a shell)."""
    defaults = TrainConfig.__dataclass_fields__
    parts = []
    for name, f in defaults.items():
        value = getattr(cfg, name)
        if name in ("resume_from_step", "overwrite") or value == f.default:
            continue
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag}={shlex.quote(str(value))}")
    return " ".join(parts)


def launch_command(rt: Runtime) -> str:
    """How this run was launched, for the resume command: a resume needs the same number of processes."""
    if not rt.distributed:
        return "nanotrain"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    nodes = rt.world_size // per_node
    if nodes == 1:
        return f"torchrun --nproc_per_node={per_node} -m nanotrain"
    return f"torchrun --nnodes={nodes} --nproc_per_node={per_node} <this run's rendezvous options> -m nanotrain"


def synchronize(rt: Runtime) -> None:
    if rt.device_type == "cuda":
        torch.cuda.synchronize(rt.device)


def report_plan(mon: Monitor, cfg: TrainConfig, plan: scaling.TrainingPlan, micro_tokens: int) -> None:
    if plan.batch_size_source == "auto":
        mon.print(f"Auto-computed total batch size: {plan.total_batch_size:,} tokens")
    mon.print(f"Tokens per micro-step: {micro_tokens:,} | gradient accumulation steps: {plan.grad_accum_steps}")
    mon.print(f"Iterations: {plan.num_iterations:,} (from {plan.horizon_source})")
    mon.print(f"Total training tokens: {plan.total_tokens:,} | tokens:params ratio {plan.tokens_per_param:.2f} | "
              f"training FLOPs {plan.total_flops:.3e}")
    if plan.lr_scale != 1.0:
        mon.print(f"Scaling LRs by {plan.lr_scale:.4f} for batch {plan.total_batch_size:,} (reference "
                  f"{scaling.B_REF:,})")
    if plan.weight_decay != cfg.weight_decay:
        mon.print(f"Scaling weight decay from {cfg.weight_decay:.6f} to {plan.weight_decay:.6f} for depth {cfg.depth}")


def report_kernels(mon: Monitor, rt: Runtime, model_config, fp8: bool, dtype: torch.dtype) -> None:
    """Which backend serves each op this run uses (in the run's compute `dtype`), why, and what a slow fallback
    costs."""
    head_dim = model_config.n_embd // model_config.n_head
    used = ["attention", "attention_decode", "muon_update", "packing"] + (["fp8_matmul", "fp8_quantize"] if fp8 else [])
    # the case of the full-window layers, as ops.attention.case_props names it
    case = {"head_dim": head_dim, "window": "full", "gqa": model_config.n_kv_head != model_config.n_head}
    for line in registry.report(rt.device, dtype, {"attention": case, "attention_decode": case}, only=used):
        mon.print(line)
    attention = registry.resolve("attention", rt.device, dtype, **case)
    if rt.device_type == "cuda" and attention.name in ("sdpa", "reference") and "S" in model_config.window_pattern:
        mon.warn(f"attention runs on '{attention.name}', which computes every key of a sliding window "
                 f"(pattern {model_config.window_pattern}): expect low GPU utilization; --window-pattern L avoids it")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.kernels == "list":
            return 0 if print_kernel_table(check=cfg.check) else 1
        registry.set_overrides(cfg.kernels)
        train(cfg)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: exiting at once without saving", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
