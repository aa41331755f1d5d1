"""Evaluation during training: val loss and perplexity, plus task metrics.

    lm              val_loss, perplexity
    classification  + accuracy and macro-F1: each validation example's completion is one label out of
                    the set of completions seen in validation; the prediction is the label whose tokens
                    the model finds most likely after the prompt (summed log-probability, EOS included)
    generation      + exact match, and BLEU-4 and chrF (sacreBLEU, 0-100), of greedy generations on a sample
                    of validation examples
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.decoder import KVCache
from models.generate import SamplingConfig, cache_dtype, generate
from train.data import Datasets, Record, generation_prompt
from train.distributed import Parallel, all_gather
from train.loader import rank_share
from train.loop import SINGLE, autocast_context, evaluate_loss
from train.metrics import accuracy, bleu, chrf, exact_match, macro_f1, perplexity


def evaluate(
    model: nn.Module,
    val_batches: Sequence[dict[str, torch.Tensor]],
    val_records: Sequence[Record],
    tokenizer,
    task: str,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    generation_samples: int = 32,
    parallel: Parallel = SINGLE,
) -> dict[str, float]:
    """All metrics of `task` on the validation set, as plain floats (the same on every rank).

    With several processes `val_batches` is this rank's share (train.loader.eval_batches) and the
    losses are summed over ranks. Task predictions are split over DDP ranks and gathered; a sharded
    (FSDP2) model needs every rank in every forward, so there each rank predicts every record.
    """
    loss = evaluate_loss(model, val_batches, device, autocast_dtype, parallel)
    metrics = {"val_loss": loss, "perplexity": perplexity(loss)}
    if task == "classification":
        metrics.update(classification_metrics(model, val_records, tokenizer, device, autocast_dtype, parallel))
    elif task == "generation":
        metrics.update(generation_metrics(model, val_records[:generation_samples], tokenizer, device, autocast_dtype,
                                          parallel))
    return metrics


def _split(records: Sequence[Record], parallel: Parallel) -> Sequence[Record]:
    if parallel.fsdp:
        return records
    return records[rank_share(len(records), parallel.rank, parallel.world_size)]


def _gathered(predictions: list, parallel: Parallel) -> list:
    """All ranks' predictions in record order (each rank predicted its contiguous share)."""
    if parallel.fsdp or not parallel.enabled:
        return predictions
    return [p for part in all_gather(parallel, predictions) for p in part]


@torch.no_grad()
def label_log_likelihoods(
    model: nn.Module, prompt: list[int], labels: list[list[int]], device: torch.device, autocast_dtype
) -> list[float]:
    """Summed log-probability of each label's tokens after `prompt`.

    The prompt runs once into a KV cache, which is then copied for every label: the labels' tokens
    (right-padded, which cannot change the positions before the padding) run as one batch on top of it.
    Prompts are long and labels short, so this costs about one prompt instead of one per label.
    """
    n, P, L = len(labels), len(prompt), max(len(lab) for lab in labels)
    with autocast_context(device, autocast_dtype):
        cache = KVCache.empty(model.config, 1, model.num_virtual_tokens + P + L, cache_dtype(model, device), device)
        ids = torch.tensor([prompt], device=device)
        first = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids), cache=cache)[0, -1].float(), -1)
        scores = [float(first[lab[0]]) for lab in labels]
        if L == 1:
            return scores
        cache.keys = [k.expand(n, -1, -1, -1).contiguous() for k in cache.keys]
        cache.values = [v.expand(n, -1, -1, -1).contiguous() for v in cache.values]
        rest = torch.zeros((n, L - 1), dtype=torch.long, device=device)
        for i, lab in enumerate(labels):
            rest[i, : len(lab) - 1] = torch.tensor(lab[:-1], device=device)
        mask = torch.ones((n, P + L - 1), dtype=torch.long, device=device)
        logp = torch.log_softmax(model(rest, attention_mask=mask, cache=cache).float(), -1)  # [n, L-1, V]
    for i, lab in enumerate(labels):
        if len(lab) > 1:
            scores[i] += float(logp[i, torch.arange(len(lab) - 1, device=device), torch.tensor(lab[1:], device=device)].sum())
    return scores


def classification_metrics(model, records: Sequence[Record], tokenizer, device, autocast_dtype,
                           parallel: Parallel = SINGLE) -> dict[str, float]:
    prompts = [generation_prompt(r, tokenizer) for r in records]
    label_set = sorted({ref.strip() for _, ref in prompts})
    label_ids = [tokenizer.encode(lab, add_bos=False) + [tokenizer.eos_id] for lab in label_set]
    was_training = model.training
    model.eval()
    predictions = []
    for ids, _ in _split(prompts, parallel):
        scores = label_log_likelihoods(model, ids, label_ids, device, autocast_dtype)
        predictions.append(label_set[max(range(len(scores)), key=scores.__getitem__)])
    model.train(was_training)
    predictions = _gathered(predictions, parallel)
    golds = [ref.strip() for _, ref in prompts]
    return {"accuracy": accuracy(predictions, golds), "macro_f1": macro_f1(predictions, golds, label_set)}


def generation_metrics(model, records: Sequence[Record], tokenizer, device, autocast_dtype,
                       parallel: Parallel = SINGLE) -> dict[str, float]:
    references = [generation_prompt(r, tokenizer)[1].strip() for r in records]
    longest = max((len(tokenizer.encode(ref, add_bos=False)) for ref in references), default=1)
    # one generation length for all ranks, so splitting the records cannot change a prediction
    predictions, _ = generate_references(model, _split(records, parallel), tokenizer, device, autocast_dtype,
                                         max_new_tokens=longest + 8)
    predictions = _gathered(predictions, parallel)
    return {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references),
            "exact_match": exact_match(predictions, references)}


def generate_references(
    model, records: Sequence[Record], tokenizer, device, autocast_dtype, max_new_tokens: int | None = None
) -> tuple[list[str], list[str]]:
    """Greedy continuations of each record's prompt, and the references they should match."""
    prompts = [generation_prompt(r, tokenizer) for r in records]
    if not prompts:
        return [], []
    longest = max((len(tokenizer.encode(ref, add_bos=False)) for _, ref in prompts), default=1)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens or longest + 8, stop_ids=tuple(sorted(tokenizer.stop_ids)))
    with autocast_context(device, autocast_dtype):
        outs = generate(model, [ids for ids, _ in prompts], cfg, pad_id=tokenizer.pad_id)
    predictions = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return predictions, [ref.strip() for _, ref in prompts]


def sample_generations(model, data: Datasets, tokenizer, device, autocast_dtype,
                       n: int = 3) -> tuple[list[str], list[str], list[str]] | None:
    """(prompts, greedy generations, references) of `n` records spread over the validation set (else the
    training set), for a look at what the model does; None when no record has a prompt."""
    pool = [r for r in (data.val_records or data.train_records) if r.shape != "text"]
    records = pool[:: max(1, len(pool) // n)][:n]  # spread over the set, not its first few lines
    if not records:
        return None
    preds, refs = generate_references(model, records, tokenizer, device, autocast_dtype, max_new_tokens=32)
    return [r.prompt if r.shape != "chat" else r.messages[-2]["content"] for r in records], preds, refs
