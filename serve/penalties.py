"""Repetition penalties on next-token logits, as the OpenAI API and transformers define them.

    presence_penalty  p   logit[t] -= p            for every token t generated so far (OpenAI)
    frequency_penalty f   logit[t] -= f * count[t] for every token t generated so far (OpenAI)
    repetition_penalty r  logit[t] = logit[t] / r if > 0 else logit[t] * r, for every token t in the
                          prompt or generated so far (CTRL, as transformers' RepetitionPenaltyLogitsProcessor)

Applied to the logits before greedy choice, temperature and top-p, so they steer greedy decoding too.
Values 0, 0 and 1 leave the logits exactly as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Penalties:
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def off(self) -> bool:
        return self.presence == 0 and self.frequency == 0 and self.repetition == 1


def penalize(logits: torch.Tensor, prompt: list[int], generated: list[int], p: Penalties) -> torch.Tensor:
    """logits [V] of one row with `p` applied (a new tensor; `logits` is left as it is)."""
    if p.off:
        return logits
    out = logits.clone()
    if p.repetition != 1 and (prompt or generated):
        seen = torch.tensor(sorted(set(prompt) | set(generated)), device=logits.device)
        vals = out[seen]
        out[seen] = torch.where(vals > 0, vals / p.repetition, vals * p.repetition)
    if generated and (p.presence or p.frequency):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=out.shape[-1]).to(out.dtype)
        out -= p.frequency * counts + p.presence * (counts > 0).to(out.dtype)
    return out
