"""`nanotrain`: pretrain a GPT base model whose size, batch, learning rates and horizon follow from --depth.

The story of a run, top to bottom: parse and validate the options; set up the device (and the
process group under torchrun); load the tokenizer; build the model and work out the training plan
from the scaling rules; resume if asked; convert to FP8 if asked; build the optimizer and the data
loaders; then loop: evaluate, sample, save, and take one optimizer step, until the horizon, a
signal, or a diverged loss ends the run. The math lives in scaling.py, model.py and optim.py.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from nanotrain import __version__, distributed, scaling
from nanotrain.config import TrainConfig, parse_args
from nanotrain.distributed import Runtime
from nanotrain.errors import UserError
from nanotrain.monitor import Monitor, mfu, peak_flops, step_line
from nanotrain.ops import registry


class RunStopped(Exception):
    """The run ended early on purpose (diverged loss, out of memory); the message says what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LoopState:
    """Everything besides model/optimizer/loader that a resumed run must continue from."""
    step: int = 0
    smooth_loss: float = 0.0
    val_bpb: float | None = None
    val_bpb_step: int = -1  # the step val_bpb was measured at (a resume does not measure it again)
    min_val_bpb: float = float("inf")
    total_training_time: float = 0.0
    timed_steps: int = 0


# --------------------------------------------------------------------------------------------
# Building blocks


def model_config_for(cfg: TrainConfig, vocab_size: int, depth: int | None = None):
    """The GPTConfig for a depth (default: --depth) under the run's shape options."""
    from nanotrain.model import GPTConfig

    depth = cfg.depth if depth is None else depth
    model_dim, num_heads = scaling.model_shape(depth, cfg.aspect_ratio, cfg.head_dim)
    return GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=cfg.window_pattern.upper())


def build_model(model_config, device: torch.device | None = None, seed: int = 42):
    """The model, initialized on `device` with `seed`; device=None builds it on the meta device (shapes only)."""
    from nanotrain import model as gpt

    if device is None:
        with torch.device("meta"):
            return gpt.GPT(model_config)
    torch.manual_seed(seed)
    return gpt.build_model(model_config, device)


def scaling_params(model) -> int:
    """The parameter count the tokens:params ratio is measured against (matrices + head, as nanochat)."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (sm80+); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return lambda: torch.amp.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


CPU_COMPILE_MIN_STEPS = 200


def use_compile(cfg: TrainConfig, device: torch.device, num_iterations: int) -> bool:
    """torch.compile: always worth it on CUDA. On CPU (d4, measured): 1.26x faster steps for ~20 s of
    compilation, so auto turns it on for runs of CPU_COMPILE_MIN_STEPS steps or more, where a C++ compiler
    (which inductor needs) is installed. Never on MPS."""
    import shutil

    if cfg.compile != "auto":
        return cfg.compile == "on"
    if device.type == "cuda":
        return True
    has_compiler = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    return device.type == "cpu" and num_iterations >= CPU_COMPILE_MIN_STEPS and has_compiler


def print_kernel_table(device: torch.device | None = None) -> None:
    from nanotrain.ops._ext import extension_status

    device = device or torch.device(distributed.autodetect_device_type())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"extension nanotrain._C: {extension_status()}")
    print(f"backends on {device} ({dtype}):")
    for line in registry.report(device, dtype):
        print("  " + line)


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


# --------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> LoopState:
    rt = distributed.setup(cfg.device_type)
    from nanotrain import checkpoint
    from nanotrain.paths import checkpoint_dir

    ckpt_dir = checkpoint_dir(cfg.tag, cfg.base_dir)
    resuming = cfg.resume_from_step != -1
    resume_step = checkpoint.resolve_step(ckpt_dir, cfg.resume_from_step) if resuming else None
    if not resuming:
        check_fresh_start(ckpt_dir, cfg)
    mon = Monitor(master=rt.master, run=cfg.run, out_dir=ckpt_dir, config=cfg.to_dict())  # prints; files at start()
    mon.print(f"nanotrain {__version__} | torch {torch.__version__} | {rt.world_size} rank(s)")
    peak = describe_device(rt, mon)
    if cfg.fp8:
        from nanotrain.ops.fp8 import check_fp8_supported
        check_fp8_supported(rt.device)

    # Tokenizer and data (fail here, before any work, when they are missing)
    from nanotrain.data.loader import DataLoader
    from nanotrain.data.shards import data_fingerprint
    from nanotrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.base_dir)
    token_bytes = tokenizer.token_bytes(device=rt.device)
    mon.print(f"Vocab size: {tokenizer.vocab_size:,}")

    # Model, then the plan that follows from its size
    model_config = model_config_for(cfg, tokenizer.vocab_size)
    mon.print(f"Model config: {asdict(model_config)}")
    model = build_model(model_config, rt.device, cfg.seed)
    counts = model.num_scaling_params()
    mon.print("Parameter counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    flops_per_token = model.estimate_flops()
    mon.print(f"FLOPs per token (fwd+bwd): {flops_per_token:.3e}")
    micro_tokens = cfg.device_batch_size * cfg.max_seq_len * rt.world_size
    plan = scaling.plan_training(
        scaling_params=scaling_params(model),
        ref_scaling_params=scaling_params(build_model(model_config_for(cfg, tokenizer.vocab_size, scaling.REF_DEPTH))),
        flops_per_token=flops_per_token, ratio=cfg.target_param_data_ratio, num_iterations_opt=cfg.num_iterations,
        target_flops=cfg.target_flops, total_batch_size_opt=cfg.total_batch_size, weight_decay=cfg.weight_decay,
        tokens_per_micro_step=micro_tokens)
    report_plan(mon, cfg, plan, micro_tokens)

    # Resume: weights now; optimizer, loader and loop state below
    meta = run_meta(cfg, rt, model_config, tokenizer, data_fingerprint(cfg.base_dir), plan)
    ckpt = None
    if resuming:
        saved_meta = checkpoint.read_meta(ckpt_dir, resume_step)
        # the world size may change (the optimizer and the data stream re-shard): check_same_world_size rules on it
        for note in checkpoint.check_resume_compatible(saved_meta, dict(meta, world_size=None)):
            mon.warn(f"resuming with a change: {note}")
        saved_world = saved_meta.get("world_size", 1)
        ckpt = checkpoint.load_checkpoint(ckpt_dir, resume_step, rank=rt.rank, device=rt.device,
                                          load_optim=saved_world == rt.world_size)
        if saved_world != rt.world_size:  # every saved rank's states, merged; each rank takes its part below
            from nanotrain.data.loader import merge_loader_states
            from nanotrain.optim import merge_optimizer_shards
            rank_states, optim_states = checkpoint.load_rank_files(ckpt_dir, resume_step, device=rt.device)
            merged_loader = merge_loader_states([s["loader"] for s in rank_states])
            check_same_world_size(saved_meta, rt, merged_loader["num_streams"])
            ckpt.optim_state = merge_optimizer_shards(optim_states)
            ckpt.rank_state = dict(rank_states[rt.rank % saved_world], loader=merged_loader)
            del rank_states, optim_states
            mon.print(f"Re-sharding the checkpoint of {saved_world} process(es) onto {rt.world_size}")
        model.load_state_dict(ckpt.model_state, strict=True)
        mon.print(f"Resuming from step {ckpt.step} ({ckpt.path})")

    if cfg.fp8:
        from nanotrain.ops.fp8 import Float8Config, convert_to_float8
        converted, total = convert_to_float8(model, Float8Config.from_recipe(cfg.fp8_recipe))
        mon.print(f"✓ FP8 ({cfg.fp8_recipe} scaling): converted {converted} of {total} linear layers")

    report_kernels(mon, rt, model_config, cfg.fp8)
    orig_model = model
    if use_compile(cfg, rt.device, plan.num_iterations):
        model = torch.compile(model, dynamic=False)
        mon.print("torch.compile: on")

    from nanotrain.optim import build_optimizer
    optimizer = build_optimizer(
        orig_model, embedding_lr=cfg.embedding_lr * plan.lr_scale, unembedding_lr=cfg.unembedding_lr * plan.lr_scale,
        matrix_lr=cfg.matrix_lr * plan.lr_scale, scalar_lr=cfg.scalar_lr * plan.lr_scale,
        weight_decay=plan.weight_decay, adam_betas=(cfg.adam_beta1, cfg.adam_beta2), sharded=rt.distributed)
    state = LoopState()
    loader_state = batch = None
    if ckpt is not None:
        # the moments resume; the settings (LRs, betas, eps, weight decay) are this run's options, which a resume
        # may change on purpose (torch's load_state_dict would put the checkpoint's settings back)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt.optim_state)
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)
        state = LoopState(**ckpt.meta["loop_state"])
        loader_state = ckpt.rank_state["loader"]  # the position before the next step's batch: drawn again below
        checkpoint.restore_rng_state(ckpt.rank_state["rng"])
        del ckpt

    def make_train_loader(batch_size: int, state_dict=None) -> DataLoader:
        return DataLoader(tokenizer, batch_size, cfg.max_seq_len, split="train", device=rt.device,
                          base_dir=cfg.base_dir, rank=rt.rank, world_size=rt.world_size, state=state_dict)

    def make_val_loader() -> DataLoader:
        return DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split="val", device=rt.device,
                          base_dir=cfg.base_dir, rank=rt.rank, world_size=rt.world_size)

    train_loader = make_train_loader(cfg.device_batch_size, loader_state)
    bundle_dir = None
    if cfg.core_metric_every > 0:
        from nanotrain.eval.core import ensure_eval_bundle
        bundle_dir = ensure_eval_bundle(cfg.base_dir, bundle_dir=cfg.eval_bundle_dir) if rt.master else None
        distributed.barrier()
        bundle_dir = ensure_eval_bundle(cfg.base_dir, bundle_dir=cfg.eval_bundle_dir)

    if not resuming and cfg.overwrite:
        move_aside(ckpt_dir, rt, mon)
    mon.start(resume_step, saved_meta.get("wandb_run_id") if resuming else None)  # the up-front checks passed
    meta["wandb_run_id"] = mon.wandb_id
    autocast = autocast_for(rt.device)
    eval_context = fp8_off(orig_model)
    num_iterations = plan.num_iterations
    grad_accum = plan.grad_accum_steps
    device_batch_size = cfg.device_batch_size
    first_step = state.step
    skip_timing = min(10, num_iterations // 10)  # the first steps include compilation and warm-up
    train_iter = iter(train_loader)
    # the batch the next step trains on: drawn now, or the one a checkpoint held back for exactly this step
    x, y = next(train_iter) if batch is None else (batch["x"].to(rt.device), batch["y"].to(rt.device))
    start_state = train_loader.state_dict()  # the stream before (x, y): an out-of-memory restart redraws it

    with StopSignals() as stop:
        while True:
            step = state.step
            last_step = step == num_iterations
            flops_so_far = plan.flops_per_token * plan.total_batch_size * step

            # a stop request saves before any evaluation: a preempted machine gives seconds, evaluations can take
            # minutes (the resumed run measures this step's val bpb)
            stopping = step > first_step and stop.agreed(rt)
            if (cfg.eval_every > 0 and not stopping and step != state.val_bpb_step
                    and (last_step or step % cfg.eval_every == 0)):
                evaluate_val_bpb(cfg, rt, orig_model, make_val_loader, token_bytes, state, mon, autocast,
                                 eval_context, flops_so_far)
                mon.plot()
            if bundle_dir is not None and not stopping and (last_step or (step > first_step and
                                                                          step % cfg.core_metric_every == 0)):
                evaluate_core_metric(cfg, rt, orig_model, tokenizer, bundle_dir, state, mon, autocast,
                                     eval_context, flops_so_far)
            if cfg.sample_every > 0 and rt.master and not stopping and (last_step or (step > first_step and
                                                                                      step % cfg.sample_every == 0)):
                print_samples(orig_model, tokenizer, mon, autocast, eval_context)

            periodic = cfg.save_every > 0 and step > first_step and step % cfg.save_every == 0
            if last_step or periodic or stopping:
                path = save(ckpt_dir, cfg, rt, orig_model, optimizer, train_loader, (x, y), state, meta)
                mon.print(f"Saved checkpoint: {path}")
            if stopping:
                hint = resume_hint(replace(cfg, device_batch_size=device_batch_size))  # as the checkpoint has it
                mon.print(f"Stopped by {stop.requested or 'a signal on another rank'} at step {step}. "
                          f"Resume with: {launch_command(rt)} {hint} --resume-from-step=latest")
                break
            if last_step:
                break

            # One optimizer step: grad_accum micro-steps of forward/backward, then the update
            synchronize(rt)
            t0 = time.time()
            try:
                loss, x, y = train_micro_steps(model, x, y, train_iter, grad_accum, autocast)
            except torch.OutOfMemoryError:
                if step != first_step:
                    raise
                loss = None  # handled below: this block's traceback holds the failed step's activations
            if step == first_step and rt.distributed and distributed.any_rank(loss is None, rt.device):
                loss = None  # every rank lowers its batch together (one rank alone would hang the others)
            if loss is None:
                device_batch_size, grad_accum, train_loader, train_iter, x, y = handle_first_step_oom(
                    cfg, rt, orig_model, device_batch_size, grad_accum, x, y, make_train_loader, start_state, mon)
                meta["train_config"]["device_batch_size"] = device_batch_size  # a resume must use it too
                continue
            apply_schedules(optimizer, plan, step, cfg)
            try:
                optimizer.step()
            except torch.OutOfMemoryError:
                if step != first_step:
                    raise
                raise RunStopped(OPTIMIZER_OOM, exit_code=4) from None
            orig_model.zero_grad(set_to_none=True)
            loss_f = distributed.all_reduce_sum(loss).item() / rt.world_size  # every rank sees a NaN on any rank
            synchronize(rt)
            dt = time.time() - t0

            if not math.isfinite(loss_f):
                raise RunStopped(diverged_message(ckpt_dir, step, loss_f), exit_code=3)
            state.step = step + 1
            beta = 0.9
            state.smooth_loss = beta * state.smooth_loss + (1 - beta) * loss_f
            smooth = state.smooth_loss / (1 - beta ** state.step)  # debiased EMA
            if step - first_step >= skip_timing:
                state.total_training_time += dt
                state.timed_steps += 1
            avg = state.total_training_time / state.timed_steps if state.timed_steps else None
            tok_per_sec = plan.total_batch_size / dt
            mfu_pct = mfu(plan.flops_per_token, tok_per_sec, peak, rt.world_size)
            lrm = lr_multiplier_at(step, num_iterations, cfg)
            mon.print(step_line(step, num_iterations, smooth, lrm, dt, tok_per_sec, mfu_pct,
                                state.total_training_time, avg * (num_iterations - state.step) if avg else None))
            mon.log({"step": step, "total_training_flops": flops_so_far, "total_training_time":
                     state.total_training_time, "train/loss": smooth, "train/loss_raw": loss_f, "train/lrm": lrm,
                     "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu_pct,
                     "train/cropped_fraction": train_loader.cropped_fraction})
            if step == first_step:  # setup garbage is done: keep the collector from stalling steps
                gc.collect()
                gc.freeze()

    if rt.device_type == "cuda":
        mon.print(f"Peak memory: {torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB")
    mon.print(f"Total training time: {state.total_training_time / 60:.2f}m")
    if state.min_val_bpb < float("inf"):
        mon.print(f"Minimum validation bpb: {state.min_val_bpb:.4f}")
    mon.plot()
    mon.finish()
    return state


# --------------------------------------------------------------------------------------------
# Pieces of the loop


def train_micro_steps(model, x, y, train_iter, grad_accum: int, autocast):
    """Forward/backward over grad_accum micro-batches (gradients summed, loss averaged).
    Returns the mean loss of the micro-batches (non-finite when any of them was: its gradients are in this
    step) and the next (x, y), fetched while the device works."""
    total = 0.0
    for _ in range(grad_accum):
        with autocast():
            loss = model(x, y)
        (loss / grad_accum).backward()
        total = total + loss.detach()
        x, y = next(train_iter)
    return total / grad_accum, x, y


def lr_multiplier_at(step: int, num_iterations: int, cfg: TrainConfig) -> float:
    from nanotrain.optim import lr_multiplier
    return lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)


def apply_schedules(optimizer, plan: scaling.TrainingPlan, step: int, cfg: TrainConfig) -> None:
    """Set this step's LR (all groups), Muon momentum and Muon weight decay."""
    from nanotrain.optim import muon_momentum, weight_decay_multiplier

    lrm = lr_multiplier_at(step, plan.num_iterations, cfg)
    momentum = muon_momentum(step, plan.num_iterations, cfg.warmdown_ratio)
    wd = plan.weight_decay * weight_decay_multiplier(step, plan.num_iterations)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = wd


def fp8_off(model):
    """The context that turns FP8 off for evaluation and sampling (a no-op without FP8)."""
    from nanotrain.ops.fp8 import disable_fp8

    return lambda: disable_fp8(model)


@contextlib.contextmanager
def evaluating(model, eval_context, autocast):
    """Evaluation mode, FP8 off and the run's autocast for a block; training mode again after it."""
    model.eval()
    try:
        with eval_context(), autocast():
            yield
    finally:
        model.train()


def evaluate_val_bpb(cfg, rt, model, make_val_loader, token_bytes, state, mon, autocast, eval_context,
                     flops_so_far) -> None:
    from nanotrain.eval.bpb import evaluate_bpb

    steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * rt.world_size))
    with evaluating(model, eval_context, autocast):
        bpb = evaluate_bpb(model, itertools.islice(iter(make_val_loader()), steps), steps, token_bytes)
    state.val_bpb, state.val_bpb_step = bpb, state.step
    state.min_val_bpb = min(state.min_val_bpb, bpb)
    mon.print(f"Step {state.step:05d} | Validation bpb: {bpb:.6f}")
    mon.log({"step": state.step, "total_training_flops": flops_so_far,
             "total_training_time": state.total_training_time, "val/bpb": bpb})


def evaluate_core_metric(cfg, rt, model, tokenizer, bundle_dir, state, mon, autocast, eval_context,
                         flops_so_far) -> None:
    from nanotrain.eval.core import evaluate_core

    with evaluating(model, eval_context, autocast):
        results = evaluate_core(model, tokenizer, rt.device, bundle_dir=bundle_dir,
                                max_per_task=cfg.core_metric_max_per_task)
    mon.print(f"Step {state.step:05d} | CORE metric: {results['core_metric']:.4f}")
    mon.log({"step": state.step, "total_training_flops": flops_so_far,
             "total_training_time": state.total_training_time, "core_metric": results["core_metric"]})


def print_samples(model, tokenizer, mon, autocast, eval_context) -> None:
    from nanotrain.eval.engine import sample_text

    with evaluating(model, eval_context, autocast):
        for text in sample_text(model, tokenizer, max_tokens=16):
            mon.print(f"  sample: {text!r}")


def run_meta(cfg, rt, model_config, tokenizer, data_fp: str, plan) -> dict:
    """What a checkpoint records about the run (for resume checks and for evaluation)."""
    return {"model_config": asdict(model_config), "train_config": cfg.to_dict(), "world_size": rt.world_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "data_fingerprint": data_fp,
            "plan": asdict(plan), "optim_sharded": rt.distributed}


def check_same_world_size(saved_meta: dict, rt: Runtime, num_streams: int) -> None:
    """A resume may use another number of processes when it divides the run's `num_streams` virtual data streams
    (the global data stream and the optimizer state re-shard exactly); refuse any other count."""
    from nanotrain.data.loader import valid_world_sizes

    saved = saved_meta.get("world_size", 1)
    if saved != rt.world_size and num_streams % rt.world_size:
        raise UserError(f"cannot resume: the checkpoint's data stream is cut into {num_streams} streams, which "
                        f"{rt.world_size} processes cannot share evenly; relaunch with one of "
                        f"{', '.join(map(str, valid_world_sizes(num_streams)))} processes")


def save(ckpt_dir, cfg, rt, model, optimizer, train_loader, batch, state: LoopState, meta: dict):
    """Save the run. The loader has already produced `batch` (the next step's inputs), so the batch is saved
    beside the loader's state: a resumed run trains on it first, then continues the stream exactly."""
    from nanotrain import checkpoint

    full_meta = dict(meta, step=state.step, val_bpb=state.val_bpb, loop_state=asdict(state))
    rank_state = {"loader": train_loader.state_dict(), "rng": checkpoint.capture_rng_state(),
                  "batch": {"x": batch[0].cpu(), "y": batch[1].cpu()}}
    return checkpoint.save_checkpoint(
        ckpt_dir, state.step, model.state_dict() if rt.master else {}, optimizer.state_dict(), full_meta,
        rank_state=rank_state, rank=rt.rank, world_size=rt.world_size,
        keep_last=cfg.keep_last if cfg.keep_last > 0 else None)


def check_fresh_start(ckpt_dir, cfg: TrainConfig) -> None:
    """A fresh run must not overwrite or prune another run's checkpoints: refuse unless --overwrite."""
    from nanotrain.checkpoint import list_steps

    steps = list_steps(ckpt_dir)
    if steps and not cfg.overwrite:
        raise UserError(f"--model-tag {cfg.tag} already has checkpoints (steps {', '.join(map(str, steps))}) in "
                        f"{ckpt_dir}; resume with --resume-from-step=latest, choose another --model-tag, or pass "
                        "--overwrite to start over (the old folder is kept under a new name)")


def move_aside(ckpt_dir, rt: Runtime, mon: Monitor) -> None:
    """--overwrite: rename the tag's folder to <tag>.replaced-<time> (nothing is deleted)."""
    from nanotrain.checkpoint import list_steps

    if rt.master and list_steps(ckpt_dir):
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        mon.warn(f"--overwrite: moved the earlier checkpoints of {ckpt_dir.name} to {aside}")
    distributed.barrier()


def diverged_message(ckpt_dir, step: int, loss: float) -> str:
    from nanotrain.checkpoint import latest_step

    last = latest_step(ckpt_dir)
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


OPTIMIZER_OOM = ("out of memory allocating the optimizer state at the first step (its size does not depend on "
                 "--device-batch-size); use more GPUs (the state is sharded across ranks) or a smaller --depth")


def handle_first_step_oom(cfg, rt, model, device_batch_size, grad_accum, x, y, make_train_loader, start_state, mon):
    """Out of memory on the first step: with --oom-auto-batch lower the device batch to its largest divisor up to
    half (raising the accumulation so the total batch is unchanged) and go on; otherwise say which batch fits and
    stop. (x, y) is the step's first batch and start_state the loader's state just before it: the step trains on
    that batch cut into smaller micro-batches (the loader redraws its rows new_bs at a time), then the stream goes
    on (nothing repeated or skipped, on a resume too). Call it outside the `except` block, whose traceback holds
    the failed step's tensors."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    smaller = [bs for bs in range(device_batch_size // 2, 0, -1) if device_batch_size % bs == 0]
    if not smaller:
        raise RunStopped("out of memory even at --device-batch-size=1; use a smaller --depth or --max-seq-len", 4)
    if not cfg.oom_auto_batch:
        fits = largest_fitting_batch(model, smaller, cfg.max_seq_len, rt, autocast_for(rt.device))
        hint = (f"--device-batch-size={fits} fits" if fits else "even --device-batch-size=1 does not fit")
        raise RunStopped(f"out of memory at --device-batch-size={device_batch_size}: {hint} (the total batch is kept "
                         "by gradient accumulation); or pass --oom-auto-batch to lower it automatically", 4)
    new_bs = smaller[0]
    factor = device_batch_size // new_bs
    mon.warn(f"out of memory at --device-batch-size={device_batch_size}: lowering it to {new_bs} and raising "
             f"gradient accumulation from {grad_accum} to {grad_accum * factor} (the total batch is unchanged)")
    loader = make_train_loader(new_bs, start_state)  # the position before (x, y): x's rows come again, new_bs a time
    it = iter(loader)
    x, y = next(it)
    return new_bs, grad_accum * factor, loader, it, x, y


def largest_fitting_batch(model, candidates: list[int], seq_len: int, rt: Runtime, autocast) -> int | None:
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
        gc.collect()
        torch.cuda.empty_cache()
    return None


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


def report_kernels(mon: Monitor, rt: Runtime, model_config, fp8: bool) -> None:
    """Which backend serves each op this run uses, why, and what a slow fallback costs."""
    dtype = torch.bfloat16 if rt.device_type == "cuda" else torch.float32
    head_dim = model_config.n_embd // model_config.n_head
    used = ["attention", "attention_decode", "muon_update", "packing"] + (["fp8_matmul", "fp8_quantize"] if fp8 else [])
    for line in registry.report(rt.device, dtype, {"attention": {"head_dim": head_dim},
                                                   "attention_decode": {"head_dim": head_dim}}, only=used):
        mon.print(line)
    attention = registry.select("attention", rt.device, dtype, head_dim=head_dim)
    if rt.device_type == "cuda" and attention.name in ("sdpa", "reference") and "S" in model_config.window_pattern:
        mon.warn(f"attention runs on '{attention.name}', which computes every key of a sliding window "
                 f"(pattern {model_config.window_pattern}): expect low GPU utilization; --window-pattern L avoids it")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.kernels == "list":
            print_kernel_table()
            return 0
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
