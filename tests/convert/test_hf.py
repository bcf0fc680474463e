"""export-hf: transformers loads the folder and computes what nanotrain computes (logits, greedy tokens, token
ids); --push-to-hub uploads it with huggingface_hub's real client to a stand-in Hub on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanotrain.convert import cli  # noqa: E402
from nanotrain.convert.hf import build_hf_tokenizer  # noqa: E402
from nanotrain.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer  # noqa: E402
from nanotrain.eval.engine import Engine  # noqa: E402
from tests.local_http import LocalHTTPServer, QuietHandler  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(src_base, tmp_path_factory):
    base, _ = src_base
    out = tmp_path_factory.mktemp("hf")
    assert cli.main(["export-hf", "--model-tag", "tiny", "--base-dir", str(base), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True)
    return model.eval()


def test_export_files(src_base, hf_dir):
    base, model = src_base
    names = {p.name for p in hf_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_nanotrain.py", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    weights = load_file(str(hf_dir / "model.safetensors"))
    state = model.state_dict()
    assert sorted(weights) == sorted(state)
    for k, v in weights.items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k]), k
    config = json.loads((hf_dir / "config.json").read_text())
    tok = load_tokenizer(base)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanotrain.NanotrainForCausalLM"
    assert config["attention_windows"] == [129, 129, None]  # nanotrain's S window: 256 // 2 + 1 keys
    assert config["vocab_size"] == tok.vocab_size and config["padded_vocab_size"] == model.padded_vocab_size
    assert config["bos_token_id"] == config["eos_token_id"] == tok.bos_token_id
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == tok.bos_token_id and "pad_token_id" not in gen


def test_export_refuses_to_overwrite(src_base, hf_dir, capsys):
    base, _ = src_base
    before = (hf_dir / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["export-hf", "--model-tag", "tiny", "--base-dir", str(base), "--out", str(hf_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == before


def test_logits_equal_nanotrains(src_base, hf_model):
    _, model = src_base
    idx = torch.randint(0, model.config.vocab_size, (2, 200))  # past the 129-key short windows
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-5
    with torch.no_grad():  # transformers' labels convention (shifted inside) gives nanotrain's next-token loss
        loss = hf_model(idx, labels=idx).loss
        assert abs(loss.item() - model(idx[:, :-1], idx[:, 1:]).item()) <= 1e-5
    # the window is part of the computation: a full-context layer 0 gives other logits
    hf_model.transformer.h[0].attn.window = None
    try:
        with torch.no_grad():
            assert (hf_model(idx).logits - ours).abs().max().item() > 1e-3
    finally:
        hf_model.transformer.h[0].attn.window = 129


def test_greedy_generation_matches_the_engine(src_base, hf_dir, hf_model):
    base, model = src_base
    tok = load_tokenizer(base)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    engine = Engine(model, tok)
    for prompt in ("The red cat", "The old cat writes 7 letters to", "river"):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == tok.encode(prompt, prepend=tok.bos_token_id)
        expected = engine.generate_batch(ids[0].tolist(), num_samples=1, max_tokens=150, temperature=0.0)[0]
        out = hf_model.generate(ids, max_new_tokens=150, do_sample=False)[0, ids.shape[1]:].tolist()
        if tok.bos_token_id in out:  # transformers stops at EOS (= BOS), the engine before it
            out = out[:out.index(tok.bos_token_id)]
        assert out == expected, prompt
        assert len(ids[0]) + len(out) > 129 or tok.bos_token_id in expected  # the decode crossed the window


def test_cached_decoding_logits_equal_full_forward(src_base, hf_model):
    """Every step of transformers' cached generation (one new token, the previous one passed for smear) gives the
    logits nanotrain computes for that position over the whole sequence."""
    _, model = src_base
    prompt = torch.randint(0, model.config.vocab_size, (1, 20))
    gen = hf_model.generate(prompt, max_new_tokens=130, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, eos_token_id=None)
    seq = gen.sequences
    assert seq.shape[1] == 150
    with torch.no_grad():
        full = model(seq)[0]
    steps = torch.stack([s[0] for s in gen.logits])          # (130, V): logits for positions 19 .. 148
    assert (steps - full[19:149]).abs().max().item() <= 1e-4


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """ASCII prose, accents, CJK, emoji, RTL, combining marks, digit runs, whitespace runs, code, contractions."""
    rng = random.Random(seed)
    words = ["the", "The", "cat", "river", "naïve", "café", "Straße", "日本語", "中文", "한국어", "Привет", "مرحبا",
             "שלום", "🙂", "👍🏽", "e\u0301", "x²", "Ω", "don't", "I'LL", "we've", "you'RE", "O'Neil"]
    pieces = ["    ", "\t", "\n", "\r\n", "\n\n\n", "  \n ", " ", "", "12", "3.14159", "2026-12-02", "1,000,000",
              "0x1F", "def f(x):\n    return x**2\n", "if (a && b) { c++; }", "<|bos x|>", "#include <stdio.h>",
              "SELECT * FROM t;", "a=b+c", "...", "!!!", "«quoted»", "—", "\u00a0", "\u200b", "    # comment",
              "'s", "'t", "\\n", "https://example.com/a?b=c"]
    out = []
    for i in range(n):
        parts = [rng.choice(words + pieces) for _ in range(rng.randint(1, 12))]
        joiner = rng.choice([" ", "", "\n", "  ", "\t"])
        s = joiner.join(parts)
        if i % 7 == 0:
            s = " " + s + "   "
        if i % 11 == 0:
            s = str(rng.randint(0, 10 ** rng.randint(1, 12)))
        out.append(s)
    return out


def test_tokenization_identical_on_varied_strings():
    """A tokenizer trained on varied text (merges across scripts, digits, whitespace and code) encodes and decodes
    the same through transformers' tokenizers as through nanotrain (tiktoken)."""
    import tokenizers

    corpus = varied_strings(3000, seed=1) + [" ".join(varied_strings(20, seed=s)) for s in range(200)]
    tok = train_tokenizer(corpus, vocab_size=1200)
    assert tok.vocab_size > 900  # enough merges to matter
    hf = tokenizers.Tokenizer.from_str(build_hf_tokenizer(tok).to_str())  # through its JSON form
    strings = varied_strings(400, seed=2)
    for s in strings:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False).ids == ids, repr(s)
        assert hf.encode(s).ids == [tok.bos_token_id] + ids
        assert hf.decode(ids) == tok.decode(ids)
    assert [hf.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.special_tokens[t] for t in SPECIAL_TOKENS]
    # the one stated difference: special-token text is a special token for transformers, plain text for nanotrain
    assert hf.encode("a<|bos|>b", add_special_tokens=False).ids == tok.encode("a") + [tok.bos_token_id] + \
        tok.encode("b")
    assert tok.bos_token_id not in tok.encode("a<|bos|>b")


def test_tokenizer_loads_with_autotokenizer(src_base, hf_dir):
    base, _ = src_base
    tok = load_tokenizer(base)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    assert hf_tok.bos_token == "<|bos|>" and hf_tok.bos_token_id == tok.bos_token_id
    assert hf_tok.eos_token_id == tok.bos_token_id
    for s in varied_strings(100, seed=3):
        assert hf_tok(s).input_ids == [tok.bos_token_id] + tok.encode(s), repr(s)
        assert hf_tok(s, add_special_tokens=False).input_ids == tok.encode(s)


class FakeHub:
    """The Hub endpoints an upload of small files uses: create the repo, check the model card's YAML header, ask how
    to upload each file (we answer "regular": inline in the commit), and the commit (NDJSON, base64 contents)."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []
        self.auth: set[str] = set()
        self.cards: list[str] = []
        hub = self

        class Handler(QuietHandler):
            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(404, {"error": "not here"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.auth.add(self.headers.get("Authorization", ""))
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    hub.repos.append(req)
                    self._send(200, {"url": f"{hub.endpoint}/{req['organization']}/{req['name']}"})
                elif self.path == "/api/validate-yaml":
                    hub.cards.append(json.loads(body)["content"])
                    self._send(200, {})
                elif self.path == "/api/models/me/tiny-nanotrain/preupload/main":
                    req = json.loads(body)
                    self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in req["files"]]})
                elif self.path == "/api/models/me/tiny-nanotrain/commit/main":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commits.append(item["value"]["summary"])
                        elif item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    self._send(200, {"commitUrl": f"{hub.endpoint}/me/tiny-nanotrain/commit/{'a' * 40}",
                                     "commitOid": "a" * 40})
                else:
                    self._send(404, {"error": f"unknown endpoint {self.path}"})

        self.server = LocalHTTPServer(Handler)
        self.endpoint = ""


def test_push_to_hub_uploads_the_folder(src_base, tmp_path, monkeypatch, capsys):
    base, _ = src_base
    hub = FakeHub()
    with hub.server:
        hub.endpoint = hub.server.address("")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)  # read from HF_ENDPOINT at import time
        out = tmp_path / "hf"
        assert cli.main(["export-hf", "--model-tag", "tiny", "--base-dir", str(base), "--out", str(out),
                         "--push-to-hub", "me/tiny-nanotrain"]) == 0
    assert "uploaded it to me/tiny-nanotrain" in capsys.readouterr().out
    assert [(r["organization"], r["name"]) for r in hub.repos] == [("me", "tiny-nanotrain")]
    assert hub.commits == ["Upload nanotrain base model"]
    assert "Bearer hf_test_token" in hub.auth
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hub.files == local
    assert hub.cards and "library_name: transformers" in hub.cards[0]


def test_push_failure_is_one_line(src_base, tmp_path, monkeypatch, capsys):
    base, _ = src_base
    hub = FakeHub()
    with hub.server:
        hub.endpoint = hub.server.address("")
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        rc = cli.main(["export-hf", "--model-tag", "tiny", "--base-dir", str(base), "--out", str(tmp_path / "hf"),
                       "--push-to-hub", "me/other-name"])  # the stand-in knows no such repo
    err = capsys.readouterr().err
    assert rc == 2 and "could not upload to me/other-name" in err and len(err.strip().splitlines()) == 1
