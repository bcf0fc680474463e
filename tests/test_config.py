"""Option parsing and validation: every bad value is one line, exit status 2, before any work; each option's
help text and resume rule live on its field, and the resume policy applies those rules."""
import dataclasses
import re
import subprocess
import sys

import pytest

from nanotrain.config import (
    EVAL_TOKENS_DEFAULT,
    FREE,
    MUST_MATCH,
    NOTED,
    TrainConfig,
    build_parser,
    check_keep_last,
    option,
    parse_args,
    resume_rules,
)
from nanotrain.errors import UserError
from nanotrain.resume import check_resume_compatible


def test_defaults_are_the_seeds():
    c = parse_args([])
    assert (c.run, c.depth, c.aspect_ratio, c.head_dim, c.max_seq_len, c.window_pattern) == \
        ("dummy", 20, 64, 128, 2048, "SSSL")
    assert (c.num_iterations, c.target_flops, c.target_param_data_ratio) == (-1, -1.0, 10.5)
    assert (c.device_batch_size, c.total_batch_size) == (32, -1)
    assert (c.embedding_lr, c.unembedding_lr, c.matrix_lr, c.scalar_lr, c.weight_decay) == (0.3, 0.004, 0.02, 0.5, 0.2)
    assert (c.adam_beta1, c.adam_beta2, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac) == (0.8, 0.95, 0.0, 0.5, 0.0)
    assert (c.eval_every, c.eval_tokens, c.core_metric_every, c.core_metric_max_per_task) == \
        (250, EVAL_TOKENS_DEFAULT, 2000, 500)
    assert (c.sample_every, c.save_every, c.model_tag, c.resume_from_step) == (2000, -1, None, -1)
    assert EVAL_TOKENS_DEFAULT == 41_943_040
    assert c.tag == "d20" and parse_args(["--model-tag", "mine"]).tag == "mine"


def test_parses_every_kind_of_value():
    c = parse_args(["--depth=4", "--fp8", "--fp8-recipe=rowwise", "--target-flops=1e18", "--resume-from-step=latest",
                    "--window-pattern=L", "--warmup-ratio=0.1", "--kernels=attention=reference"])
    assert c.depth == 4 and c.fp8 and c.fp8_recipe == "rowwise" and c.target_flops == 1e18
    assert c.resume_from_step == "latest" and c.kernels == "attention=reference"
    assert parse_args(["--resume-from-step", "120"]).resume_from_step == 120
    assert parse_args(["--kernels"]).kernels == "list"


@pytest.mark.parametrize("changes,needle", [
    (dict(depth=0), "--depth"), (dict(depth=-3), "--depth"),
    (dict(window_pattern="SSX"), "--window-pattern"), (dict(window_pattern=""), "--window-pattern"),
    (dict(fp8_recipe="blockwise"), "--fp8-recipe"), (dict(device_type="tpu"), "--device-type"),
    (dict(head_dim=63), "--head-dim"), (dict(max_seq_len=1), "--max-seq-len"),
    (dict(num_iterations=0), "--num-iterations"), (dict(target_flops=-5.0), "--target-flops"),
    (dict(num_iterations=-1, target_flops=-1, target_param_data_ratio=-1), "horizon"),
    (dict(total_batch_size=0), "--total-batch-size"), (dict(matrix_lr=-0.1), "--matrix-lr"),
    (dict(adam_beta2=1.0), "--adam-beta2"), (dict(warmdown_ratio=1.5), "--warmdown-ratio"),
    (dict(warmup_ratio=0.6, warmdown_ratio=0.6), "exceed 1"), (dict(resume_from_step=-2), "--resume-from-step"),
    (dict(eval_every=0), "--eval-every"), (dict(save_every=-7), "--save-every"), (dict(eval_tokens=0), "--eval-tokens"),
    (dict(keep_last=0), "--keep-last"), (dict(model_tag="../x"), "--model-tag"), (dict(compile="maybe"), "--compile"),
])
def test_bad_values_are_refused_with_the_option_named(changes, needle):
    with pytest.raises(UserError, match=needle.replace("-", r"\-")) as e:
        TrainConfig(**changes)
    assert "\n" not in str(e.value) and ";" in str(e.value)  # one line, with the fix after the semicolon


@pytest.mark.parametrize("args,needle", [
    (["--depth=-1"], "--depth must be a positive integer"),
    (["--window-pattern=SXL"], "--window-pattern"),
    (["--depth=abc"], "invalid int value"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanotrain", *args, f"--base-dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_every_option_has_help_and_a_resume_rule():
    fields = dataclasses.fields(TrainConfig)
    parser_help = {a.dest: a.help for a in build_parser()._actions if a.dest != "help"}
    assert set(parser_help) == {f.name for f in fields}
    for f in fields:
        assert f.metadata["help"] and parser_help[f.name] == f.metadata["help"], f.name  # --help reads the field
        assert f.metadata["resume"] in (MUST_MATCH, NOTED, FREE) and f.metadata["why"], f.name
    assert resume_rules()["depth"] == (MUST_MATCH, "model shape")
    assert resume_rules()["matrix_lr"] == (NOTED, "optimizer hyperparameters")
    assert resume_rules()["eval_every"][0] == FREE
    with pytest.raises(ValueError, match="unknown resume rule"):
        option(1, "help", "maybe", "why")


def _changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-changed"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_resume_policy_applies_each_options_rule(name):
    """The resume policy (nanotrain/resume.py) follows each field's metadata: a MUST_MATCH option changed refuses
    the resume naming the option and why, a NOTED one gives one note, a FREE one passes silently."""
    saved = TrainConfig(num_iterations=10).to_dict()
    new = dict(saved, **{name: _changed_value(saved[name])})
    meta = {"model_config": {"n_layer": 2}, "world_size": 1, "optim_sharded": False}
    rule, why = resume_rules()[name]
    flag = "--" + name.replace("_", "-")
    call = lambda: check_resume_compatible(dict(meta, train_config=saved), dict(meta, train_config=new))  # noqa: E731
    if rule == MUST_MATCH:
        with pytest.raises(UserError, match=f"cannot resume: {flag} .* \\({re.escape(why)}\\) changed"):
            call()
    elif rule == NOTED:
        assert call() == [f"{flag} changed from {saved[name]!r} to {new[name]!r} ({why})"]
    else:
        assert call() == []


def test_keep_last_rule_is_one_sentence_with_the_fix():
    with pytest.raises(UserError) as e:
        check_keep_last(0)
    assert str(e.value) == ("--keep-last must be at least 1, got 0; pass how many checkpoints to keep, or -1 to keep "
                            "every checkpoint")
    check_keep_last(-1)
    check_keep_last(3)
