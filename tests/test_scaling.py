"""Scaling rules against hand-computed values."""
import math

import pytest

from nanotrain import scaling
from nanotrain.errors import UserError


@pytest.mark.parametrize("depth,expected", [(12, (768, 6)), (20, (1280, 10)), (26, (1664, 13)),
                                            (4, (256, 2)), (3, (256, 2)), (1, (128, 1))])
def test_model_shape_rounds_up_to_head_dim(depth, expected):
    assert scaling.model_shape(depth, 64, 128) == expected


def test_model_shape_other_head_dim():
    assert scaling.model_shape(5, 64, 64) == (320, 5)
    assert scaling.model_shape(5, 50, 64) == (256, 4)  # 250 -> 256


def test_window_sizes_tiles_pattern_and_ends_full():
    assert scaling.window_sizes("SSSL", 6, 2048) == [1025, 1025, 1025, None, 1025, None]
    assert scaling.window_sizes("L", 3, 256) == [None, None, None]
    assert scaling.window_sizes("s", 2, 100) == [51, None]
    assert scaling.window_sizes("SL", 5, 64) == [33, None, 33, None, None]


def test_auto_batch_size_power_lines():
    ref = 1e9
    assert scaling.auto_total_batch_size(ref, ref) == 2**19
    # 2x tokens: 2^(19 + 0.383) rounds to 2^19; 8x tokens: 2^(19 + 1.149) rounds to 2^20
    assert scaling.auto_total_batch_size(2 * ref, ref) == 2**19
    assert scaling.auto_total_batch_size(8 * ref, ref) == 2**20
    assert scaling.auto_total_batch_size(ref / 64, ref) == 2**17  # 2^(19 - 2.298)


def test_lr_and_weight_decay_scaling():
    assert scaling.lr_scale(2**19) == 1.0
    assert math.isclose(scaling.lr_scale(2**20), math.sqrt(2))
    # lambda = 0.2 * sqrt(2) * (1/8)
    assert math.isclose(scaling.scaled_weight_decay(0.2, 2**20, 8e9, 1e9), 0.2 * math.sqrt(2) / 8)
    assert math.isclose(scaling.adamw_lr_scale(768), 1.0)
    assert math.isclose(scaling.adamw_lr_scale(1536), 1 / math.sqrt(2))


def test_horizon_precedence():
    kw = dict(flops_per_token=1e6, scaling_params=1000, total_batch_size=500)
    assert scaling.num_iterations(num_iterations=7, target_flops=1e12, ratio=10, **kw) == (7, "--num-iterations")
    assert scaling.num_iterations(num_iterations=-1, target_flops=1e12, ratio=10, **kw) == (2000, "--target-flops")
    assert scaling.num_iterations(num_iterations=-1, target_flops=-1, ratio=10, **kw) == (20,
                                                                                          "--target-param-data-ratio")


def test_plan_training_d12_reference_point():
    # at the reference model itself the auto batch is B_ref, and LR / weight decay are unchanged
    plan = scaling.plan_training(scaling_params=10**8, ref_scaling_params=10**8, flops_per_token=6e8, ratio=10.5,
                                 num_iterations_opt=-1, target_flops=-1, total_batch_size_opt=-1, weight_decay=0.2,
                                 tokens_per_micro_step=32 * 2048 * 8)
    assert plan.total_batch_size == 2**19
    assert plan.grad_accum_steps == 1
    assert plan.num_iterations == int(10.5 * 10**8) // 2**19
    assert plan.lr_scale == 1.0 and math.isclose(plan.weight_decay, 0.2)
    assert math.isclose(plan.tokens_per_param, plan.total_tokens / 10**8)


def test_plan_training_small_model_batch_floor_and_accumulation():
    plan = scaling.plan_training(scaling_params=10**5, ref_scaling_params=10**8, flops_per_token=1e6, ratio=10.5,
                                 num_iterations_opt=300, target_flops=-1, total_batch_size_opt=8192,
                                 weight_decay=0.2, tokens_per_micro_step=4 * 256)
    assert plan.grad_accum_steps == 8 and plan.num_iterations == 300 and plan.total_tokens == 300 * 8192
    auto = scaling.plan_training(scaling_params=10**2, ref_scaling_params=10**8, flops_per_token=1e6, ratio=10.5,
                                 num_iterations_opt=-1, target_flops=-1, total_batch_size_opt=-1,
                                 weight_decay=0.2, tokens_per_micro_step=32 * 2048)
    assert auto.total_batch_size == 32 * 2048  # raised to one micro-step


def test_batch_not_multiple_of_micro_step_is_refused():
    with pytest.raises(UserError, match="not a multiple"):
        scaling.grad_accum_steps(1000, 768)


def test_auto_batch_is_rounded_up_to_whole_micro_steps():
    # device batch 24 x 2048 tokens does not divide the auto 2^19: round up to 11 micro-steps (540,672 tokens)
    plan = scaling.plan_training(scaling_params=10**8, ref_scaling_params=10**8, flops_per_token=6e8, ratio=10.5,
                                 num_iterations_opt=-1, target_flops=-1, total_batch_size_opt=-1, weight_decay=0.2,
                                 tokens_per_micro_step=24 * 2048)
    assert plan.total_batch_size == 11 * 24 * 2048 and plan.grad_accum_steps == 11
