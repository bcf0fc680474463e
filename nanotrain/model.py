"""The GPT of nanochat's base model, written for nanotrain.

Architecture (nanochat's current gpt.py; the reasons are nanochat's and modded-nanogpt's):
- token embedding untied from the lm_head; vocab padded up to a multiple of 64 for both (the padding
  rows are sliced off the logits, so they never receive probability mass);
- parameter-free RMSNorm (F.rms_norm) after the embedding, before each sub-block and before the head;
- "smear": each position adds a gated copy of the previous token's normalized embedding (a cheap
  bigram signal), gate = smear_lambda * sigmoid(smear_gate(x[:24 channels]));
- per-layer learnable scalars: x <- resid_lambdas[i] * x + x0_lambdas[i] * x0 before block i, where x0
  is the (smeared) embedding;
- attention: rotary embeddings (base 100000), QK-norm, q and k scaled by 1.2 each (sharper attention),
  GQA (n_kv_head divides n_head), sliding windows per layer, value embeddings (ResFormer) on
  alternating layers mixed into v with an input-dependent gate 3 * sigmoid(ve_gate(x[:12 channels]));
- ReLU² MLP of width 4 * n_embd;
- "backout": the residual after the middle layer (n_layer // 2) is subtracted, scaled by
  backout_lambda, before the final norm, removing low-level features the head does not need;
- logits softcapped at 15 with tanh, computed in float32.

Precision: parameters stay float32; bf16 comes only from torch.autocast set by the caller (the trainer
on CUDA). On CPU everything runs in float32. Attention goes through `nanotrain.ops.attention`: each layer
holds the backends resolved (and self-checked) for its case when the model is built (`resolve_kernels`,
called by `build_model`), so no backend choice runs inside the compiled forward; a layer whose tensors do
not match what was resolved (another device or dtype) uses the per-call `attention`. The big matmuls are
plain nn.Linear(bias=False) modules so the FP8 converter can swap them by isinstance.

Construction is cheap and data-free so it can run under `with torch.device("meta"):`; call
`model.to_empty(device=...)` and then `model.init_weights()` (deterministic given torch.manual_seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanotrain.ops import attention as attention_ops
from nanotrain.ops.attention import attention, attention_decode
from nanotrain.scaling import window_sizes

LOGIT_SOFTCAP = 15.0
ROPE_BASE = 100_000.0
QK_SCALE = 1.2            # q and k are each multiplied by this after QK-norm (nanochat)
SMEAR_CHANNELS = 24       # the smear gate reads the first 24 channels of the embedding
VE_GATE_CHANNELS = 12     # the value-embedding gate reads the first 12 channels of the block input
VE_GATE_RANGE = 3.0       # value-embedding gate = 3 * sigmoid(...), in (0, 3)
ROTARY_OVERCOMPUTE = 10   # rotary tables cover 10 x sequence_len positions (room for generation)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. JSON-serializable with dataclasses.asdict (checkpoints store it)."""
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6          # query heads
    n_kv_head: int = 6       # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    # Tiled over layers; L = full context, S = short window (half the context); the last layer is always L.
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be even (rotary)")
        if not self.window_pattern or any(c not in "SL" for c in self.window_pattern.upper()):
            raise ValueError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def compute_window_sizes(config: GPTConfig) -> list[int | None]:
    """Per-layer attention window: the number of keys a query sees, itself included; None = full causal.

    nanochat tiles `window_pattern` over the layers and forces the last layer to L. Its S layers use a
    flash-attention look-back of sequence_len // 2 tokens (window_size=(sequence_len // 2, 0)), i.e. a
    query sees itself plus sequence_len // 2 earlier tokens: sequence_len // 2 + 1 keys in our
    semantics. L layers look back sequence_len tokens, which is the full context: None.
    """
    return window_sizes(config.window_pattern, config.n_layer, config.sequence_len)


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings live on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + D/2) by position-dependent angles.

    x: (B, T, H, D); cos, sin: (1, T, 1, D/2) -> (B, T, H, D) in x's dtype.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys, values and the smear state of every layer, for decoding with `GPT.forward(idx, kv_cache=...)`.

    k_cache, v_cache: (n_layers, B, seq_len, Hkv, D); cache_seqlens: (B,) int32, the number of filled
    positions per row (all rows advance together: `get_pos()` is that shared position);
    prev_embedding: (B, 1, C) the normalized embedding of the last token seen (smear needs it to decode
    one token at a time), None before the first forward.

    Usage: a forward with T tokens writes each layer's k/v at positions pos .. pos+T-1, attends, and the
    last layer advances the position by T. Prefill a prompt once with batch 1, then make a batch-N cache
    and call `prefill(other)` to copy (and broadcast) the prompt's state into it before sampling.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.batch_size = batch_size
        self.num_heads = num_heads          # key/value heads (n_kv_head)
        self.max_seq_len = seq_len
        self.head_dim = head_dim
        self.n_layers = num_layers
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding: Tensor | None = None
        self.pos = 0

    def reset(self) -> None:
        """Forget everything (positions, smear state); the buffers are reused."""
        self.pos = 0
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self) -> int:
        return self.pos

    def get_layer_cache(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Views (B, seq_len, Hkv, D) of one layer's keys and values."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens
        self.cache_seqlens += num_tokens

    def prefill(self, other: KVCache) -> None:
        """Copy another cache's filled state into this one (empty) cache.

        `other` has batch 1 (broadcast to every row here) or this cache's batch size; its filled length
        must fit in this cache. Typical use: prefill a prompt once, then decode N samples from it.
        """
        if self.pos != 0:
            raise ValueError("KVCache.prefill wants an empty destination cache; call reset() first")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot broadcast a cache of batch {other.batch_size} to batch {self.batch_size}")
        if (other.n_layers, other.num_heads, other.head_dim) != (self.n_layers, self.num_heads, self.head_dim):
            raise ValueError("KVCache.prefill: layer/head/head_dim mismatch between caches")
        n = other.pos
        if n > self.max_seq_len:
            raise ValueError(f"KVCache.prefill: source holds {n} positions, destination has room for "
                             f"{self.max_seq_len}")
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        self.pos = n
        self.cache_seqlens.fill_(n)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate_channels = min(VE_GATE_CHANNELS, C)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)
        self.kernels: attention_ops.Resolved | None = None  # set by GPT.resolve_kernels

    def forward(self, x: Tensor, ve: Tensor | None, cos: Tensor, sin: Tensor, window: int | None,
                kv_cache: KVCache | None) -> Tensor:
        """x: (B, T, C) normalized block input; ve: (B, T, Hkv*D) or None -> (B, T, C)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        dtype = q.dtype  # the compute dtype (bf16 under autocast, else the parameters' dtype)
        if ve is not None:
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        kern = self.kernels
        if kv_cache is None:
            if kern is not None and kern.device_type == q.device.type and kern.dtype == q.dtype:
                y = kern.train(q, k, v, window, None)
            else:
                y = attention(q, k, v, window)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            pos = kv_cache.get_pos()
            if pos + T > kv_cache.max_seq_len:
                raise ValueError(f"KV cache full: {pos} + {T} tokens > its {kv_cache.max_seq_len} positions")
            k_cache[:, pos:pos + T] = k
            v_cache[:, pos:pos + T] = v
            qc, seqlens = q.to(k_cache.dtype), kv_cache.cache_seqlens + T
            if kern is not None and kern.device_type == qc.device.type and kern.dtype == qc.dtype:
                y = kern.decode(qc, k_cache, v_cache, seqlens, window, None)
            else:
                y = attention_decode(qc, k_cache, v_cache, seqlens, window)
            y = y.to(dtype)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C), ReLU² in between."""
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, ve: Tensor | None, cos: Tensor, sin: Tensor, window: int | None,
                kv_cache: KVCache | None) -> Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """nanochat's base GPT (see the module docstring). Build on meta, `to_empty`, then `init_weights()`."""

    def __init__(self, config: GPTConfig, pad_vocab_size_to: int = 64) -> None:
        super().__init__()
        self.config = config
        self.window_sizes: list[int | None] = compute_window_sizes(config)
        V = ((config.vocab_size + pad_vocab_size_to - 1) // pad_vocab_size_to) * pad_vocab_size_to
        self.padded_vocab_size = V
        C = config.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))   # real values set in init_weights()
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_channels = min(SMEAR_CHANNELS, C)
        self.smear_gate = nn.Linear(self.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * ROTARY_OVERCOMPUTE
        cos, sin = self._rotary_tables(self.rotary_seq_len, config.head_dim, device=None)
        self.register_buffer("cos", cos, persistent=False)  # recomputed by init_weights, never checkpointed
        self.register_buffer("sin", sin, persistent=False)

    # ---------------------------------------------------------------- initialization
    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
        """cos, sin: (1, seq_len, 1, head_dim/2) float32 rotation tables."""
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter and buffer (nanochat's scheme), in a fixed order.

        wte ~ N(0, 0.8); lm_head ~ N(0, 0.001) (so initial logits are ~0 and the loss ~ ln(vocab));
        c_q, c_k, c_v, value embeddings ~ U(-s, s) with s = sqrt(3 / n_embd) (std 1/sqrt(n_embd),
        uniform avoids outliers); c_fc ~ U(-0.4 s, 0.4 s); both output projections zero (each block
        starts as the identity); resid_lambdas from 1.15 down to 1.05 and x0_lambdas from 0.20 down to
        0.05 across depth; smear_lambda 0, backout_lambda 0.2, gate weights ~ U(0, 0.02). Then resolves the
        attention backends for the model's device (resolve_kernels with its default dtype).
        """
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = (3.0 / cfg.n_embd) ** 0.5
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        depth_frac = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        self.cos, self.sin = self._rotary_tables(self.rotary_seq_len, cfg.head_dim, self.get_device())
        if self.get_device().type != "meta":  # every path that allocates a model resolves its backends here
            self.resolve_kernels()

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def resolve_kernels(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Choose (and, on a GPU, self-check) each layer's attention backends once, for the compute `dtype`
        (default: bfloat16 on CUDA, where the trainer autocasts, else float32). Layers of the same case share
        one resolution. Called by build_model; call it again after moving the model to another device."""
        device = torch.device(device) if device is not None else self.get_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cfg = self.config
        for block, window in zip(self.transformer.h, self.window_sizes):
            block.attn.kernels = attention_ops.resolve(device, dtype, cfg.head_dim, window, cfg.sequence_len,
                                                       cfg.n_kv_head != cfg.n_head)

    def kernel_names(self) -> list[tuple[str, str] | None]:
        """Per layer, the (attention, decode) backends resolve_kernels chose (None before it ran)."""
        return [None if b.attn.kernels is None else b.attn.kernels.names for b in self.transformer.h]

    # ---------------------------------------------------------------- accounting
    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per category (nanochat's).

        The trainer's tokens:params ratio uses transformer_matrices + lm_head (nanochat's base_train:
        the cleanest scaling laws, per its dev/LOG.md of Jan 27, 2026); 'total' is everything.
        """
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in self._scalar_params()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no category"
        return counts

    def _scalar_params(self) -> list[nn.Parameter]:
        return [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    def estimate_flops(self) -> float:
        """FLOPs per token for forward + backward, as nanochat counts them.

        6 per matmul weight (2 forward, 4 backward) over every parameter except the embedding tables
        (wte, value embeddings: lookups) and the scalars (resid/x0 lambdas, smear gate and lambda, backout
        lambda); plus 12 * n_head * head_dim * effective_seq per layer for QK^T and AV, where
        effective_seq is sequence_len for full layers and the look-back (window - 1, capped at
        sequence_len) for sliding-window layers, as nanochat's count does.
        """
        cfg = self.config
        counts = self.num_scaling_params()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        attn = 0
        for window in self.window_sizes:
            effective = cfg.sequence_len if window is None else min(window - 1, cfg.sequence_len)
            attn += 12 * cfg.n_head * cfg.head_dim * effective
        return float(6 * matmul_params + attn)

    # ---------------------------------------------------------------- forward
    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> Tensor:
        """idx: (B, T) int64 token ids.

        With targets (B, T) int64 (-1 = ignore): the float32 cross-entropy, reduction "mean" over the
        non-ignored positions, "sum", or "none" -> (B, T) with 0 where ignored.
        Without targets: logits (B, T, vocab_size) float32, softcapped, padding removed.
        With kv_cache: positions continue from kv_cache.get_pos() (prefill, then one token at a time).
        """
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary tables ({self.cos.size(1)} positions)")
        cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]

        x = norm(self.transformer.wte(idx))                                # (B, T, C)
        x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        x = norm(x)

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()    # (B, T, V)
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def _smear(self, x: Tensor, kv_cache: KVCache | None) -> Tensor:
        """Add a gated copy of the previous token's normalized embedding. x: (B, T, C) -> (B, T, C)."""
        T = x.size(1)
        prev = None
        if kv_cache is not None:
            prev = kv_cache.prev_embedding       # the token before this chunk (None at the start)
            kv_cache.prev_embedding = x[:, -1:, :].detach()
        if T > 1:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :self.smear_channels]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        if prev is not None:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, :1, :self.smear_channels]))
            x = torch.cat([x[:, :1] + gate * prev.to(x.dtype), x[:, 1:]], dim=1)
        return x

    # ---------------------------------------------------------------- sampling
    def new_kv_cache(self, batch_size: int, seq_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache shaped for this model (dtype defaults to the parameters' dtype)."""
        cfg = self.config
        dtype = self.transformer.wte.weight.dtype if dtype is None else dtype
        return KVCache(batch_size, cfg.n_kv_head, seq_len, cfg.head_dim, cfg.n_layer, self.get_device(), dtype)

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42):
        """Sample up to max_tokens continuation tokens for one prompt, yielding each id (KV-cached).

        temperature 0 = greedy. A simple single-sequence sampler; the batched engine is eval/engine.py.
        """
        if not tokens:
            raise ValueError("generate needs a non-empty prompt")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        cache = self.new_kv_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=cache)[:, -1, :]          # (1, V)
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                ids = torch.argmax(logits, dim=-1, keepdim=True)
            yield int(ids.item())


def build_model(config: GPTConfig, device: torch.device | str, pad_vocab_size_to: int = 64,
                compute_dtype: torch.dtype | None = None) -> GPT:
    """Construct on the meta device, allocate on `device`, initialize, and resolve the attention backends for
    `compute_dtype` (default: bfloat16 on CUDA, float32 elsewhere) (the trainer's path)."""
    with torch.device("meta"):
        model = GPT(config, pad_vocab_size_to=pad_vocab_size_to)
    model.to_empty(device=device)
    model.init_weights()
    if compute_dtype is not None:  # init_weights resolved for the device's default dtype
        model.resolve_kernels(device, compute_dtype)
    return model


__all__ = ["GPT", "GPTConfig", "KVCache", "build_model", "compute_window_sizes", "has_value_embedding", "norm",
           "apply_rotary"]
