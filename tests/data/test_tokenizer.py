"""Tokenizer: training at a tiny vocabulary, special tokens, round trips, batching, token_bytes, save/load."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from nanotrain.data.cli import main
from nanotrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer
from nanotrain.errors import UserError

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog 1234567.",
    "naïve café — 日本語のテキスト, emoji 🎉 and tabs\tand\r\nnewlines\n\n",
    "literal special text <|bos|> stays ordinary",
    "",
]


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 512
    assert tokenizer.get_special_tokens() == SPECIAL_TOKENS
    # byte tokens and merges first, then the special tokens, <|bos|> first of them
    assert tokenizer.bos_token_id == 512 - len(SPECIAL_TOKENS)
    assert [tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(503, 512))
    with pytest.raises(ValueError, match="unknown special token"):
        tokenizer.encode_special("<|nope|>")


def test_roundtrip_and_batching(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.bos_token_id for i in ids)  # no special token from ordinary text
        assert tokenizer.decode(ids) == text
    batch = tokenizer.encode(TEXTS, prepend="<|bos|>", append="<|assistant_end|>", num_threads=2)
    bos, end = tokenizer.bos_token_id, tokenizer.encode_special("<|assistant_end|>")
    assert batch == [[bos] + tokenizer.encode(t) + [end] for t in TEXTS]
    assert tokenizer.encode("abc", prepend=bos) == [bos] + tokenizer.encode("abc")
    assert len(tokenizer.encode("the the the the")) < len("the the the the")  # merges were learned
    with pytest.raises(TypeError):
        tokenizer.encode(123)


def test_token_bytes(tokenizer):
    tb = tokenizer.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tokenizer.vocab_size,)
    for i in range(tokenizer.vocab_size):
        expected = 0 if i >= tokenizer.bos_token_id else len(tokenizer.enc.decode_single_token_bytes(i))
        assert tb[i].item() == expected
    assert tb[:256].eq(1).all() and tb[256:503].ge(2).all()
    for text in TEXTS:  # the bytes of a text are the sum of its tokens' byte lengths (what bpb relies on)
        ids = torch.tensor(tokenizer.encode(text, prepend="<|bos|>"), dtype=torch.long)
        assert tb[ids].sum().item() == len(text.encode("utf-8"))


def test_save_load(tokenizer, tmp_path):
    d = tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(d)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.meta["training_shards"] == tokenizer.meta["training_shards"]
    assert torch.equal(torch.load(d / "token_bytes.pt"), tokenizer.token_bytes())
    meta = json.loads((d / "tokenizer.json").read_text())
    assert meta["vocab_size"] == 512 and meta["fingerprint"] == tokenizer.fingerprint
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
    other = train_tokenizer(["zzz yyy xxx " * 50, "another text entirely"], 300)
    assert other.fingerprint != tokenizer.fingerprint


def test_missing_and_bad_vocab(tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer in .*; run `nanotrain-data tokenizer` first"):
        Tokenizer.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["abc"], 200)


def test_cli_tokenizer(corpus_dir, capsys):
    base, docs = corpus_dir
    assert main(["tokenizer", "--base-dir", str(base), "--vocab-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "vocab 512" in out
    tok = load_tokenizer(base)
    assert tok.vocab_size == 512
    assert [n for n, _ in tok.meta["training_shards"]] == [f"shard_0000{i}.parquet" for i in range(4)]
    ratio = float(out.split(" bytes/token")[0].rsplit(" ", 1)[1])
    val = docs[-24:]  # the validation shard holds the last 24 documents
    expected = sum(len(t.encode()) for t in val) / sum(len(tok.encode(t)) for t in val)
    assert ratio == pytest.approx(expected, abs=0.01) and ratio > 1.5


def test_loads_nanochat_pickled_encoding(tokenizer, tmp_path):
    """nanochat saves its tokenizer as a pickled tiktoken.Encoding; such a directory loads too."""
    d = tmp_path / "nanochat_tok"
    d.mkdir()
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.enc, f)
    loaded = Tokenizer.load(d)
    assert loaded.fingerprint == tokenizer.fingerprint and loaded.bos_token_id == tokenizer.bos_token_id
    (d / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="is unreadable"):
        Tokenizer.load(d)


@pytest.mark.parametrize("damage", ["duplicate_rank", "huge_rank", "special_clash", "str_keys"])
def test_damaged_pickle_is_a_user_error(tokenizer, tmp_path, damage):
    """A tokenizer.pkl whose ranks are not distinct token ids made tiktoken panic (a Rust PanicException,
    which is no Exception) or raised OverflowError: now the same one-line error as any unreadable file."""
    d = tokenizer.save(tmp_path / "tok")
    ranks, specials = dict(tokenizer.mergeable_ranks), dict(tokenizer.special_tokens)
    if damage == "duplicate_rank":
        ranks[b"ab"] = ranks[b"a"]
    elif damage == "huge_rank":
        ranks[b"ab"] = 2 ** 40
    elif damage == "special_clash":
        specials["<|user_start|>"] = 3
    else:
        ranks = {k.decode("latin-1"): v for k, v in ranks.items()}
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": tokenizer.pattern, "mergeable_ranks": ranks, "special_tokens": specials}, f)
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"is unreadable .*run `nanotrain-data tokenizer` again"):
        Tokenizer.load(d)
