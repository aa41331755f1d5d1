"""Sampling with a KV cache, batched with left padding; `python -m models.generate`.

Example:
    python -m models.generate --model Qwen/Qwen2.5-0.5B --prompt "The capital of France is" \
        --max-new-tokens 20 --temperature 0
prints only the generated continuation on stdout.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.decoder import Decoder, KVCache
from models.virtual_tokens import cache_slots


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # tokens generated per prompt at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability sums to top_p
    stop_ids: tuple[int, ...] = ()  # a row stops after producing any of these (eos)
    seed: int | None = None  # seeds the sampler's own generator, for repeatable samples


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
        dtype = model.embedding_dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        capacity = cache_slots(model) + ids.shape[1] + cfg.max_new_tokens
        cache = KVCache.empty(model.config, B, capacity, dtype, device)
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


def load_for_inference(model_name: str, adapter: str | None, dtype: str | None, device: str | None):
    """Load the base and attach the adapter, if any (LoRA, or PEFT prompt/prefix tuning).

    An adapter trained on a 4-bit base runs on the same 4-bit base (quantized while loading), so
    generation computes what was trained.
    """
    from models.checkpoint import load_pretrained
    from models.config import dtype_from_name

    if adapter is None:
        return load_pretrained(model_name, dtype=dtype, device=device)
    from models.virtual_tokens_io import is_virtual_token_adapter, load_virtual_tokens

    if is_virtual_token_adapter(adapter):  # prompt or prefix tuning: the base is used as it is
        model = load_pretrained(model_name, dtype=dtype, device=device)
        load_virtual_tokens(model, adapter)
        return model.eval()
    from lora.adapter_io import load_adapter, read_training_record

    record = read_training_record(adapter)
    compute = dtype_from_name(record.get("compute_dtype"))
    quantize = record.get("base_quantization")
    if quantize:  # re-quantizing from another dtype would give other 4-bit codes than those trained on
        dtype = record.get("base_dtype") or dtype
    model = load_pretrained(model_name, dtype=dtype, device=device, quantize=quantize, compute_dtype=compute,
                            quantize_embeddings=bool(quantize and record.get("quantized_embeddings")))
    load_adapter(model, adapter)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--adapter", help="adapter directory written by train.run (or PEFT)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    args = p.parse_args(argv)
    from models.hub import CheckpointError
    from models.tokenizer import load_tokenizer

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        print("error: need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tok = load_tokenizer(args.model)
        model = load_for_inference(args.model, args.adapter, args.dtype, device)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = args.prompt
    if args.chat:
        text = tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, tuple(sorted(tok.stop_ids)), args.seed)
    new = generate(model, [prompt_ids], cfg, pad_id=tok.pad_id)[0]
    print(tok.decode(new, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
