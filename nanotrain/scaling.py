"""Depth -> everything: model shape, training horizon, batch size, LR and weight-decay scaling.

Pure functions, no torch: each rule is one small function with the reason beside it. The trainer
combines them in `plan_training`. The reference point is the d12 model (where nanochat tuned its
hyperparameters) trained for the same tokens:params ratio with a 2^19-token batch; other depths are
extrapolated from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

B_REF = 2**19  # optimal total batch (tokens) of the d12 reference model, measured by nanochat
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines (arXiv:2505.13738): B_opt grows as D^0.383


def model_shape(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(model_dim, num_heads): depth x aspect_ratio rounded UP to a multiple of head_dim, so that
    the head dimension is exactly head_dim (kernels want it a multiple of 8 and a power of two)."""
    base = depth * aspect_ratio
    model_dim = -(-base // head_dim) * head_dim
    return model_dim, model_dim // head_dim


def window_sizes(pattern: str, n_layer: int, seq_len: int) -> list[int | None]:
    """Per-layer attention window (keys a query sees, itself included; None = full context).

    The pattern is tiled over the layers; S is a short window that looks back half the context
    (seq_len // 2 keys before the query, plus the query itself: nanochat's (seq_len // 2, 0) window),
    L is full context, and the last layer is always L (the model must see the whole context at the end).
    """
    pattern = pattern.upper()
    short = seq_len // 2 + 1
    sizes: list[int | None] = [None if pattern[i % len(pattern)] == "L" else short for i in range(n_layer)]
    sizes[-1] = None
    return sizes


def target_tokens(ratio: float, scaling_params: int) -> int:
    """Compute-optimal horizon in tokens: ratio x scaling params (Chinchilla-style; 10.5 by default)."""
    return int(ratio * scaling_params)


def auto_total_batch_size(tokens: float, ref_tokens: float, b_ref: int = B_REF) -> int:
    """Total batch in tokens, B = B_ref (D / D_ref)^0.383, rounded to the nearest power of two."""
    predicted = b_ref * (tokens / ref_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


def lr_scale(total_batch_size: int, b_ref: int = B_REF) -> float:
    """LR multiplier for a batch other than B_ref: eta ∝ sqrt(B / B_ref) (the AdamW rule, used for Muon too)."""
    return math.sqrt(total_batch_size / b_ref)


def scaled_weight_decay(weight_decay: float, total_batch_size: int, tokens: float, ref_tokens: float,
                        b_ref: int = B_REF) -> float:
    """Weight decay that keeps T_epoch = B / (eta lambda D) constant (arXiv:2405.13698).

    With eta ∝ sqrt(B/B_ref) that gives lambda = lambda_ref sqrt(B/B_ref) (D_ref / D).
    """
    return weight_decay * math.sqrt(total_batch_size / b_ref) * (ref_tokens / tokens)


def adamw_lr_scale(model_dim: int) -> float:
    """AdamW LRs shrink with width: eta ∝ 1 / sqrt(d_model / 768) (muP-style; 768 = the d12 width)."""
    return (model_dim / 768) ** -0.5


def num_iterations(*, num_iterations: int, target_flops: float, ratio: float, flops_per_token: float,
                   scaling_params: int, total_batch_size: int) -> tuple[int, str]:
    """Optimizer steps from the first horizon option set: --num-iterations, --target-flops, then the
    tokens:params ratio. Returns (steps, how it was decided)."""
    if num_iterations > 0:
        return num_iterations, "--num-iterations"
    if target_flops > 0:
        return max(1, round(target_flops / (flops_per_token * total_batch_size))), "--target-flops"
    if ratio > 0:
        return max(1, target_tokens(ratio, scaling_params) // total_batch_size), "--target-param-data-ratio"
    raise ValueError("no training horizon")


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the loop needs that follows from depth and the horizon."""
    total_batch_size: int
    batch_size_source: str       # "auto" or "--total-batch-size"
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str
    target_tokens: int           # tokens of the horizon by the ratio rule (the batch-size input)
    ref_tokens: int              # the d12 reference horizon
    lr_scale: float
    weight_decay: float          # scaled
    flops_per_token: float
    scaling_params: int

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.total_tokens

    @property
    def tokens_per_param(self) -> float:
        return self.total_tokens / self.scaling_params


def plan_training(*, scaling_params: int, ref_scaling_params: int, flops_per_token: float,
                  ratio: float, num_iterations_opt: int, target_flops: float, total_batch_size_opt: int,
                  weight_decay: float, tokens_per_micro_step: int) -> TrainingPlan:
    """Combine the rules above. `tokens_per_micro_step` = device batch x seq len x world size.

    The horizon in tokens for the batch-size and weight-decay rules comes from the ratio (10.5 if the
    ratio option is off), as in nanochat, whatever option then fixes the step count; an auto batch
    is rounded up to a whole number of micro-steps (at least one). A --total-batch-size that is not a
    whole number of micro-steps is refused (see `grad_accum_steps`).
    """
    eff_ratio = ratio if ratio > 0 else 10.5
    tokens = target_tokens(eff_ratio, scaling_params)
    ref = target_tokens(eff_ratio, ref_scaling_params)
    if total_batch_size_opt > 0:
        batch, source = total_batch_size_opt, "--total-batch-size"
    else:
        # the auto batch is a whole number of micro-steps: rounded up when the device batch does not divide it
        auto = auto_total_batch_size(tokens, ref)
        batch, source = -(-auto // tokens_per_micro_step) * tokens_per_micro_step, "auto"
    steps, how = num_iterations(num_iterations=num_iterations_opt, target_flops=target_flops, ratio=ratio,
                                flops_per_token=flops_per_token, scaling_params=scaling_params,
                                total_batch_size=batch)
    return TrainingPlan(
        total_batch_size=batch, batch_size_source=source,
        grad_accum_steps=grad_accum_steps(batch, tokens_per_micro_step),
        num_iterations=steps, horizon_source=how, target_tokens=tokens, ref_tokens=ref,
        lr_scale=lr_scale(batch),
        weight_decay=scaled_weight_decay(weight_decay, batch, tokens, ref),
        flops_per_token=flops_per_token, scaling_params=scaling_params,
    )


def grad_accum_steps(total_batch_size: int, tokens_per_micro_step: int) -> int:
    """Micro-steps per optimizer step; the total batch must be a whole number of micro-steps."""
    if total_batch_size % tokens_per_micro_step:
        from nanotrain.errors import UserError
        raise UserError(f"--total-batch-size {total_batch_size:,} is not a multiple of the tokens of one micro-step "
                        f"({tokens_per_micro_step:,} = device batch x seq len x ranks); pass a multiple of it")
    return total_batch_size // tokens_per_micro_step
