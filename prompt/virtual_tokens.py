"""Virtual tokens: prompt tuning and prefix tuning on a frozen Decoder.

Both learn N "virtual tokens" and nothing else; they differ in where the tokens enter:

- prompt tuning (`PromptEmbedding`): N input embeddings [N,C] placed before the real tokens'
  embeddings. They are ordinary tokens to every layer: they take positions 0..N-1 and the real
  tokens follow from N.
- prefix tuning (`PrefixEncoder`): for every layer, N keys and values [K,N,D] placed before the
  real keys and values, as if N tokens had already been cached. They are not rotated (no RoPE, no
  k-norm: they are the cached keys themselves) and, as in PEFT, the real tokens' positions start at
  N, as if the prefix had occupied positions 0..N-1.

`attach(model, module)` sets `model.virtual_tokens`, the decoder's one adapter hook
(models.decoder.VirtualTokens); `Decoder.forward` then calls its `extend` before the blocks. Callers keep passing attention_mask [B,S] and position_ids [B,T] for the real tokens
only (positions counted from 0): `extend` adds what the virtual tokens need, so the training loop,
evaluation and generation run unchanged. Outputs come back for the real tokens only.

Shape legend as in models/decoder.py: B batch, T new tokens, N virtual tokens, L layers,
K kv heads, D head width, C hidden width.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.config import ModelConfig
from models.decoder import Decoder, Extended, KVCache

KV = tuple[torch.Tensor, torch.Tensor]


def _mask_with_virtual(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[B,S] -> [B,N+S]: virtual tokens are real to every row (never padding)."""
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones(attention_mask.shape[0], n)
    return torch.cat([ones, attention_mask], dim=1)


def _shift(position_ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if position_ids is None else position_ids + n


def fit_tokens(token_ids: list[int], n: int) -> list[int]:
    """`token_ids` repeated and truncated to exactly n ids (PEFT's rule for its TEXT init)."""
    if not token_ids:
        raise ValueError("the init text encodes to no tokens")
    return (token_ids * math.ceil(n / len(token_ids)))[:n]


def _no_packing(doc_ids: torch.Tensor | None) -> None:
    if doc_ids is not None:
        raise ValueError("virtual tokens do not support packed rows (doc_ids): train without --pack")


class PromptEmbedding(nn.Module):
    """Prompt tuning: `embedding` [N,C] (PEFT's `prompt_embeddings`) prepended to the inputs."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, hidden_size))
        nn.init.normal_(self.embedding)  # PEFT's RANDOM init: nn.Embedding's N(0, 1)

    @torch.no_grad()
    def init_from_tokens(self, word_embeddings: nn.Module, token_ids: list[int]) -> None:
        """PEFT's TEXT init: the embeddings of `token_ids` repeated and truncated to N rows, so the model
        starts out as if it read those tokens before every input (the prompt-tuning paper's advice over a
        random start)."""
        index = torch.tensor(fit_tokens(token_ids, self.num_virtual_tokens), device=self.embedding.device)
        self.embedding.copy_(word_embeddings(index).float())

    def peft_tensor(self) -> torch.Tensor:
        """What PEFT saves as `prompt_embeddings`: [N,C]."""
        return self.embedding.detach()

    def extend(self, x, attention_mask, position_ids, cache: KVCache | None, doc_ids=None) -> Extended:
        """x [B,T,C] real embeddings -> N virtual embeddings first (unless already in the cache)."""
        _no_packing(doc_ids)
        n, B = self.num_virtual_tokens, x.shape[0]
        mask = _mask_with_virtual(attention_mask, n)
        if cache is not None and cache.length > 0:  # later generation steps: the prompt is cached
            return Extended(x, mask, _shift(position_ids, n), cache.length, None, 0)
        prompts = self.embedding.to(x.dtype)[None].expand(B, -1, -1)  # (B, N, C)
        if position_ids is not None:
            virtual = torch.arange(n, device=x.device).expand(B, n)
            position_ids = torch.cat([virtual, position_ids + n], dim=1)
        return Extended(torch.cat([prompts, x], dim=1), mask, position_ids, 0, None, n)


class PrefixEncoder(nn.Module):
    """Prefix tuning: per-token vectors [N, L·2·K·D] holding every layer's key and value.

    Layout (PEFT's `prompt_embeddings` for a GQA model, token_dim = K·D): each row is
    [layer][key, value][kv head][head dim], i.e. view(N, L*2, K, D) and row 2l is layer l's key,
    2l+1 its value. With `projection_hidden`, the trained parameters are instead a smaller
    embedding [N, K·D] and PEFT's reparameterisation MLP (Linear, Tanh, Linear) producing those
    rows; `peft_tensor` runs the MLP once so the saved adapter is the plain prefix.
    """

    def __init__(self, num_virtual_tokens: int, config: ModelConfig, projection_hidden: int = 0) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.layers, self.kv_heads, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        token_dim = self.kv_heads * self.head_dim
        width = self.layers * 2 * token_dim
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim if projection_hidden else width))
        nn.init.normal_(self.embedding)  # PEFT: nn.Embedding's default N(0, 1)
        self.transform = None
        if projection_hidden:
            self.transform = nn.Sequential(
                nn.Linear(token_dim, projection_hidden), nn.Tanh(), nn.Linear(projection_hidden, width)
            )

    @torch.no_grad()
    def init_from_text(self, model: Decoder, token_ids: list[int]) -> None:
        """The prefix-tuning paper's init: the keys and values the frozen `model` computes for `token_ids`
        (repeated and truncated to N), so the prefixed model starts out exactly as the base reading those
        tokens first (they were computed at positions 0..N-1, where the real tokens' positions start at N).
        Random N(0,1) keys and values, PEFT's default, are activations no attention layer has seen.
        """
        if self.transform is not None:
            raise ValueError("a prefix trained through --prefix-projection starts random: its rows come from the MLP")
        n = self.num_virtual_tokens
        ids = torch.tensor([fit_tokens(token_ids, n)], device=model.model.norm.weight.device)
        cache = KVCache.empty(model.config, 1, n, model.embedding_dtype, ids.device)
        model(ids, cache=cache)
        per_layer = [torch.stack([k[0], v[0]]) for k, v in zip(cache.keys, cache.values)]  # each (2, K, N, D)
        rows = torch.stack(per_layer).permute(3, 0, 1, 2, 4)  # (N, L, 2, K, D): the layout of key_values
        self.embedding.copy_(rows.reshape(n, -1).float())

    def peft_tensor(self) -> torch.Tensor:
        """The flat prefix [N, L·2·K·D] (MLP folded in), as PEFT saves `prompt_embeddings`."""
        return self.rows().detach()

    def rows(self) -> torch.Tensor:
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[KV]:
        """Per layer (keys, values), each [B,K,N,D]."""
        kv = self.rows().to(dtype).view(self.num_virtual_tokens, self.layers * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (L*2, K, N, D)
        expand = (batch, -1, -1, -1)
        return [(kv[2 * i].expand(*expand), kv[2 * i + 1].expand(*expand)) for i in range(self.layers)]

    def extend(self, x, attention_mask, position_ids, cache: KVCache | None, doc_ids=None) -> Extended:
        """Keys and values of N cached tokens: given per layer, or written into an empty cache."""
        _no_packing(doc_ids)
        n, B = self.num_virtual_tokens, x.shape[0]
        mask, positions = _mask_with_virtual(attention_mask, n), _shift(position_ids, n)
        if cache is None:
            return Extended(x, mask, positions, n, self.key_values(B, x.dtype), 0)
        if cache.length == 0:  # generation's first call: the prefix becomes the first N cached tokens
            for i, (k, v) in enumerate(self.key_values(B, cache.keys[0].dtype)):
                cache.keys[i][:, :, :n] = k
                cache.values[i][:, :, :n] = v
            cache.length = n
        return Extended(x, mask, positions, cache.length, None, 0)


VirtualTokens = PromptEmbedding | PrefixEncoder


def attach(model: Decoder, module: VirtualTokens) -> VirtualTokens:
    """Freeze `model`, give it `module` (trainable, float32, on the model's device) as its virtual tokens."""
    model.requires_grad_(False)
    device = model.model.norm.weight.device
    model.virtual_tokens = module.to(device=device, dtype=torch.float32).requires_grad_(True)
    return model.virtual_tokens
