"""nanotrain's GPT for Hugging Face transformers (remote code): `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`.

`nanotrain-convert export-hf` copies this file, unchanged, into the export folder as modeling_nanotrain.py;
it depends on torch and transformers only (no nanotrain import), so the folder works on a machine without
nanotrain. The computation is nanotrain/model.py's, step for step, in float32 unless the caller casts:

- embedding -> parameter-free RMSNorm -> smear (previous token's normalized embedding mixed in through
  smear_lambda * sigmoid(smear_gate(x[:, :, :smear_channels])));
- per layer: x = resid_lambdas[i] * x + x0_lambdas[i] * x0, then attention and a ReLU² MLP, each on
  the RMS-normed residual; attention: q, k, v projections, value embeddings on alternating layers mixed into v
  through 3 * sigmoid(ve_gate(x[:, :, :ve_gate_channels])), rotary (base 100000), QK-norm, q and k scaled by
  1.2, GQA, causal with a per-layer window (`attention_windows[i]` keys including the query itself; null =
  every earlier key);
- backout: the residual after layer n_layer // 2, times backout_lambda, is subtracted before the final norm;
- logits = 15 * tanh(lm_head(x) / 15) in float32, padding rows of the head dropped.

Generation: a KV cache (transformers' DynamicCache, created by `generate`) holds every position; the window
is applied as a mask. Smear needs the token before the first new one, which `prepare_inputs_for_generation`
passes as `prev_token_ids`. Padded batches (an attention_mask with zeros) are not supported.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NanotrainConfig(PretrainedConfig):
    """Shape and constants of a nanotrain GPT (written by nanotrain-convert export-hf)."""

    model_type = "nanotrain"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size: int = 32768, padded_vocab_size: int | None = None, sequence_len: int = 2048,
                 n_layer: int = 12, n_head: int = 6, n_kv_head: int = 6, n_embd: int = 768,
                 attention_windows: list | None = None, rope_base: float = 100000.0, logit_softcap: float = 15.0,
                 qk_scale: float = 1.2, smear_channels: int = 24, ve_gate_channels: int = 12,
                 ve_gate_range: float = 3.0, rotary_positions: int | None = None, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size
        self.sequence_len = sequence_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.attention_windows = list(attention_windows) if attention_windows is not None else [None] * n_layer
        self.rope_base = rope_base
        self.logit_softcap = logit_softcap
        self.qk_scale = qk_scale
        self.smear_channels = smear_channels
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_range = ve_gate_range
        self.rotary_positions = rotary_positions or 10 * sequence_len
        # names the rest of transformers looks for
        self.hidden_size = n_embd
        self.num_hidden_layers = n_layer
        self.num_attention_heads = n_head
        self.num_key_value_heads = n_kv_head
        self.max_position_embeddings = self.rotary_positions
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _rotary(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (1, T, 1, head_dim/2) float32 for the given absolute positions (T,)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    return layer_idx % 2 == (n_layer - 1) % 2


class NanotrainAttention(nn.Module):
    def __init__(self, config: NanotrainConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C = config.n_embd
        self.window = config.attention_windows[layer_idx]
        self.qk_scale, self.ve_gate_range = config.qk_scale, config.ve_gate_range
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate_channels = min(config.ve_gate_channels, C)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if _has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache) -> torch.Tensor:
        """x: (B, T, C) normed input at positions start .. start+T-1 -> (B, T, C)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        q, k = _norm(q) * self.qk_scale, _norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                           # (B, Hkv, start+T, D)
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        Tk = k.shape[2]
        qpos = torch.arange(T, device=x.device)[:, None] + (Tk - T)
        kpos = torch.arange(Tk, device=x.device)[None, :]
        mask = kpos <= qpos
        if self.window is not None:
            mask &= kpos > qpos - self.window
        scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.head_dim))
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
        y = (probs @ v).transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class NanotrainMLP(nn.Module):
    def __init__(self, config: NanotrainConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanotrainBlock(nn.Module):
    def __init__(self, config: NanotrainConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = NanotrainAttention(config, layer_idx)
        self.mlp = NanotrainMLP(config)

    def forward(self, x, ve, cos, sin, start, cache):
        x = x + self.attn(_norm(x), ve, cos, sin, start, cache)
        return x + self.mlp(_norm(x))


class NanotrainPreTrainedModel(PreTrainedModel):
    config_class = NanotrainConfig
    base_model_prefix = "nanotrain"
    _no_split_modules = ["NanotrainBlock"]
    _tied_weights_keys: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from model.safetensors; nothing is trained from this file's initialization."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class NanotrainForCausalLM(NanotrainPreTrainedModel, GenerationMixin):
    """nanotrain's base GPT: same parameter names as nanotrain's checkpoints."""

    def __init__(self, config: NanotrainConfig) -> None:
        super().__init__(config)
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([NanotrainBlock(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_channels = min(config.smear_channels, C)
        self.smear_gate = nn.Linear(self.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if _has_value_embedding(i, config.n_layer)})
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _smear(self, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, C) normalized embeddings; prev: (B, 1, C) normalized embedding of the token before x."""
        if x.size(1) > 1:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :self.smear_channels]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        if prev is not None:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, :1, :self.smear_channels]))
            x = torch.cat([x[:, :1] + gate * prev.to(x.dtype), x[:, 1:]], dim=1)
        return x

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache=None, past_key_values=None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                prev_token_ids: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, T) new tokens; with a cache holding L positions, prev_token_ids (B, 1) is token L-1."""
        if input_ids is None:
            raise ValueError("NanotrainForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("NanotrainForCausalLM does not support padded batches; generate one prompt per row "
                             "of equal length")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache
            cache = DynamicCache()
        start = cache.get_seq_length() if cache is not None else 0
        if start > 0 and prev_token_ids is None:
            raise ValueError("a forward after cached positions needs prev_token_ids (the last cached token) for smear")
        B, T = input_ids.shape
        if start + T > self.config.rotary_positions:
            raise ValueError(f"{start + T} positions exceed the model's {self.config.rotary_positions}")
        positions = torch.arange(start, start + T, device=input_ids.device)
        cos, sin = _rotary(positions, self.config.n_embd // self.config.n_head, self.config.rope_base)

        x = _norm(self.transformer.wte(input_ids))
        prev = _norm(self.transformer.wte(prev_token_ids)) if start > 0 else None
        x = self._smear(x, prev)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, start, cache)
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        x = _norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        # the cache's field is "cache" in transformers 5, "past_key_values" before
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        """transformers' inputs, plus the token before the new ones (smear reads its embedding)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs["input_ids"].shape[1]
        if input_ids.shape[1] > new:
            inputs["prev_token_ids"] = input_ids[:, -new - 1:-new]
        inputs.pop("position_ids", None)
        return inputs
