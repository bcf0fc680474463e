"""Where nanotrain keeps its files: one base directory shared by every command.

$NANOTRAIN_BASE_DIR (default ~/.cache/nanotrain), overridable by each command's --base-dir:
  base_data/                  parquet shards (the last one is the validation split)
  tokenizer/                  the trained BPE tokenizer
  base_checkpoints/<tag>/     checkpoints, metrics JSONL, plots
  eval_bundle/                the CORE evaluation tasks
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "NANOTRAIN_BASE_DIR"


def base_dir(override: str | os.PathLike | None = None) -> Path:
    """The base directory: the explicit override, else $NANOTRAIN_BASE_DIR, else ~/.cache/nanotrain."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "nanotrain"


def data_dir(base: str | os.PathLike | None = None) -> Path:
    return base_dir(base) / "base_data"


def tokenizer_dir(base: str | os.PathLike | None = None) -> Path:
    return base_dir(base) / "tokenizer"


def checkpoint_dir(model_tag: str, base: str | os.PathLike | None = None) -> Path:
    return base_dir(base) / "base_checkpoints" / model_tag


def eval_bundle_dir(base: str | os.PathLike | None = None) -> Path:
    return base_dir(base) / "eval_bundle"
