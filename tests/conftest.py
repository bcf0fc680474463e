"""Test setup: Triton runs under its interpreter on machines without CUDA (set before any import of
triton), and `gpu`-marked tests are skipped where there is no CUDA device."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Each test draws its own random inputs, reproducibly within the test."""
    torch.manual_seed(1234)
    yield


# ------------------------------------------------------------------------------------------
# A tiny corpus and tokenizer, made once per session, for tests that train or evaluate.

_WORDS = {
    "adj": "small red quiet old bright heavy green happy cold soft".split(),
    "noun": "cat river engine garden teacher planet window kernel market violin".split(),
    "verb": "watches follows builds paints carries finds moves opens writes hears".split(),
    "adv": "slowly often quietly today again carefully".split(),
}


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of simple template sentences: learnable structure, so a tiny model's loss falls."""
    import random

    rng = random.Random(seed)
    pick = lambda kind: rng.choice(_WORDS[kind])  # noqa: E731
    docs = []
    for _ in range(n_docs):
        sentences = [f"The {pick('adj')} {pick('noun')} {pick('verb')} the {pick('adj')} {pick('noun')} {pick('adv')}."
                     for _ in range(rng.randint(3, 12))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A base dir with shards (train + val) of template text and a 512-token tokenizer."""
    from nanotrain.data import build as data_build
    from nanotrain.data.cli import main as data_main

    root = tmp_path_factory.mktemp("tiny_base")
    src = root / "src"
    src.mkdir()
    with open(src / "docs.jsonl", "w") as f:
        import json

        for doc in make_documents(1200):
            f.write(json.dumps({"text": doc}) + "\n")
    base = root / "base"
    data_build.build([src], base, docs_per_shard=400, log=lambda *_: None)
    assert data_main(["tokenizer", "--vocab-size", "512", "--base-dir", str(base)]) == 0
    return base
