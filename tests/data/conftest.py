"""Shared fixtures of the data tests: a tiny generated corpus, shards in a temporary base directory,
and a 512-token tokenizer trained on them. Every test points NANOTRAIN_BASE_DIR at tmp_path, so
nothing under ~/.cache is ever touched."""
from __future__ import annotations

import random

import pytest

from nanotrain.data import shards as S
from nanotrain.data.tokenizer import train_tokenizer

SYLLABLES = ["ka", "to", "ri", "ne", "mu", "sa", "lo", "ve", "pi", "da", "qu", "ez", "or", "an", "th", "ing", "é", "ß"]


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 400) -> list[str]:
    """n documents of made-up words, each starting with a unique tag "[doc N]" (lengths vary widely)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    docs = []
    for i in range(n):
        k = rng.randint(min_words, max_words)
        body = " ".join(rng.choice(words) for _ in range(k))
        docs.append(f"[doc {i}] {body}.\n")
    return docs


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_BASE_DIR", str(tmp_path / "default_base"))


@pytest.fixture
def corpus_dir(tmp_path):
    """A base directory with 240 documents: train shards of 60, 60, 60, 36 and a val shard of the last 24
    (row groups of 4 docs at most)."""
    base = tmp_path / "base"
    docs = make_docs(240)
    S.write_shards(docs, base, 60, {"source": "build"})
    return base, docs


@pytest.fixture
def tokenizer(corpus_dir):
    """A 512-token tokenizer trained on the corpus's training shards (its meta records them)."""
    base, _ = corpus_dir
    train = S.split_shards("train", base)
    sig = S.shard_signature(train)
    meta = {"training_shards": sig, "data_fingerprint": S.fingerprint_of(sig)}
    return train_tokenizer(S.iter_documents("train", base), 512, meta=meta)
