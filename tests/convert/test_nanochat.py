"""nanotrain <-> nanochat base checkpoints: the layout nanochat's loader reads, and lossless round trips.

The expected layout below is written out from reading nanochat's checkpoint_manager.py, gpt.py, tokenizer.py and
tok_train.py (not derived from nanotrain's own state dict), so a renamed key, a changed shape or a missing meta
field fails here. test_nanochat_loads_export runs nanochat's own loader when NANOCHAT_SRC points to a checkout.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nanotrain import paths
from nanotrain.checkpoint import list_steps, load_checkpoint
from nanotrain.convert import cli
from nanotrain.convert.nanochat import nanochat_short_lookback, window_differences
from nanotrain.data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from nanotrain.eval.loading import load_model
from nanotrain.model import GPT, GPTConfig
from tests.convert.tiny_model import TINY, save_tiny, train_tiny


def expected_nanochat_state(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of nanochat's GPT for a config (its gpt.py, read by hand)."""
    V = -(-cfg.vocab_size // 64) * 64
    C, D = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head * D
    out = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C), "resid_lambdas": (cfg.n_layer,),
           "x0_lambdas": (cfg.n_layer,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        out.update({p + "attn.c_q.weight": (cfg.n_head * D, C), p + "attn.c_k.weight": (kv, C),
                    p + "attn.c_v.weight": (kv, C), p + "attn.c_proj.weight": (C, C),
                    p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)})
        if i % 2 == (cfg.n_layer - 1) % 2:  # value embeddings: alternating layers, the last one included
            out[p + "attn.ve_gate.weight"] = (cfg.n_kv_head, 12)
            out[f"value_embeds.{i}.weight"] = (V, kv)
    return out


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def exported(src_base, tmp_path_factory):
    base, model = src_base
    out = tmp_path_factory.mktemp("nanochat_out")
    assert run_cli("export-nanochat", "--model-tag", "tiny", "--base-dir", base, "--out", out) == 0
    return out


def test_short_window_rules():
    # nanochat: a quarter of the context, rounded up to a multiple of 128 (its comment says 2048 -> 768; its
    # expression -(-2048 // 4 // 128) * 128 evaluates to 512)
    assert nanochat_short_lookback(2048) == 512
    assert nanochat_short_lookback(2000) == 512 and nanochat_short_lookback(2056) == 640
    assert nanochat_short_lookback(256) == 128
    assert nanochat_short_lookback(64) == 128
    # nanotrain looks back seq_len // 2: equal at 256, different at 2048 (1024 vs 512) and 64 (32 vs the whole 63)
    assert window_differences(GPTConfig(sequence_len=256, n_layer=3, window_pattern="SSL")) == []
    assert len(window_differences(GPTConfig(sequence_len=2048, n_layer=4, window_pattern="SSSL"))) == 3
    assert len(window_differences(GPTConfig(sequence_len=64, n_layer=2, window_pattern="SL"))) == 1
    assert window_differences(GPTConfig(sequence_len=2048, n_layer=4, window_pattern="L")) == []


def test_export_matches_nanochat_layout(src_base, exported):
    base, model = src_base
    cfg = model.config
    ckpt_dir = exported / "base_checkpoints" / "tiny"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["meta_000006.json", "model_000006.pt"]
    state = torch.load(ckpt_dir / "model_000006.pt", map_location="cpu", weights_only=True)
    expected = expected_nanochat_state(cfg)
    assert sorted(state) == sorted(expected)
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
        assert state[name].dtype == torch.float32, name
    assert torch.equal(state["transformer.h.0.attn.c_q.weight"], model.transformer.h[0].attn.c_q.weight)

    meta = json.loads((ckpt_dir / "meta_000006.json").read_text())
    # what nanochat reads: build_model -> GPTConfig(**model_config); base_eval -> model_config.sequence_len, step;
    # chat_sft -> max_seq_len, device_batch_size, total_batch_size and user_config's learning rates
    assert meta["model_config"] == {"sequence_len": 256, "vocab_size": cfg.vocab_size, "n_layer": 3, "n_head": 2,
                                    "n_kv_head": 1, "n_embd": 64, "window_pattern": "SSL"}
    assert meta["step"] == 6 and meta["val_bpb"] == 2.5
    assert meta["max_seq_len"] == 256 and meta["device_batch_size"] == 4 and meta["total_batch_size"] == 1024
    assert meta["user_config"]["matrix_lr"] == 0.02 and meta["user_config"]["embedding_lr"] == 0.3
    assert meta["exported_from"]["embeddings_dtype"] == "float32"

    tok = load_tokenizer(base)
    with open(exported / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # nanochat's RustBPETokenizer.from_directory: a pickled tiktoken.Encoding
    import tiktoken

    assert isinstance(enc, tiktoken.Encoding)
    text = "The quick brown fox, 12345 times.\n  Done!"
    assert enc.encode_ordinary(text) == tok.encode(text)
    assert enc.encode_single_token("<|bos|>") == tok.bos_token_id
    assert [enc.encode_single_token(s) for s in SPECIAL_TOKENS] == [tok.special_tokens[s] for s in SPECIAL_TOKENS]
    token_bytes = torch.load(exported / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (enc.n_vocab,)
    assert all(token_bytes[tok.special_tokens[s]] == 0 for s in SPECIAL_TOKENS)
    assert token_bytes[tok.encode("The")[0]] == len(enc.decode_single_token_bytes(tok.encode("The")[0]))


def test_round_trip_gives_identical_logits_and_a_weights_only_checkpoint(src_base, exported, tmp_path):
    base, model = src_base
    dest = tmp_path / "dest"
    assert run_cli("import-nanochat", exported, "--model-tag", "back", "--base-dir", dest) == 0
    back, tok, meta = load_model("back", base_dir=dest)
    idx = torch.randint(0, model.config.vocab_size, (2, 200))  # longer than the 129-key short windows
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    assert meta["weights_only"] is True and meta["step"] == 6
    assert meta["imported_from"]["format"] == "nanochat" and meta["imported_from"]["step"] == 6
    assert tok.fingerprint == load_tokenizer(base).fingerprint
    ckpt = load_checkpoint(paths.checkpoint_dir("back", dest), load_optim=True)
    assert ckpt.optim_state is None and ckpt.rank_state is None and "loop_state" not in ckpt.meta
    # the shape options that rebuild the model (a resume compares them)
    # (3 x 21 rounded up to a multiple of 32 is 64: the trainer's model_shape rebuilds n_embd 64 with 2 heads)
    assert meta["train_config"] == {"depth": 3, "max_seq_len": 256, "window_pattern": "SSL", "aspect_ratio": 21,
                                    "head_dim": 32}
    # importing again under the same tag is refused
    assert run_cli("import-nanochat", exported, "--model-tag", "back", "--base-dir", dest) == 2


def test_nanotrain_eval_evaluates_the_import(src_base, exported, tmp_path, monkeypatch):
    from nanotrain.eval import cli as eval_cli

    base, _ = src_base
    dest = tmp_path / "dest"
    assert run_cli("import-nanochat", exported, "--model-tag", "imp", "--base-dir", dest) == 0
    shutil.copytree(paths.data_dir(base), paths.data_dir(dest))
    reports = []
    for b, tag in ((base, "tiny"), (dest, "imp")):
        out = tmp_path / f"{tag}.json"
        assert eval_cli.main(["--model-tag", tag, "--base-dir", str(b), "--device-type", "cpu", "--eval",
                              "bpb,sample", "--eval-tokens", "1024", "--device-batch-size", "2", "--max-tokens", "4",
                              "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[1]["step"] == 6
    assert reports[1]["val_bpb"] == reports[0]["val_bpb"]  # the same weights on the same data
    assert reports[1]["samples"] == reports[0]["samples"]


def test_bf16_embeddings_option(src_base, tmp_path):
    base, model = src_base
    out = tmp_path / "nc"
    assert run_cli("export-nanochat", "--model-tag", "tiny", "--base-dir", base, "--out", out,
                   "--embeddings-bf16") == 0
    state = torch.load(out / "base_checkpoints/tiny/model_000006.pt", weights_only=True)
    bf16 = sorted(k for k, v in state.items() if v.dtype == torch.bfloat16)
    assert bf16 == ["transformer.wte.weight", "value_embeds.0.weight", "value_embeds.2.weight"]
    assert run_cli("import-nanochat", out, "--model-tag", "b", "--base-dir", tmp_path / "d") == 0
    back, _, _ = load_model("b", base_dir=tmp_path / "d")
    assert back.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(back.transformer.wte.weight, model.transformer.wte.weight.to(torch.bfloat16).float())


def test_window_difference_is_refused_unless_allowed(src_base, tmp_path, capsys):
    base, _ = src_base
    tok = load_tokenizer(base)
    model = train_tiny(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                                 n_embd=32, window_pattern="SL"), tok, steps=2)
    save_tiny(base, "short", model, tok, step=2)
    out = tmp_path / "nc"
    assert run_cli("export-nanochat", "--model-tag", "short", "--base-dir", base, "--out", out) == 2
    err = capsys.readouterr().err
    assert "--allow-window-change" in err and "layer 0" in err and len(err.strip().splitlines()) == 1
    assert not (out / "base_checkpoints").exists()
    assert run_cli("export-nanochat", "--model-tag", "short", "--base-dir", base, "--out", out,
                   "--allow-window-change") == 0
    meta = json.loads((out / "base_checkpoints/short/meta_000002.json").read_text())
    assert meta["exported_from"]["window_change"] == ["layer 0: nanotrain looks back 32 tokens, nanochat 128"]
    # the same difference on the way in
    assert run_cli("import-nanochat", out, "--model-tag", "s", "--base-dir", tmp_path / "d") == 2
    assert "--allow-window-change" in capsys.readouterr().err
    assert run_cli("import-nanochat", out, "--model-tag", "s", "--base-dir", tmp_path / "d",
                   "--allow-window-change") == 0
    back, _, meta = load_model("s", base_dir=tmp_path / "d")
    assert meta["imported_from"]["window_change"]
    idx = torch.randint(0, tok.vocab_size, (1, 60))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


def test_import_refusals(src_base, exported, tmp_path, capsys):
    base, _ = src_base
    assert run_cli("import-nanochat", tmp_path / "nothing", "--model-tag", "x", "--base-dir", tmp_path / "d") == 2
    assert "not a nanochat base directory" in capsys.readouterr().err
    assert run_cli("import-nanochat", exported, "--model-tag", "x", "--step", "5", "--base-dir", tmp_path / "d") == 2
    assert "has no step 5" in capsys.readouterr().err
    # a base dir whose tokenizer is another one: refused before anything is written
    other = tmp_path / "other"
    from nanotrain.data.tokenizer import train_tokenizer

    train_tokenizer(["some other text entirely"] * 20, vocab_size=270).save(paths.tokenizer_dir(other))
    assert run_cli("import-nanochat", exported, "--model-tag", "x", "--base-dir", other) == 2
    assert "already holds another tokenizer" in capsys.readouterr().err
    assert list_steps(paths.checkpoint_dir("x", other)) == []
    # a state dict that is not nanochat's GPT
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    f = bad / "base_checkpoints/tiny/model_000006.pt"
    state = torch.load(f, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, f)
    assert run_cli("import-nanochat", bad, "--model-tag", "x", "--base-dir", tmp_path / "d2") == 2
    assert "extra.weight" in capsys.readouterr().err


NANOCHAT_SRC = os.environ.get("NANOCHAT_SRC")


@pytest.mark.skipif(not NANOCHAT_SRC, reason="set NANOCHAT_SRC to a nanochat checkout to run nanochat's own loader")
def test_nanochat_loads_export(src_base, exported, tmp_path):
    """nanochat's checkpoint_manager.load_model builds its GPT from the export; its logits equal nanotrain's."""
    base, model = src_base
    idx = torch.randint(0, model.config.vocab_size, (2, 200))
    torch.save(idx, tmp_path / "idx.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {NANOCHAT_SRC!r})
        from nanochat.checkpoint_manager import load_model
        model, tok, meta = load_model("base", torch.device("cpu"), phase="eval", model_tag="tiny", step=6)
        idx = torch.load({str(tmp_path / 'idx.pt')!r})
        with torch.no_grad():
            torch.save(model(idx), {str(tmp_path / 'logits.pt')!r})
        print(meta["step"], tok.get_bos_token_id(), tok.encode("The quick brown fox"))
    """)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(exported), NANOCHAT_DTYPE="float32")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    step, bos, ids = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    tok = load_tokenizer(base)
    assert int(step) == 6 and int(bos) == tok.bos_token_id and json.loads(ids) == tok.encode("The quick brown fox")
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ours = model(idx)
    assert (theirs - ours).abs().max().item() <= 1e-5


@pytest.mark.skipif(not NANOCHAT_SRC, reason="set NANOCHAT_SRC to a nanochat checkout to run nanochat's own code")
def test_import_of_a_checkpoint_nanochat_wrote(src_base, exported, tmp_path):
    """nanochat's GPT (its own init, scalars moved off their inits) saved by nanochat's save_checkpoint imports into
    nanotrain with logits equal to nanochat's forward."""
    base, model = src_base
    nc_base = tmp_path / "nanochat_base"
    shutil.copytree(exported / "tokenizer", nc_base / "tokenizer")  # a tokenizer in nanochat's format
    idx = torch.randint(0, model.config.vocab_size, (2, 200))
    torch.save(idx, tmp_path / "idx.pt")
    cfg = dict(sequence_len=256, vocab_size=model.config.vocab_size, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
               window_pattern="SSL")
    script = textwrap.dedent(f"""
        import sys, os, torch
        sys.path.insert(0, {NANOCHAT_SRC!r})
        from nanochat.gpt import GPT, GPTConfig
        from nanochat.checkpoint_manager import save_checkpoint
        torch.manual_seed(3)
        config = GPTConfig(**{cfg!r})
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))   # output projections start at zero: give every path weight
        ckpt = os.path.join({str(nc_base)!r}, "base_checkpoints", "d3")
        save_checkpoint(ckpt, 40, model.state_dict(), None, {{"step": 40, "model_config": {cfg!r}, "val_bpb": 1.5}})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'idx.pt')!r})), {str(tmp_path / 'logits.pt')!r})
    """)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(nc_base), NANOCHAT_DTYPE="float32")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dest = tmp_path / "dest"
    assert run_cli("import-nanochat", nc_base, "--model-tag", "from-nanochat", "--base-dir", dest) == 0
    imported, _, meta = load_model("from-nanochat", base_dir=dest)
    assert meta["step"] == 40 and meta["val_bpb"] == 1.5 and meta["imported_from"]["model_tag"] == "d3"
    with torch.no_grad():
        ours = imported(idx)
    assert (ours - torch.load(tmp_path / "logits.pt")).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kv_heads", [TINY["n_head"], TINY["n_kv_head"]], ids=["mha", "gqa"])
def test_training_continues_from_an_import(src_base, tmp_path, capsys, kv_heads):
    """`nanotrain --resume-from-step=latest` on an imported (weights-only) checkpoint starts a new schedule from
    its weights: the optimizer, data stream and loop state start fresh, the model is the import's, GQA included
    (the trainer builds MHA models, and takes an import's key/value heads from its checkpoint)."""
    from nanotrain import train

    base, _ = src_base
    tok = load_tokenizer(base)
    cfg = GPTConfig(vocab_size=tok.vocab_size, **dict(TINY, n_kv_head=kv_heads))
    model = train_tiny(cfg, tok, seed=3)
    src = tmp_path / "src"
    shutil.copytree(base, src)
    shutil.rmtree(paths.checkpoint_dir("tiny", src))
    save_tiny(src, "mha", model, tok, step=6)
    out, dest = tmp_path / "nanochat", tmp_path / "dest"
    assert run_cli("export-nanochat", "--model-tag", "mha", "--base-dir", src, "--out", out) == 0
    assert run_cli("import-nanochat", out, "--model-tag", "imp", "--base-dir", dest) == 0
    shutil.copytree(paths.data_dir(base), paths.data_dir(dest))
    opts = ["--device-type=cpu", "--depth=3", "--aspect-ratio=21", "--head-dim=32", "--max-seq-len=256",
            "--window-pattern=SSL", "--device-batch-size=2", "--total-batch-size=512", "--eval-every=-1",
            "--core-metric-every=-1", "--sample-every=-1", "--compile=off", f"--base-dir={dest}", "--model-tag=imp",
            "--resume-from-step=latest"]
    capsys.readouterr()
    # a horizon reaching the imported step would save over it: refused
    assert train.main([*opts, "--num-iterations=6"]) == 2
    assert "would save over" in capsys.readouterr().err
    assert train.main([*opts, "--num-iterations=1"]) == 0
    out = capsys.readouterr().out
    assert "a weights-only checkpoint: the optimizer, the data stream and the LR schedule start fresh" in out
    assert f"'n_kv_head': {kv_heads}," in out  # the model trained is the import's shape
    after = load_checkpoint(paths.checkpoint_dir("imp", dest), 1, load_optim=False).model_state
    imported = model.state_dict()
    # one small step from the import: far closer to it than the import is to a re-initialized model
    with torch.device("meta"):
        init = GPT(cfg)
    init.to_empty(device="cpu")
    torch.manual_seed(42)
    init.init_weights()

    def dist(a, b):
        return sum((a[k].float() - b[k].float()).norm() ** 2 for k in b if k in a) ** 0.5
    assert dist(after, imported) < 0.2 * dist(init.state_dict(), imported)
    assert load_checkpoint(paths.checkpoint_dir("imp", dest), 6, load_optim=False).meta["weights_only"] is True
