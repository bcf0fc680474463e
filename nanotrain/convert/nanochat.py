"""nanochat checkpoints both ways: export a nanotrain base model into nanochat's layout, import one back.

nanochat's base stage writes, under its base directory ($NANOCHAT_BASE_DIR, default ~/.cache/nanochat):

    base_checkpoints/<tag>/model_<step:06d>.pt    the model's state_dict (torch.save of a plain dict)
    base_checkpoints/<tag>/meta_<step:06d>.json   {"step", "val_bpb", "model_config", "user_config",
                                                   "device_batch_size", "max_seq_len", "total_batch_size",
                                                   "dataloader_state_dict", "loop_state"}
    base_checkpoints/<tag>/optim_<step:06d>_rank<r>.pt   optimizer shards (only base_train's resume needs them)
    tokenizer/tokenizer.pkl                        a pickled tiktoken.Encoding
    tokenizer/token_bytes.pt                       int32 (vocab,): UTF-8 byte length per token, 0 for specials

Its loader (checkpoint_manager.build_model) rebuilds `GPT(GPTConfig(**meta["model_config"]))` and loads the
state dict strictly; its next stages read meta["model_config"]["sequence_len"], meta["step"], and (with
fallbacks) meta["max_seq_len"], meta["device_batch_size"], meta["total_batch_size"] and the learning rates in
meta["user_config"]. The module tree, parameter names and shapes are the same as nanotrain's GPT
(nanotrain/model.py follows nanochat's gpt.py), so the state dict crosses unchanged. The differences, and
what this module does about each:

- Short attention windows. nanotrain's S layers see sequence_len // 2 + 1 keys (a look-back of
  sequence_len // 2 tokens); current nanochat computes its S look-back as a quarter of sequence_len rounded
  up to a multiple of 128 (512 at 2048: a comment in its gpt.py says 768, its expression gives 512). The
  config has no field for it, so a model with S layers whose look-backs differ computes different logits on
  the other side: both commands refuse such a model unless --allow-window-change is given, and then record
  the change in the written meta. (At sequence_len 256 both look back 128 tokens: no difference.)
- Full-context layers. nanotrain's L layers attend to every earlier key; nanochat's have a look-back of
  sequence_len tokens. They agree on every sequence of up to sequence_len + 1 tokens (all training and
  evaluation); only generation past that length differs. Stated, not refused.
- Stored embedding dtype. nanochat keeps wte and the value embeddings in its compute dtype (bfloat16 on an
  Ampere+ GPU, float32 on CPU), so its checkpoints hold either; nanotrain keeps float32. Export writes
  float32 (lossless; nanochat's loader accepts it on every device) or bfloat16 with --embeddings-bf16
  (nanochat's GPU layout; rounds the embeddings). Import upcasts every floating tensor to float32.
- Fixed gate widths. nanochat's smear gate reads 24 channels and its value-embedding gate 12; nanotrain
  reads min(24, n_embd) and min(12, n_embd). Models narrower than 24 channels cannot cross: refused.
- Vocabulary padding. Both pad the embedding and head rows to a multiple of 64; a nanotrain checkpoint
  saved with another padding is refused.
- Optimizer state. nanotrain's optimizer groups and state differ from nanochat's MuonAdamW, so none is
  carried either way: an export holds weights only (nanochat's SFT starts a fresh optimizer when no
  optim file is there, as it says in its log; its base_train cannot resume from it), and an import is a
  weights-only nanotrain checkpoint (meta["weights_only"] = True, no optimizer, loader or loop state).
- torch.compile prefixes. nanochat strips a leading "_orig_mod." from keys; import does the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from nanotrain import paths
from nanotrain.errors import UserError

NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
NANOCHAT_PAD_VOCAB_TO = 64
NANOCHAT_SMEAR_CHANNELS = 24
NANOCHAT_VE_GATE_CHANNELS = 12
CHECKPOINTS_DIR = "base_checkpoints"
TOKENIZER_DIR = "tokenizer"
_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
# Run options nanotrain and nanochat's base_train share by name and meaning (nanochat's SFT reads the LRs).
_SHARED_USER_KEYS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "device_batch_size",
                     "embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay")


def model_file(step: int) -> str:
    return f"model_{step:06d}.pt"


def meta_file(step: int) -> str:
    return f"meta_{step:06d}.json"


# ----------------------------------------------------------------------------------------------- windows
def nanochat_short_lookback(sequence_len: int) -> int:
    """nanochat's S-layer look-back in tokens: sequence_len / 4, rounded up, then up to a multiple of 128."""
    quarter = -(-sequence_len // 4)
    return -(-quarter // 128) * 128


def nanochat_lookbacks(cfg: Any) -> list[int]:
    """Per-layer look-back (earlier tokens a query sees) of nanochat's GPT for a config; last layer is L."""
    pattern = cfg.window_pattern.upper()
    out = [cfg.sequence_len if pattern[i % len(pattern)] == "L" else nanochat_short_lookback(cfg.sequence_len)
           for i in range(cfg.n_layer)]
    out[-1] = cfg.sequence_len
    return out


def nanotrain_lookbacks(cfg: Any) -> list[int | None]:
    """Per-layer look-back of nanotrain's GPT (None = every earlier token)."""
    from nanotrain.model import compute_window_sizes

    return [None if w is None else w - 1 for w in compute_window_sizes(cfg)]


def window_differences(cfg: Any) -> list[str]:
    """Layers whose attention differs between nanotrain and nanochat within a sequence_len context.

    A look-back of at least sequence_len - 1 tokens covers the whole context, so it equals full attention there.
    """
    full = cfg.sequence_len - 1
    diffs = []
    for i, (ours, theirs) in enumerate(zip(nanotrain_lookbacks(cfg), nanochat_lookbacks(cfg))):
        a = full if ours is None else min(ours, full)
        b = min(theirs, full)
        if a != b:
            diffs.append(f"layer {i}: nanotrain looks back {ours if ours is not None else 'all'} tokens, "
                         f"nanochat {theirs}")
    return diffs


def _window_note(cfg: Any, direction: str, allow: bool) -> dict | None:
    diffs = window_differences(cfg)
    if not diffs:
        return None
    if not allow:
        raise UserError(f"nanochat and nanotrain size the short attention windows differently for this model "
                        f"({diffs[0]}{' and more' if len(diffs) > 1 else ''}), so its logits would change; pass "
                        f"--allow-window-change to {direction} anyway")
    return {"window_change": diffs}


def _check_gate_widths(n_embd: int) -> None:
    if n_embd < NANOCHAT_SMEAR_CHANNELS:
        raise UserError(f"n_embd {n_embd} is below the {NANOCHAT_SMEAR_CHANNELS} channels nanochat's smear gate "
                        "reads, so the model cannot cross between nanotrain and nanochat; use a model with "
                        f"n_embd >= {NANOCHAT_SMEAR_CHANNELS}")


# ----------------------------------------------------------------------------------------------- export
def export_nanochat(model_tag: str, out: str | os.PathLike, step: int | str = "latest",
                    base_dir: str | os.PathLike | None = None, *, allow_window_change: bool = False,
                    embeddings_bf16: bool = False, overwrite: bool = False) -> Path:
    """Write a nanotrain checkpoint as a nanochat base directory `out`; returns the model file written.

    out/base_checkpoints/<model_tag>/model_<step>.pt + meta_<step>.json and out/tokenizer/{tokenizer.pkl,
    token_bytes.pt}: point nanochat at it with NANOCHAT_BASE_DIR=out and run its SFT, chat or base_eval with
    --model-tag <model_tag>. UserError when the model cannot be represented (see the module docstring).
    """
    from nanotrain.eval.loading import load_model

    model, tokenizer, meta = load_model(model_tag, step, device="cpu", base_dir=base_dir)
    cfg = model.config
    _check_gate_widths(cfg.n_embd)
    padded = -(-cfg.vocab_size // NANOCHAT_PAD_VOCAB_TO) * NANOCHAT_PAD_VOCAB_TO
    if model.padded_vocab_size != padded:
        raise UserError(f"the checkpoint pads its vocabulary to {model.padded_vocab_size} rows where nanochat pads "
                        f"to {padded}; export a checkpoint trained with the default padding")
    note = _window_note(cfg, "export", allow_window_change)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens and the model {cfg.vocab_size}; pass the "
                        "--base-dir the model was trained in")

    n = int(meta.get("step", 0))
    out = Path(out).expanduser()
    ckpt_dir = out / CHECKPOINTS_DIR / model_tag
    target = ckpt_dir / model_file(n)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; choose another --out or pass --overwrite")
    tok_dir = out / TOKENIZER_DIR
    if (tok_dir / "tokenizer.pkl").exists() and not overwrite:
        existing = _load_nanochat_tokenizer(tok_dir)
        if existing.fingerprint != tokenizer.fingerprint:
            raise UserError(f"{tok_dir} holds another tokenizer; choose another --out (nanochat reads one "
                            "tokenizer per base directory)")

    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous().clone()
        if embeddings_bf16 and (name == "transformer.wte.weight" or name.startswith("value_embeds.")):
            t = t.to(torch.bfloat16)
        state[name] = t

    train_cfg = meta.get("train_config") or {}
    plan = meta.get("plan") or {}
    total_batch = plan.get("total_batch_size") or train_cfg.get("total_batch_size")
    nanochat_meta: dict[str, Any] = {
        "step": n,
        "val_bpb": meta.get("val_bpb"),
        "model_config": {k: getattr(cfg, k) for k in NANOCHAT_CONFIG_KEYS},
        "user_config": {k: train_cfg[k] for k in _SHARED_USER_KEYS if k in train_cfg},
        "device_batch_size": train_cfg.get("device_batch_size"),
        "max_seq_len": cfg.sequence_len,
        "total_batch_size": total_batch if total_batch and total_batch > 0 else None,
        "exported_from": {"format": "nanotrain", "model_tag": model_tag, "step": n,
                          "tokenizer_fingerprint": tokenizer.fingerprint,
                          "embeddings_dtype": "bfloat16" if embeddings_bf16 else "float32",
                          "optimizer_state": "not exported (weights only)", **(note or {})},
    }
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _atomic(target, lambda f: torch.save(state, f))
    _atomic(ckpt_dir / meta_file(n), lambda f: f.write(json.dumps(nanochat_meta, indent=2).encode()))
    tok_dir.mkdir(parents=True, exist_ok=True)
    _atomic(tok_dir / "tokenizer.pkl", lambda f: pickle.dump(tokenizer.enc, f))
    _atomic(tok_dir / "token_bytes.pt", lambda f: torch.save(tokenizer.token_bytes().clone(), f))
    return target


def _load_nanochat_tokenizer(tok_dir: Path):
    from nanotrain.data.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


# ----------------------------------------------------------------------------------------------- import
def find_nanochat_checkpoint(src: Path, nanochat_tag: str | None, step: int | None) -> tuple[Path, str, int]:
    """(checkpoint folder, tag, step) inside a nanochat base directory; UserError naming what is there."""
    root = src / CHECKPOINTS_DIR
    if not root.is_dir():
        raise UserError(f"{src} is not a nanochat base directory (no {CHECKPOINTS_DIR}/ in it); pass the folder "
                        "NANOCHAT_BASE_DIR points to")
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and any(_MODEL_RE.match(f.name) for f in p.iterdir()))
    if nanochat_tag is None:
        if len(tags) != 1:
            raise UserError(f"{root} holds {len(tags)} model tags ({', '.join(tags) or 'none'}); pick one with "
                            "--nanochat-tag")
        nanochat_tag = tags[0]
    ckpt_dir = root / nanochat_tag
    steps = sorted(int(m.group(1)) for f in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                   if (m := _MODEL_RE.match(f.name)))
    if not steps:
        raise UserError(f"no nanochat checkpoint under {ckpt_dir} (tags with checkpoints: {', '.join(tags) or 'none'});"
                        " pass one of those to --nanochat-tag")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{ckpt_dir} has no step {step} (steps: {', '.join(map(str, steps))}); pass one of those "
                        "to --step")
    if not (ckpt_dir / meta_file(step)).is_file():
        raise UserError(f"{ckpt_dir / meta_file(step)} is missing; nanochat writes it beside the model file, copy it "
                        "too")
    return ckpt_dir, nanochat_tag, step


def _train_config_for(cfg: Any, user_config: dict) -> dict:
    """The shape options of `nanotrain` that rebuild this model (only those that reproduce it exactly)."""
    from nanotrain.scaling import model_shape

    out: dict[str, Any] = {"depth": cfg.n_layer, "max_seq_len": cfg.sequence_len,
                           "window_pattern": cfg.window_pattern.upper()}
    head_dim = cfg.n_embd // cfg.n_head
    for ratio in (user_config.get("aspect_ratio"), cfg.n_embd // cfg.n_layer):
        if isinstance(ratio, int) and ratio > 0 and model_shape(cfg.n_layer, ratio, head_dim) == (cfg.n_embd,
                                                                                                   cfg.n_head):
            out.update(aspect_ratio=ratio, head_dim=head_dim)
            break
    return out


def import_nanochat(src: str | os.PathLike, model_tag: str, step: int | None = None,
                    base_dir: str | os.PathLike | None = None, *, nanochat_tag: str | None = None,
                    allow_window_change: bool = False) -> Path:
    """Save a nanochat base checkpoint as a weights-only nanotrain checkpoint; returns its step folder.

    The tokenizer goes into the base dir's tokenizer/ (refused when another tokenizer is already there); the
    checkpoint into base_checkpoints/<model_tag>/ through nanotrain's checkpoint store, with
    meta["weights_only"] = True (no optimizer, data-loader or loop state).
    """
    from nanotrain.checkpoint import list_steps, save_checkpoint
    from nanotrain.data.tokenizer import Tokenizer
    from nanotrain.model import GPT, GPTConfig

    src = Path(src).expanduser()
    ckpt_dir, tag, n = find_nanochat_checkpoint(src, nanochat_tag, step)
    try:
        nc_meta = json.loads((ckpt_dir / meta_file(n)).read_text())
    except ValueError as e:
        raise UserError(f"{ckpt_dir / meta_file(n)} is not JSON ({e}); copy it again from the nanochat run") from None
    raw_cfg = dict(nc_meta.get("model_config") or {})
    raw_cfg.setdefault("window_pattern", "L")  # nanochat's own rule: checkpoints from before windows were full
    unknown = sorted(set(raw_cfg) - set(NANOCHAT_CONFIG_KEYS))
    missing = sorted(set(NANOCHAT_CONFIG_KEYS) - set(raw_cfg))
    if unknown or missing:
        raise UserError(f"{ckpt_dir / meta_file(n)} has a model_config this converter does not know (unknown: "
                        f"{', '.join(unknown) or '-'}; missing: {', '.join(missing) or '-'}); import a checkpoint "
                        "of nanochat's current GPT")
    try:
        cfg = GPTConfig(**raw_cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"{ckpt_dir / meta_file(n)} has an invalid model_config ({e}); import another checkpoint") \
            from None
    _check_gate_widths(cfg.n_embd)
    note = _window_note(cfg, "import", allow_window_change)

    try:
        raw = torch.load(ckpt_dir / model_file(n), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises anything from EOFError to UnpicklingError
        raise UserError(f"{ckpt_dir / model_file(n)} is unreadable ({type(e).__name__}); copy it again from the "
                        "nanochat run") from None
    state = {k.removeprefix("_orig_mod."): (v.float() if v.is_floating_point() else v) for k, v in raw.items()}
    with torch.device("meta"):
        model = GPT(cfg, pad_vocab_size_to=NANOCHAT_PAD_VOCAB_TO)
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise UserError(f"{ckpt_dir / model_file(n)} does not fit nanochat's current GPT (first mismatch: {bad[0]}); "
                        "import a checkpoint of nanochat's current architecture")

    tok = Tokenizer.load(src / TOKENIZER_DIR)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer in {src / TOKENIZER_DIR} has {tok.vocab_size} tokens and the model "
                        f"{cfg.vocab_size}; copy the tokenizer/ of the nanochat run that trained it")
    tok_dir = paths.tokenizer_dir(base_dir)
    if (tok_dir / "tokenizer.pkl").exists():
        have = Tokenizer.load(tok_dir)
        if have.fingerprint != tok.fingerprint:
            raise UserError(f"{tok_dir} already holds another tokenizer (fingerprint {have.fingerprint}, nanochat's "
                            f"is {tok.fingerprint}); import into a fresh --base-dir")
    else:
        Tokenizer(tok.pattern, tok.mergeable_ranks, tok.special_tokens, {"imported_from": str(src)}).save(tok_dir)

    out_dir = paths.checkpoint_dir(model_tag, base_dir)
    if list_steps(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints; import under another --model-tag")
    user_config = nc_meta.get("user_config") or {}
    meta = {
        "model_config": dataclasses.asdict(cfg),
        "train_config": _train_config_for(cfg, user_config),
        "weights_only": True,
        "val_bpb": nc_meta.get("val_bpb"),
        "tokenizer_fingerprint": tok.fingerprint,
        "data_fingerprint": None,
        "optim_sharded": False,
        "imported_from": {"format": "nanochat", "path": str(ckpt_dir), "model_tag": tag, "step": n,
                          "user_config": user_config, **(note or {})},
    }
    return save_checkpoint(out_dir, n, state, None, meta)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


__all__ = ["export_nanochat", "find_nanochat_checkpoint", "import_nanochat", "nanochat_lookbacks",
           "nanochat_short_lookback", "nanotrain_lookbacks", "window_differences"]
