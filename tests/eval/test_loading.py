"""load_model: a checkpoint rebuilt as a GPT in eval mode, its tokenizer checked, its weights read without
unpickling anything (model.safetensors), and older checkpoints (model.pt) still readable."""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import types

import pytest
import torch
import torch.nn as nn

from nanotrain.checkpoint import save_checkpoint
from nanotrain.errors import UserError
from nanotrain.eval.loading import load_model


def _meta(model_config: dict) -> dict:
    return {"model_config": model_config, "train_config": {"depth": 2}, "loop_state": {},
            "tokenizer_fingerprint": "tok0", "data_fingerprint": "data0"}


def _fake_modules(fingerprint: str) -> tuple[types.ModuleType, types.ModuleType]:
    @dataclasses.dataclass(frozen=True)
    class GPTConfig:
        vocab_size: int = 11
        n_embd: int = 8

    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.register_buffer("table", torch.empty(3), persistent=False)

        def init_weights(self):
            nn.init.normal_(self.wte.weight)
            self.table = torch.arange(3.0, device=self.wte.weight.device)

    model_mod = types.ModuleType("nanotrain.model")
    model_mod.GPT, model_mod.GPTConfig = GPT, GPTConfig
    tok_mod = types.ModuleType("nanotrain.data.tokenizer")
    tok_mod.load_tokenizer = lambda base_dir=None: types.SimpleNamespace(fingerprint=fingerprint, base_dir=base_dir)
    return model_mod, tok_mod


def test_load_model_with_stand_ins(tmp_path, monkeypatch):
    model_mod, tok_mod = _fake_modules("tok0")
    monkeypatch.setitem(sys.modules, "nanotrain.model", model_mod)
    monkeypatch.setitem(sys.modules, "nanotrain.data.tokenizer", tok_mod)
    trained = model_mod.GPT(model_mod.GPTConfig())
    trained.init_weights()
    d = tmp_path / "base_checkpoints" / "tiny"
    meta = _meta({"vocab_size": 11, "n_embd": 8})
    save_checkpoint(d, 4, trained.state_dict(), None, meta)
    model, tok, got_meta = load_model("tiny", "latest", base_dir=tmp_path)
    assert not model.training and got_meta["step"] == 4 and tok.fingerprint == "tok0"
    assert torch.equal(model.wte.weight, trained.wte.weight)
    assert torch.equal(model.table, torch.arange(3.0))

    _, other_tok = _fake_modules("tok9")
    monkeypatch.setitem(sys.modules, "nanotrain.data.tokenizer", other_tok)
    with pytest.raises(UserError, match=r"fingerprint tok9\) is not the one .* \(fingerprint tok0\)"):
        load_model("tiny", 4, base_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "nanotrain.data.tokenizer", tok_mod)
    save_checkpoint(d, 5, trained.state_dict(), None, _meta({"vocab_size": 11, "n_embd": 8, "n_experts": 4}))
    with pytest.raises(UserError, match=r"model options this nanotrain does not know \(n_experts\)"):
        load_model("tiny", 5, base_dir=tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint at .*other"):
        load_model("other", base_dir=tmp_path)


def _real_gpt(monkeypatch):
    gpt = pytest.importorskip("nanotrain.model")
    _, tok_mod = _fake_modules("tok0")
    monkeypatch.setitem(sys.modules, "nanotrain.data.tokenizer", tok_mod)
    cfg = gpt.GPTConfig(sequence_len=16, vocab_size=70, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                        window_pattern="SL")
    return cfg, gpt.build_model(cfg, "cpu")


def _assert_same_weights(model: nn.Module, trained: nn.Module) -> None:
    sd, ref = model.state_dict(), trained.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k].float()), k


def test_load_model_real_gpt_without_unpickling(tmp_path, monkeypatch):
    cfg, trained = _real_gpt(monkeypatch)
    d = tmp_path / "base_checkpoints" / "d2"
    save_checkpoint(d, 1, trained.state_dict(), {"m": torch.ones(2)}, _meta(dataclasses.asdict(cfg)),
                    rank_state={"pos": 1})

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called while loading a model for evaluation")

    monkeypatch.setattr(torch, "load", no_pickle)
    model, _, _ = load_model("d2", base_dir=tmp_path)
    assert not model.training
    _assert_same_weights(model, trained)


def test_load_model_from_a_checkpoint_with_model_pt(tmp_path, monkeypatch):
    """A checkpoint written before model.safetensors (its weights in model.pt) still evaluates."""
    cfg, trained = _real_gpt(monkeypatch)
    d = tmp_path / "base_checkpoints" / "d2"
    step = save_checkpoint(d, 1, trained.state_dict(), None, _meta(dataclasses.asdict(cfg)))
    (step / "model.safetensors").unlink()  # the same folder as the earlier format had it
    torch.save({k: v.float() for k, v in trained.state_dict().items()}, step / "model.pt")
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step.iterdir() if p.name != "CHECKSUMS"}
    (step / "CHECKSUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    model, _, meta = load_model("d2", base_dir=tmp_path)
    assert meta["step"] == 1
    _assert_same_weights(model, trained)
