"""A Llama-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Module names equal Hugging Face's (`model.layers.3.self_attn.q_proj`, `lm_head`, ...), so the
state dict keys are the checkpoint keys and PEFT adapter keys map onto modules one to one.

Shape legend: B batch, T new tokens, S keys (cached + new), H query heads, K kv heads,
D head width, C hidden width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import attention
from models.config import ModelConfig
from models.rmsnorm import rms_norm
from models.swiglu import swiglu
from quant import NF4Embedding, QuantizedHead


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]; backward keeps x and rstd only (models.rmsnorm)."""
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] of the rotary embedding, with llama3 or linear scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if config.rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 rope scaling: long wavelengths slowed by `factor`, short ones kept, smooth in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # (key, inv_freq, cos, sin) of the last plain 0..T-1 table: training asks for the same length every step.
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B,T] -> (cos, sin), each [B,1,T,D], computed in float32 then cast to `dtype`."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
            return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def for_length(self, T: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1,1,T,D] of positions 0..T-1: forward's values, kept between calls of the same length.

        Keyed on the length, dtype, device and the inv_freq tensor (object and version), so a moved or
        recomputed inv_freq is never served stale; the tables are constants (no autograd history).
        """
        device = torch.device(device)
        key = (T, dtype, device, self.inv_freq._version)
        cached = self._cache
        if cached is None or cached[0] != key or cached[1] is not self.inv_freq:
            with torch.no_grad():
                cos, sin = self.forward(torch.arange(T, device=device)[None], dtype)
            # The cache holds inv_freq itself, so `is` cannot be fooled by a reused object id.
            self._cache = cached = (key, self.inv_freq, cos, sin)
        return cached[2], cached[3]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,heads,T,D] rotated by the angles in cos/sin [B,1,T,D]."""
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys and values of every block for the tokens seen so far, preallocated to `capacity`.

    keys[i], values[i]: [B, K, capacity, D]; only the first `length` positions are filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B,K,T,D] after the cached positions; return all keys and values [B,K,S,D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c, d = config, config.head_dim
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, d
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * d, c.hidden_size, bias=c.attention_bias)
        # qwen3: RMSNorm over each head of q and k before rope (None elsewhere: nothing in the state dict)
        self.q_norm = RMSNorm(d, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(d, c.rms_norm_eps) if c.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B,T,C]; mask [B,1,T,S] bool (True = may attend) or None for plain causal -> [B,T,C].

        prefix: prefix tuning's keys and values [B,K,N,D], already final (no RoPE), put before this
        call's keys when they are not in the cache.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if prefix is not None:
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        # SDPA wants one dtype; under autocast the projections may come out in bf16 while the cache is not.
        k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None and attention.applies(q, k):  # plain causal bf16 on the CPU (training): bf16 matmuls
            y = attention.grouped_causal_attention(q, k, v, attention.BLOCK)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]; the gate product keeps only gate and up for backward (models.swiglu)."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"

    def forward(self, x, cos, sin, mask, cache, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Embedding, blocks and final norm: everything but the output head (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Extended(NamedTuple):
    """What Decoder.forward runs the blocks on once virtual tokens are in (see VirtualTokens)."""

    x: torch.Tensor  # [B,T',C] input embeddings (T' = N + T when N virtual inputs were prepended)
    attention_mask: torch.Tensor | None  # [B,S] covering the virtual tokens too, or None
    position_ids: torch.Tensor | None  # [B,T'], or None for the decoder's default
    past: int  # key positions before x: the cache length, or N for an uncached prefix
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (keys, values) [B,K,N,D], uncached
    drop: int  # leading outputs that belong to virtual tokens, cut before the head


class VirtualTokens(Protocol):
    """The decoder's one hook for adapters: N virtual tokens seen by every real token.

    Prompt and prefix tuning (prompt.virtual_tokens) implement it; the decoder knows nothing else about
    adapters (LoRA replaces linear layers and needs no hook). Before the blocks, forward calls
    `extend`, which may prepend input embeddings, add per-layer keys and values, and widen the mask and
    positions; callers keep passing masks and positions for the real tokens only. Generation reserves
    `num_virtual_tokens` extra KV-cache slots.
    """

    num_virtual_tokens: int

    def extend(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               cache: KVCache | None, doc_ids: torch.Tensor | None) -> Extended: ...


class Decoder(nn.Module):
    """A causal language model. `model(input_ids, attention_mask)` -> logits [B,T,V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.virtual_tokens: VirtualTokens | None = None  # the adapter hook (VirtualTokens); set by prompt.attach

    @property
    def embedding_dtype(self) -> torch.dtype:
        """dtype of the embedding's output: the hidden states' dtype outside autocast."""
        emb = self.model.embed_tokens
        return emb.compute_dtype if isinstance(emb, NF4Embedding) else emb.weight.dtype

    @property
    def num_virtual_tokens(self) -> int:
        """Extra KV-cache positions generation must allocate for the attached virtual tokens (0: none)."""
        return self.virtual_tokens.num_virtual_tokens if self.virtual_tokens is not None else 0

    def compile_blocks(self, **options) -> None:
        """torch.compile each block's forward in place (`nn.Module.compile`), for `train.run --compile`.

        In place, so module names and state-dict keys stay those of the checkpoint (torch.compile(model)
        would prefix them with `_orig_mod.`). The blocks share their compiled graphs (two per input shape
        in training: block 0, whose input needs no gradient, and the rest); the first steps pay the compile
        time (benchmarks/profile.py measures it and the steady-state step).
        """
        for layer in self.model.layers:
            layer.compile(**options)

    def tie_weights(self) -> None:
        """Point lm_head at the embedding's weight (at the 4-bit table itself when it is quantized)."""
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.model.embed_tokens, NF4Embedding):
            self.lm_head = QuantizedHead(self.model.embed_tokens)
        else:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the decoder.

        input_ids [B,T] (or inputs_embeds [B,T,C]); attention_mask [B,S] with 1 on real tokens and 0 on
        padding, S = cached + new tokens; position_ids [B,T] (default: counted over real tokens, so a
        left-padded row equals the same row unpadded); doc_ids [B,T] marks packed examples that must not
        attend to each other. Returns logits [B,T,V], or with return_hidden the final normed hidden
        states [B,T,C] so a caller can apply `lm_head` in chunks. With virtual tokens attached, the
        masks and positions given still cover the real tokens only, and so do the outputs.
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.length if cache is not None else 0
        prefix, drop = None, 0
        if self.virtual_tokens is not None:
            x, attention_mask, position_ids, past, prefix, drop = self.virtual_tokens.extend(
                x, attention_mask, position_ids, cache, doc_ids)
        B, T = x.shape[:2]
        if position_ids is None and attention_mask is None and past == 0:
            cos, sin = self.model.rotary_emb.for_length(T, x.dtype, x.device)  # the same table every step
        else:
            if position_ids is None:
                position_ids = default_positions(attention_mask, B, T, past, x.device)
            cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        masks = {
            kind: build_mask(attention_mask, doc_ids, T, past, window, x.device)
            for kind, window in (("full", None), ("sliding", self.config.sliding_window))
            if kind == "full" or any(layer.sliding for layer in self.model.layers)
        }
        for i, layer in enumerate(self.model.layers):
            mask = masks["sliding" if layer.sliding else "full"]
            kv = prefix[i] if prefix is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, kv)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x[:, drop:])
        return x if return_hidden else self.lm_head(x)


def default_positions(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Position of each new token [B,T]: its index among the row's real tokens (0 for padding)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -T:]


def build_mask(
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    T: int,
    past: int,
    window: int | None,
    device,
) -> torch.Tensor | None:
    """Boolean attention mask [B|1, 1, T, S] (True = may attend), or None when plain causal suffices.

    Combines causality, key padding, the sliding window and packed-document boundaries. A query that
    may attend to nothing (a padding position) is let attend to everything instead: its output is
    never used, and an all-masked row would make softmax produce NaN that leaks through 0·NaN.
    """
    if attention_mask is None and doc_ids is None and window is None and past == 0:
        return None
    S = past + T
    q_idx = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
    if window is not None:
        mask = mask & (k_idx > q_idx - window)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :S]
    if doc_ids is not None:  # packing: same document only (no cache while packing)
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask | ~mask.any(dim=-1, keepdim=True)
