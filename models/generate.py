"""Sampling with a KV cache, batched with left padding.

    outs = generate(model, [tokenizer.encode("The capital of France is")], SamplingConfig(max_new_tokens=20))

The command line for it (with adapters) is `python -m serve.generate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.decoder import Decoder, KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # tokens generated per prompt at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability sums to top_p
    stop_ids: tuple[int, ...] = ()  # a row stops after producing any of these (eos)
    seed: int | None = None  # seeds the sampler's own generator, for repeatable samples


def cache_dtype(model: Decoder, device: torch.device) -> torch.dtype:
    """The dtype keys and values come out in, so a KV cache should hold: autocast's where it is on for
    `device`, else the model's embedding dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embedding_dtype


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B,T], attention_mask [B,T]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B,V] (float32) -> next token ids [B]."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_id: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new tokens of each, stop token included.

    All prompts run as one left-padded batch. Without the cache every step reruns the whole
    sequence (slow; kept to check the cache against).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = None
    if use_cache:
        capacity = model.num_virtual_tokens + ids.shape[1] + cfg.max_new_tokens
        cache = KVCache.empty(model.config, B, capacity, cache_dtype(model, device), device)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids = ids
    stop = torch.tensor(list(cfg.stop_ids) or [-1], device=device)
    for _ in range(cfg.max_new_tokens):
        logits = model(step_ids if use_cache else ids, attention_mask=mask, cache=cache)[:, -1].float()
        nxt = sample_next(logits, cfg, generator)
        alive = ~done
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        for i in alive.nonzero().flatten().tolist():
            out[i].append(int(nxt[i]))
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        # Rows that already stopped keep going as padding, masked out of every later step.
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        step_ids = nxt[:, None]
    model.train(was_training)
    return out
