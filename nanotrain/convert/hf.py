"""Hugging Face export: a folder that `transformers` loads with AutoModelForCausalLM and AutoTokenizer.

    out/model.safetensors          every parameter of the checkpoint, float32, nanotrain's names
    out/config.json                model_type "nanotrain", the shape, the per-layer attention windows, and an
                                   auto_map pointing at modeling_nanotrain.py (so trust_remote_code=True is needed)
    out/modeling_nanotrain.py      the architecture for transformers (a copy of nanotrain/convert/hf_modeling.py)
    out/generation_config.json     BOS = EOS = <|bos|> (a base model starts a new document with it); no PAD token:
                                   transformers would take every BOS of a prompt for padding
    out/tokenizer.json             our byte-level BPE as a `tokenizers` pipeline (see build_hf_tokenizer)
    out/tokenizer_config.json, special_tokens_map.json, README.md

The windows are written per layer as key counts (nanotrain's semantics, null = full), so the exported model
computes exactly what nanotrain's does; the transformers built-in "nanochat" type is not used because it
lacks value embeddings, smear, backout and the per-layer scalars.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nanotrain.errors import UserError

MODELING_FILE = "modeling_nanotrain.py"
WEIGHTS_FILE = "model.safetensors"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"export-hf needs the `{module}` package; install it with `pip install transformers "
                        "safetensors huggingface_hub`") from None


# ----------------------------------------------------------------------------------------------- tokenizer
def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet of GPT-2-style tokenizers: each byte as one printable unicode character.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes take the
    code points 256, 257, ... in byte order. `tokenizers`' ByteLevel pre-tokenizer and decoder use this map.
    """
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    kept = set(keep)
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_merges(mergeable_ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merge rules equivalent to tiktoken's rank-ordered BPE.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank, whichever way the
    token splits; so every split (a, b) of a token into two vocabulary entries is a rule, ordered by the rank
    of the token they form (and by split position within one token).
    """
    rules: list[tuple[int, int, bytes, bytes]] = []
    for tok, rank in mergeable_ranks.items():
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            if a in mergeable_ranks and b in mergeable_ranks:
                rules.append((rank, i, a, b))
    rules.sort()
    return [(a, b) for _, _, a, b in rules]


def build_hf_tokenizer(tok: Any):
    """A `tokenizers.Tokenizer` that encodes like nanotrain's tokenizer `tok` (BOS prepended by default).

    Same split regex (Split, isolated), byte-level alphabet, BPE with our merges and whole-piece lookup first
    (ignore_merges, as tiktoken does), the special tokens with their ids, and a post-processor that prepends
    <|bos|> (nanotrain prompts start with it). Special-token text inside a string is matched as a special token
    (transformers' usual behaviour; nanotrain's encode treats it as plain text).
    """
    tk = _require("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors

    from nanotrain.data.tokenizer import BOS

    alphabet = byte_to_char()
    spell = lambda bs: "".join(alphabet[x] for x in bs)  # noqa: E731
    vocab = {spell(t): r for t, r in tok.mergeable_ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in bpe_merges(tok.mergeable_ranks)]
    for name, tid in tok.special_tokens.items():
        vocab[name] = tid
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = tk.Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tk.Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([tk.AddedToken(name, special=True, normalized=False)
                           for name, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    bos_id = tok.special_tokens[BOS]
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                      special_tokens=[(BOS, bos_id)])
    for name, tid in tok.special_tokens.items():
        if hf.token_to_id(name) != tid:
            raise RuntimeError(f"special token {name} got id {hf.token_to_id(name)} instead of {tid}")
    return hf


# ----------------------------------------------------------------------------------------------- model
def hf_config(model: Any, bos_id: int) -> dict:
    """config.json for the exported model (read by modeling_nanotrain.NanotrainConfig)."""
    from nanotrain import model as gpt

    cfg = model.config
    return {
        "architectures": ["NanotrainForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_nanotrain.NanotrainConfig",
                     "AutoModelForCausalLM": "modeling_nanotrain.NanotrainForCausalLM"},
        "model_type": "nanotrain",
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": model.padded_vocab_size,
        "sequence_len": cfg.sequence_len,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_kv_head": cfg.n_kv_head,
        "n_embd": cfg.n_embd,
        "window_pattern": cfg.window_pattern,
        "attention_windows": list(model.window_sizes),
        "rope_base": gpt.ROPE_BASE,
        "logit_softcap": gpt.LOGIT_SOFTCAP,
        "qk_scale": gpt.QK_SCALE,
        "smear_channels": model.smear_channels,
        "ve_gate_channels": model.transformer.h[0].attn.ve_gate_channels,
        "ve_gate_range": gpt.VE_GATE_RANGE,
        "rotary_positions": model.rotary_seq_len,
        "bos_token_id": bos_id,
        "eos_token_id": bos_id,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def export_hf(model_tag: str, out: str | os.PathLike, step: int | str = "latest",
              base_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
              push_to_hub: str | None = None, private: bool = False) -> Path:
    """Write the Hugging Face folder for a checkpoint (see the module docstring); optionally upload it.

    push_to_hub: a repo id ("user/name"); created if missing and the folder uploaded with huggingface_hub's
    HfApi (token from HF_TOKEN or `hf auth login`, server from HF_ENDPOINT). Returns the folder.
    """
    from nanotrain.eval.loading import load_model

    safetensors_torch = _require("safetensors.torch")
    out = Path(out).expanduser()
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise UserError(f"{out / WEIGHTS_FILE} already exists; choose another --out or pass --overwrite")
    model, tokenizer, meta = load_model(model_tag, step, device="cpu", base_dir=base_dir)
    hf_tok = build_hf_tokenizer(tokenizer)
    bos = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(model, bos)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": bos, "do_sample": False})
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out / MODELING_FILE)
    hf_tok.save(str(out / "tokenizer.json"))
    from nanotrain.data.tokenizer import BOS

    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": BOS,
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "model_max_length": model.config.sequence_len,
        "additional_special_tokens": [t for t in tokenizer.special_tokens if t != BOS]})
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": BOS})
    step_n = meta.get("step")
    (out / "README.md").write_text(_model_card(model_tag, step_n, meta, config))
    if push_to_hub:
        push_folder(out, push_to_hub, private=private)
    return out


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo (if missing) and upload the folder in one commit; returns the commit URL."""
    hub = _require("huggingface_hub")
    api = hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload nanotrain base model")
    except Exception as e:  # network and auth failures surface as several exception types
        raise UserError(f"could not upload to {repo_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "check HF_TOKEN (or `hf auth login`) and the repo name, then upload the folder again with "
                        "--push-to-hub") from None
    return str(getattr(info, "commit_url", info))


def _model_card(model_tag: str, step: Any, meta: dict, config: dict) -> str:
    val = meta.get("val_bpb")
    lines = [
        "---", "library_name: transformers", "tags: [nanotrain, nanochat, base-model]", "---", "",
        f"# nanotrain base model `{model_tag}` (step {step})", "",
        f"A GPT base model trained with nanotrain: {config['n_layer']} layers, width {config['n_embd']}, "
        f"{config['n_head']} heads, context {config['sequence_len']}, vocabulary {config['vocab_size']}.",
    ]
    if isinstance(val, (int, float)):
        lines.append(f"Validation bits per byte at export: {val:.4f} (as recorded by the training run).")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
              "ids = tok('The capital of France is', return_tensors='pt').input_ids  # starts with <|bos|>",
              "print(tok.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0]))", "```", ""]
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


__all__ = ["bpe_merges", "build_hf_tokenizer", "byte_to_char", "export_hf", "hf_config", "push_folder"]
