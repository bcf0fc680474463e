"""A saved model, ready to evaluate: rebuild the GPT a checkpoint describes and load its weights.

The checkpoint store (nanotrain/checkpoint.py) reads and verifies files; this module is the step above it
that knows what a model is, so the store never imports the model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from nanotrain import paths
from nanotrain.checkpoint import load_checkpoint
from nanotrain.errors import UserError


def load_model(model_tag: str, step: int | str = "latest", device: torch.device | str = "cpu",
               base_dir: str | os.PathLike | None = None) -> tuple[Any, Any, dict]:
    """(model in eval mode on `device`, the base dir's tokenizer, meta) of a saved checkpoint.

    The GPT is rebuilt from meta's model_config on the meta device, allocated on `device`, initialized (for
    the buffers a state_dict does not hold) and loaded. UserError when the tokenizer in the base dir is not
    the one the checkpoint was trained with, or the weights do not fit the model this code builds.
    """
    # Imported here, not at the top: tests stand in for the model and tokenizer modules (sys.modules).
    from nanotrain.data.tokenizer import load_tokenizer
    from nanotrain.model import GPT, GPTConfig

    ckpt_dir = paths.checkpoint_dir(model_tag, base_dir)
    # the weights and meta only: no optimizer or rank state, so nothing is unpickled (model.safetensors)
    ckpt = load_checkpoint(ckpt_dir, step, rank=0, device="cpu", load_optim=False, load_rank_state=False)
    meta = ckpt.meta
    tokenizer = load_tokenizer(base_dir)
    expected = meta.get("tokenizer_fingerprint")
    if expected is not None and tokenizer.fingerprint != expected:
        raise UserError(f"the tokenizer in {paths.tokenizer_dir(base_dir)} (fingerprint {tokenizer.fingerprint}) is "
                        f"not the one {ckpt.path} was trained with (fingerprint {expected}); restore that tokenizer "
                        "or pass the --base-dir the model was trained in")
    cfg = dict(meta.get("model_config") or {})
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(cfg) - known)
    version = meta["code_version"]
    written_by = f"nanotrain {version.get('nanotrain')} (commit {version.get('git_commit') or 'unknown'})"
    if unknown:
        raise UserError(f"checkpoint {ckpt.path} has model options this nanotrain does not know "
                        f"({', '.join(unknown)}); it was written by {written_by}: use that version")
    try:
        config = GPTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt.path} has an invalid model config ({e}); it was written by {written_by}: "
                        "use that version") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as e:
        raise UserError(f"the weights in {ckpt.path} do not fit the model this nanotrain builds "
                        f"({str(e).splitlines()[0][:200]}); it was written by {written_by}: use that version") from None
    model.eval()
    return model, tokenizer, meta


__all__ = ["load_model"]
