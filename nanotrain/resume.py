"""The resume policy: whether a run may resume from a checkpoint, and what it changes by doing so.

The rule of each option (must match / noted change / free, and why) is part of the option itself: the field
metadata of TrainConfig in nanotrain/config.py (`option(...)`). This module applies those rules, and the
checks that are not about a single option (model shape, tokenizer, data, sharded optimizer state), to the
meta a checkpoint saved and the meta of the run that wants to resume. The checkpoint store
(nanotrain/checkpoint.py) knows nothing of these rules.
"""
from __future__ import annotations

from nanotrain.checkpoint import jsonable
from nanotrain.config import MUST_MATCH, NOTED, resume_rules
from nanotrain.data.loader import valid_world_sizes
from nanotrain.errors import UserError


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _changed(saved: dict, new: dict, options: list[str]) -> list[str]:
    """The options set (not None) on both sides whose values differ, in the order given."""
    return [k for k in options if saved.get(k) is not None and new.get(k) is not None and saved[k] != new[k]]


def check_resume_compatible(saved_meta: dict, new_meta: dict) -> list[str]:
    """Refuse (UserError) a resume that cannot continue the run; return notes on deliberate changes.

    Refused: a different model shape (model_config), tokenizer fingerprint or data fingerprint; a world size
    the run cannot re-shard onto (check_world_size); any change of an option whose resume rule is MUST_MATCH
    (its `why` says what it would change). A key missing (or None) on either side is not compared, so partial
    metas still resume. Changes of NOTED options
    (horizon, LRs) are allowed and returned as one note each; FREE options (cadences, names) pass silently.
    """
    saved, new = jsonable(saved_meta), jsonable(new_meta)
    s_train, n_train = saved.get("train_config") or {}, new.get("train_config") or {}
    rules = resume_rules()
    must_match = [k for k, (rule, _) in rules.items() if rule == MUST_MATCH]

    s_cfg, n_cfg = saved.get("model_config"), new.get("model_config")
    if s_cfg is not None and n_cfg is not None and s_cfg != n_cfg:
        diffs = [f"{k} {s_cfg.get(k)!r} -> {n_cfg.get(k)!r}" for k in sorted(set(s_cfg) | set(n_cfg))
                 if s_cfg.get(k) != n_cfg.get(k)]
        shape = [k for k in must_match if rules[k][1].startswith("model shape")]
        flags = " ".join(f"{_flag(k)}={s_train[k]}" for k in shape if k in s_train)
        how = f"resume with the checkpoint's options ({flags})" if flags else "resume with the checkpoint's options"
        raise UserError(f"cannot resume: the model shape differs from the checkpoint's ({', '.join(diffs)}); "
                        f"{how} or start a new run under another --model-tag")

    for key, what, where in (("tokenizer_fingerprint", "tokenizer", "the tokenizer/ folder of the base dir"),
                             ("data_fingerprint", "training data", "the base_data/ shards")):
        a, b = saved.get(key), new.get(key)
        if a is not None and b is not None and a != b:
            raise UserError(f"cannot resume: the {what} differs from the one the checkpoint was trained with "
                            f"(fingerprint {a} -> {b}); restore {where} the run used, or start a new run under "
                            "another --model-tag")

    s_world, n_world = saved.get("world_size"), new.get("world_size")
    if s_world is not None and n_world is not None and s_world != n_world and not saved.get("weights_only"):
        check_world_size(s_world, n_world, saved.get("data_streams"), bool(saved.get("optim_sharded")))

    changed = _changed(s_train, n_train, must_match)
    if changed:
        diffs = ", ".join(f"{_flag(k)} {s_train[k]!r} -> {n_train[k]!r} ({rules[k][1]})" for k in changed)
        raise UserError(f"cannot resume: {diffs} changed since the checkpoint; resume with the checkpoint's values "
                        "or start a new run under another --model-tag (cadences such as --eval-every, the horizon "
                        "and the learning rates may change)")
    noted = _changed(s_train, n_train, [k for k, (rule, _) in rules.items() if rule == NOTED])
    return [f"{_flag(k)} changed from {s_train[k]!r} to {n_train[k]!r} ({rules[k][1]})" for k in noted]


def check_world_size(saved: int, new: int, data_streams: int | None, optim_sharded: bool) -> None:
    """A run resumes on another number of processes when that number divides its `data_streams` virtual data
    streams: the global token stream and the optimizer state then re-shard exactly (data/loader.py,
    optim.merge_optimizer_shards). A checkpoint without `data_streams` predates the re-shardable loader: a sharded
    optimizer state of it resumes only on the process count that wrote it (its loader state, of an older format,
    is refused by the loader)."""
    if data_streams is None:
        if optim_sharded:
            raise UserError(f"cannot resume: the checkpoint was written by {saved} processes with a sharded optimizer "
                            f"state and this run has {new}; relaunch with {saved} processes (e.g. torchrun "
                            f"--nproc_per_node={saved}), or start a new run under another --model-tag")
        return
    if data_streams % new:
        raise UserError(f"cannot resume: the checkpoint's data stream is cut into {data_streams} streams, which "
                        f"{new} processes cannot share evenly; relaunch with one of "
                        f"{', '.join(map(str, valid_world_sizes(data_streams)))} processes")


__all__ = ["check_resume_compatible", "check_world_size"]
