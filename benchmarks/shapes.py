"""The model shapes every benchmark measures at: d12, d20 and d26, computed from nanotrain's own scaling rules.

One table, so that a benchmark's "d26" is the d26 the trainer builds: `model_dim, n_head` come from
`nanotrain.scaling.model_shape(depth)` with TrainConfig's defaults (aspect ratio 64, head dim 128, one KV head
per query head, T = 2048, 32 sequences per micro-batch, SSSL windows), and the matrices Muon updates are read
off a GPT built on the meta device (no memory, no init), grouped by shape as nanotrain.optim.build_optimizer
groups them. Nothing here is typed in by hand except the defaults, which a test compares with TrainConfig.

    import shapes
    s = shapes.SHAPES["d26"]          # ModelShape(depth=26, model_dim=1664, n_head=13, ...)
    s.muon_groups()                   # {"attn.c_q attn.c_k attn.c_v attn.c_proj": (104, 1664, 1664), ...}
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

DEPTHS = (12, 20, 26)
# TrainConfig's defaults (nanotrain/config.py); tests/test_benchmarks.py checks they still agree.
ASPECT_RATIO = 64
HEAD_DIM = 128
SEQ_LEN = 2048
DEVICE_BATCH_SIZE = 32
WINDOW_PATTERN = "SSSL"
VOCAB_SIZE = 32768


@dataclass(frozen=True)
class ModelShape:
    """The shapes a benchmark needs of one model depth (all from nanotrain.scaling and the model itself)."""

    name: str  # "d26"
    depth: int
    model_dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    seq_len: int
    device_batch_size: int  # sequences per micro-batch
    vocab_size: int

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the MLP (c_fc's output): 4 x model_dim."""
        return 4 * self.model_dim

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch (device_batch_size x seq_len): the M of every linear layer's GEMM."""
        return self.device_batch_size * self.seq_len

    def windows(self) -> list[int | None]:
        """Per-layer attention windows (None = full context), as the trainer computes them."""
        from nanotrain.scaling import window_sizes

        return window_sizes(WINDOW_PATTERN, self.depth, self.seq_len)

    @property
    def short_window(self) -> int:
        """The S layers' window (keys seen, the query included): seq_len // 2 + 1 (1025 at T = 2048)."""
        return next(w for w in self.windows() if w is not None)

    def gpt_config(self):
        """The nanotrain.model.GPTConfig of this shape (what nanotrain.train.model_config_for builds)."""
        from nanotrain.model import GPTConfig

        return GPTConfig(sequence_len=self.seq_len, vocab_size=self.vocab_size, n_layer=self.depth,
                         n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.model_dim,
                         window_pattern=WINDOW_PATTERN)

    def muon_groups(self) -> dict[str, tuple[int, int, int]]:
        """The stacks Muon updates, {names: (K, m, n)}: the transformer blocks' matrices grouped by shape
        (build_optimizer's grouping), read off a meta-device GPT of this shape."""
        return dict(_muon_groups(self))

    def linear_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The GEMMs of one micro-batch through the MLP, {name: (M, N, K)} as y (M x N) = x (M x K) @ w^T."""
        return {"mlp c_fc": (self.tokens, self.mlp_dim, self.model_dim),
                "mlp c_proj": (self.tokens, self.model_dim, self.mlp_dim)}

    def describe(self) -> str:
        return (f"{self.name}: dim {self.model_dim}, {self.n_head} heads x {self.head_dim}, T={self.seq_len}, "
                f"B={self.device_batch_size}")

    def as_dict(self) -> dict:
        return {**asdict(self), "mlp_dim": self.mlp_dim, "tokens": self.tokens}


@functools.lru_cache(maxsize=None)
def _muon_groups(shape: ModelShape) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    import torch

    from nanotrain.model import GPT

    with torch.device("meta"):
        model = GPT(shape.gpt_config())
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, p in model.transformer.h.named_parameters():
        if p.dim() == 2:  # build_optimizer puts every block parameter in a Muon group; all are matrices
            leaf = ".".join(name.split(".")[-3:-1])  # "3.attn.c_q.weight" -> "attn.c_q"
            by_shape.setdefault(tuple(p.shape), []).append(leaf)
    groups = []
    for (m, n), names in sorted(by_shape.items()):
        label = " ".join(dict.fromkeys(names))  # each module name once, in model order
        groups.append((label, (len(names), m, n)))
    return tuple(groups)


def model_shape(depth: int) -> ModelShape:
    """The ModelShape of `depth` under TrainConfig's defaults (nanotrain.scaling.model_shape)."""
    from nanotrain.scaling import model_shape as scaled

    model_dim, n_head = scaled(depth, ASPECT_RATIO, HEAD_DIM)
    return ModelShape(name=f"d{depth}", depth=depth, model_dim=model_dim, n_head=n_head, n_kv_head=n_head,
                      head_dim=model_dim // n_head, seq_len=SEQ_LEN, device_batch_size=DEVICE_BATCH_SIZE,
                      vocab_size=VOCAB_SIZE)


SHAPES: dict[str, ModelShape] = {f"d{d}": model_shape(d) for d in DEPTHS}
