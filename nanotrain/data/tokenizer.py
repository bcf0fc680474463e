"""The byte-level BPE tokenizer: trained with rustbpe, encoded and decoded with tiktoken.

GPT-4-style pre-tokenization (nanochat's variant: numbers split into groups of at most two digits,
which wastes fewer merges on numbers at small vocabularies), 256 byte tokens plus the learned
merges, then the special tokens, `<|bos|>` first. Every document starts with `<|bos|>`.

On disk (the tokenizer directory, `<base>/tokenizer/`):
  tokenizer.pkl     {"pattern", "mergeable_ranks" (bytes -> rank), "special_tokens" (name -> id)}
  token_bytes.pt    int32 tensor (vocab_size,): UTF-8 byte length of each token, 0 for special
                    tokens (what bits-per-byte divides by)
  tokenizer.json    vocab size, fingerprint, and the names+sizes of the shards it was trained on
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from nanotrain import paths
from nanotrain.errors import UserError

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; the delimiter between packed documents
    "<|user_start|>", "<|user_end|>",  # chat fine-tuning: user turns
    "<|assistant_start|>", "<|assistant_end|>",  # assistant turns
    "<|python_start|>", "<|python_end|>",  # the assistant calls the Python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output
]
BOS = "<|bos|>"

# GPT-4's split pattern with \p{N}{1,2} instead of \p{N}{1,3} (as nanochat).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

PICKLE_FILE, TOKEN_BYTES_FILE, META_FILE = "tokenizer.pkl", "token_bytes.pt", "tokenizer.json"


class Tokenizer:
    """A trained BPE tokenizer (a tiktoken Encoding plus the metadata nanotrain keeps with it)."""

    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 meta: dict | None = None):
        import tiktoken

        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = special_tokens
        self.meta = dict(meta or {})
        self.enc = tiktoken.Encoding(name="nanotrain", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self._token_bytes: Tensor | None = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens[BOS]

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def fingerprint(self) -> str:
        """A short hash of pattern, merges and special tokens: equal fingerprints encode identically."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.pattern.encode())
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(rank.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
            h.update(json.dumps(self.special_tokens, sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def data_fingerprint(self) -> str | None:
        """Fingerprint of the shards this tokenizer was trained on (None when not trained on shards)."""
        return self.meta.get("data_fingerprint")

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def encode_special(self, name: str) -> int:
        """The id of a special token, e.g. encode_special("<|bos|>")."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}") from None

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (bytes that are not valid UTF-8 on their own shown as U+FFFD)."""
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ encode / decode
    def _special_id(self, tok: int | str) -> int:
        return tok if isinstance(tok, int) else self.encode_special(tok)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Token ids of a text, or of a list of texts (encoded in parallel by tiktoken's threads).

        Special-token strings inside the text are encoded as ordinary text (data cannot inject them);
        prepend/append add one special token (an id or a name such as "<|bos|>") to each text.
        """
        pre = None if prepend is None else self._special_id(prepend)
        post = None if append is None else self._special_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if pre is not None:
                batch = [[pre] + ids for ids in batch]
            if post is not None:
                for ids in batch:
                    ids.append(post)
            return batch
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids (invalid UTF-8 replaced by U+FFFD)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    def token_bytes(self, device: torch.device | str | None = None) -> Tensor:
        """int32 (vocab_size,): UTF-8 byte length of each token, 0 for special tokens."""
        if self._token_bytes is None:
            tb = torch.zeros(self.vocab_size, dtype=torch.int32)
            for tok, rank in self.mergeable_ranks.items():
                tb[rank] = len(tok)
            for tid in self.special_tokens.values():
                tb[tid] = 0
            self._token_bytes = tb
        return self._token_bytes if device is None else self._token_bytes.to(device)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.pkl, token_bytes.pt and tokenizer.json into `directory` (each atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks,
                   "special_tokens": self.special_tokens}
        _atomic(d / PICKLE_FILE, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
        _atomic(d / TOKEN_BYTES_FILE, lambda f: torch.save(self.token_bytes(), f))
        meta = dict(self.meta, vocab_size=self.vocab_size, fingerprint=self.fingerprint,
                    special_tokens=self.special_tokens)
        _atomic(d / META_FILE, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer saved by `save` (UserError when there is none)."""
        d = Path(directory)
        if not (d / PICKLE_FILE).is_file():
            raise UserError(f"no tokenizer in {d}; run `nanotrain-data tokenizer` first")
        try:
            with open(d / PICKLE_FILE, "rb") as f:
                payload = pickle.load(f)
            meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
            if not isinstance(payload, dict):  # nanochat's format: a pickled tiktoken.Encoding
                payload = {"pattern": payload._pat_str, "mergeable_ranks": payload._mergeable_ranks,
                           "special_tokens": payload._special_tokens}
            if BOS not in payload["special_tokens"]:
                raise UserError(f"the tokenizer in {d} has no {BOS} token; run `nanotrain-data tokenizer` again")
            _check_vocab(payload["pattern"], payload["mergeable_ranks"], payload["special_tokens"])
            tok = cls(payload["pattern"], payload["mergeable_ranks"], payload["special_tokens"], meta)
        except UserError:
            raise
        except Exception as e:  # a damaged pickle can raise almost anything (EOFError, OverflowError, ...)
            raise UserError(f"the tokenizer in {d} is unreadable ({type(e).__name__}: {e}); "
                            "run `nanotrain-data tokenizer` again") from None
        if meta.get("fingerprint") and meta["fingerprint"] != tok.fingerprint:
            raise UserError(f"the tokenizer files in {d} do not match each other; run `nanotrain-data tokenizer` again")
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def load_tokenizer(base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of the base directory ($NANOTRAIN_BASE_DIR or ~/.cache/nanotrain by default)."""
    return Tokenizer.load(paths.tokenizer_dir(base_dir))


def train_tokenizer(text_iter: Iterable[str], vocab_size: int, *, meta: dict | None = None) -> Tokenizer:
    """Train a BPE tokenizer of `vocab_size` tokens (including the special tokens) with rustbpe.

    A corpus too small to supply that many merges gives a smaller vocabulary (see .vocab_size).
    """
    import rustbpe

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise UserError(f"--vocab-size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(text_iter), n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(trainer.get_pattern(), ranks, specials, meta)


def _check_vocab(pattern: object, ranks: object, specials: object) -> None:
    """ValueError unless the vocabulary is well formed: bytes -> rank and name -> id, all ids distinct and in
    range. tiktoken panics (a Rust PanicException, no Exception) on duplicate ranks and silently accepts a
    special token that reuses a merge's id."""
    if not (isinstance(pattern, str) and isinstance(ranks, dict) and isinstance(specials, dict)):
        raise ValueError("the pickle does not hold a pattern, merges and special tokens")
    if not all(type(k) is bytes and type(v) is int and 0 <= v < 2 ** 31 for k, v in ranks.items()):
        raise ValueError("merges must map bytes to token ids in [0, 2^31)")
    if not all(type(k) is str and type(v) is int and 0 <= v < 2 ** 31 for k, v in specials.items()):
        raise ValueError("special tokens must map names to token ids in [0, 2^31)")
    ids = list(ranks.values()) + list(specials.values())
    if len(set(ids)) != len(ids):
        raise ValueError("two tokens share an id")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
