"""train.evaluate's label scoring, which shares one prompt's KV cache between labels, against the plain
computation: every label appended to the prompt and run whole, log-softmax read at the label's tokens."""
from __future__ import annotations

import pytest
import torch

import models
from lora import LoraConfig, inject_lora
from prompt import PrefixEncoder, PromptEmbedding, attach
from train.evaluate import label_log_likelihoods

LABELS = [[7], [9, 4], [5, 11, 3], [12, 2, 8, 6]]  # lengths 1-4: padding and the one-token case


@torch.no_grad()
def _plain(model, prompt, labels):
    out = []
    for lab in labels:
        ids = torch.tensor([prompt + lab])
        logp = torch.log_softmax(model(ids).float(), -1)[0]
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(lab)))
    return out


@pytest.mark.parametrize("extra", ["none", "lora", "prefix", "prompt"])
def test_shared_prompt_scores_equal_whole_sequences(hf_checkpoint, extra):
    model = models.load_pretrained(hf_checkpoint()[0], dtype=torch.float32)
    torch.manual_seed(0)
    if extra == "lora":
        inject_lora(model, LoraConfig(r=4, alpha=8))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter matter
    elif extra == "prefix":
        attach(model, PrefixEncoder(3, model.config))
    elif extra == "prompt":
        attach(model, PromptEmbedding(4, model.config.hidden_size))
    model.eval()
    prompt = [1, 15, 22, 9, 30, 4, 17]
    got = label_log_likelihoods(model, prompt, LABELS, torch.device("cpu"), None)
    want = _plain(model, prompt, LABELS)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(x, 3) for x in got)) == len(LABELS)  # the labels are told apart
    single = label_log_likelihoods(model, prompt, [[7], [9]], torch.device("cpu"), None)
    assert single == pytest.approx(want[:1] + [_plain(model, prompt, [[9]])[0]], abs=1e-4)
