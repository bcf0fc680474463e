"""A small trained nanotrain checkpoint in its own base directory, for the conversion tests.

The model has every part the converters must carry: GQA (2 query heads, 1 key/value head), value embeddings
and their gates, short-window layers, smear, backout and the per-layer scalars, all moved away from their
initial values by a few optimizer steps (the output projections start at zero)."""
from __future__ import annotations

import shutil

import pytest

from nanotrain import paths
from nanotrain.data.tokenizer import load_tokenizer
from nanotrain.model import GPTConfig
from tests.convert.tiny_model import TINY, save_tiny, train_tiny
from tests.fixtures import one_thread

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)


@pytest.fixture(scope="module")
def src_base(tiny_base_dir, tmp_path_factory):
    """(base dir, trained model): checkpoint tag "tiny" at step 6, tokenizer and shards of tiny_base_dir."""
    base = tmp_path_factory.mktemp("convert_src")
    shutil.copytree(paths.tokenizer_dir(tiny_base_dir), paths.tokenizer_dir(base))
    shutil.copytree(paths.data_dir(tiny_base_dir), paths.data_dir(base))
    tok = load_tokenizer(base)
    model = train_tiny(GPTConfig(vocab_size=tok.vocab_size, **TINY), tok)
    save_tiny(base, "tiny", model, tok)
    return base, model
