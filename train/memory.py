"""Peak-memory estimate of a training run, checked before training starts (the "safety valve").

`estimate_peak_bytes` is a pure function of the model's shape and the run's settings; `check_fits`
compares it with what the device has free (CUDA: `mem_get_info`; CPU: MemAvailable in /proc/meminfo)
and, when it will not fit, names settings that would, instead of letting the run die later with OOM.

The model, in bytes (p = parameters; a = compute-dtype bytes, 2 for bf16 autocast, 4 for float32):

    weights      trainable p x 4 (float32 masters); frozen p x a; NF4 block linears (and with
                 --quantize-embeddings the embedding and head) quant.nf4.nf4_nbytes(p), ~p x 4.127/8
    grads        trainable p x 4, all of them at the optimizer step; at the start of backward (where the
                 activations peak) only the first ones made: the output head's for full fine-tuning, every
                 one after the first micro-batch of an accumulated step
    optimizer    trainable p x 8 (AdamW: two float32 moments) or x 2 (8-bit AdamW)
    step scratch trainable p x 4 (foreach AdamW's temporaries while it steps; activations are gone then)
    autocast     full fine-tuning under bf16: a bf16 copy of every matrix, cached for forward + backward
    activations  per token per block, what autograd keeps (norm inputs/outputs, q/k/v, attention
                 output, SwiGLU's four intermediate-width tensors; LoRA inputs and dropout masks), x layers; with --grad-checkpointing one block input per layer
                 plus one block's full set during its recomputation
    logits       one chunk (train.loss.chunk_rows(V) target rows) of float32 logits, reused in place for their
                 softmax gradient, plus its bf16 copy under bf16 autocast
                 (V: the head's vocabulary slice when it is 4-bit)
    slack        +25% of activations and logits: allocator fragmentation (freed blocks that cannot be
                 reused for the next, differently sized tensors; measured on CPU with glibc)
    runtime      a fixed 32 MiB: kernels, thread pools and library state that appear with the first
                 training step (measured on CPU with a 2-layer model: 24-26 MiB for full, LoRA and QLoRA;
                 on CUDA the context is already outside the free memory)

It ignores allocator fragmentation and the transient of loading the checkpoint; tests/test_memory.py
measures real peaks against it and states the factor the estimate is within.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lora.inject import LoraConfig
from models.checkpoint import load_config
from models.config import ModelConfig
from quant.nf4 import nf4_nbytes
from train.config import LoraSettings, TrainConfig
from train.errors import RunError
from train.loss import chunk_rows
from train.methods import METHODS

EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")
ALLOCATOR_SLACK = 0.25  # fraction of activations + logits lost to fragmentation (tests/test_memory.py)


@dataclass(frozen=True)
class Settings:
    """What the estimate depends on besides the model's shape."""

    method: str  # a name in train.methods.METHODS
    batch_size: int  # rows per micro-batch
    seq_len: int  # tokens per row
    compute_bytes: int = 4  # 2 under bf16 autocast, 4 in float32
    grad_checkpointing: bool = False
    optim: str = "adamw"
    lora: LoraConfig = field(default_factory=lambda: LoraSettings().adapter())  # lora, qlora: rank, dropout, targets
    virtual_tokens: int = 20
    quantize_embeddings: bool = False  # qlora: embedding and head in NF4 as well
    grad_accum: int = 1  # micro-batches per optimizer step: after the first, every gradient is alive in backward


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes by component; `peak` is what must fit."""

    weights: int
    grads: int
    backward_grads: int  # gradients alive while every activation still is (the start of backward)
    optimizer: int
    autocast_copies: int
    activations: int
    logits: int
    step_scratch: int
    slack: int
    trainable_params: int
    runtime: int = 32 * 2**20

    @property
    def peak(self) -> int:
        """Bytes at the worst moment: the start of backward (every activation, the first gradients), or the
        optimizer step (every gradient and the step's temporaries) if that is larger. In between, backward
        frees each block's activations as it makes the block's gradients."""
        static = self.weights + self.optimizer + self.runtime
        backward = self.autocast_copies + self.activations + self.logits + self.slack + self.backward_grads
        return static + max(backward, self.grads + self.step_scratch)

    def summary(self) -> str:
        parts = {k: v for k, v in asdict(self).items() if k != "trainable_params" and v}
        return f"{gib(self.peak)} (" + ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in parts.items()) + ")"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def activation_bytes_per_token_layer(cfg: ModelConfig, s: Settings) -> int:
    """Bytes autograd keeps per token for one decoder block (compute dtype), the method's extras included."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    # two norms (input + output each), q/k/v before and after rope, attention output, SwiGLU's four
    elems = 4 * h + 3 * q + 4 * kv + 4 * i
    return elems * s.compute_bytes + METHODS[s.method].activation_bytes(cfg, s)


def estimate_peak_bytes(cfg: ModelConfig, s: Settings) -> MemoryEstimate:
    """The breakdown of the peak memory (bytes) of one training step with settings `s`."""
    method = METHODS[s.method]
    trainable, frozen, nf4 = method.param_counts(cfg, s)
    tokens = s.batch_size * s.seq_len
    per_layer = activation_bytes_per_token_layer(cfg, s) * tokens
    residual = cfg.hidden_size * s.compute_bytes * tokens  # a block's input (kept per layer when checkpointing)
    layers = cfg.num_hidden_layers
    activations = layers * residual + per_layer if s.grad_checkpointing else layers * per_layer
    activations += 3 * residual  # embedding output, final norm, the hidden rows gathered for the loss
    vocab = method.loss_vocab(cfg, s)
    rows = min(chunk_rows(vocab), tokens)
    # train.loss keeps one chunk alive: float32 logits, turned into their gradient in place, and that
    # gradient's copy in the compute dtype (none in float32, where .to() returns the same tensor)
    logits = rows * vocab * (4 + (s.compute_bytes if s.compute_bytes != 4 else 0))
    optim_bytes = 2 if s.optim in EIGHT_BIT_OPTIMIZERS else 8
    first = trainable if s.grad_accum > 1 else method.first_gradients(cfg, s)
    return MemoryEstimate(
        weights=trainable * 4 + frozen * s.compute_bytes + (nf4_nbytes(nf4) if nf4 else 0),
        grads=trainable * 4,
        backward_grads=first * 4,
        optimizer=trainable * optim_bytes,
        autocast_copies=method.autocast_bytes(cfg, s),
        activations=activations,
        logits=logits,
        step_scratch=trainable * 4,
        slack=int(ALLOCATOR_SLACK * (activations + logits)),
        trainable_params=trainable,
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (bytes), or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def alternatives(cfg: ModelConfig, s: Settings, grad_accum: int, budget: int) -> list[str]:
    """Settings that would fit in `budget` bytes, each as the flags to pass, smallest change first."""
    options: list[tuple[str, Settings]] = []
    batch = s.batch_size // 2
    while batch >= 1:
        accum = grad_accum * s.batch_size // batch
        options.append((f"--batch-size {batch} --grad-accum {accum}", replace(s, batch_size=batch)))
        batch //= 2
    if not s.grad_checkpointing:
        options.append(("--grad-checkpointing", replace(s, grad_checkpointing=True)))
        if s.batch_size > 1:
            options.append((f"--grad-checkpointing --batch-size 1 --grad-accum {grad_accum * s.batch_size}",
                            replace(s, grad_checkpointing=True, batch_size=1)))
    options += METHODS[s.method].lighter(s)
    fits = [(flags, estimate_peak_bytes(cfg, alt).peak) for flags, alt in options]
    return [f"{flags} (~{gib(peak)})" for flags, peak in fits if peak <= budget][:4]


def check_fits(cfg: ModelConfig, s: Settings, grad_accum: int, device: torch.device) -> str | None:
    """None when the estimated peak fits the free memory of `device`; else a message for the user."""
    free = available_bytes(device)
    est = estimate_peak_bytes(cfg, s)
    if free is None or est.peak <= free:
        return None
    fixes = alternatives(cfg, s, grad_accum, free)
    advice = "; try " + " or ".join(fixes) if fixes else "; no smaller setting fits: use a smaller model or a bigger device"
    return (f"estimated peak memory {est.summary()} exceeds the {gib(free)} free on {device.type}"
            f"{advice}")


def check_run(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, fsdp: bool) -> None:
    """Refuse what cannot work before anything is loaded (RunError): no model or data, a window too short
    for --seq-len, an estimated peak above the free memory (skipped under FSDP2, whose ranks hold 1/world)."""
    if cfg.run.model is None or cfg.data.data is None:
        raise RunError("--model and --data are required (python -m demo runs the built-in example)")
    config = load_config(cfg.run.model)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise RunError(f"--seq-len {cfg.data.seq_len} exceeds the model's window of {config.max_position_embeddings} tokens")
    if not (fsdp or cfg.run.skip_memory_check):
        problem = check_fits(config, settings_from(cfg, amp_dtype), cfg.optim.grad_accum, device)
        if problem:
            raise RunError(problem)


def settings_from(cfg: TrainConfig, compute_dtype: torch.dtype | None) -> Settings:
    """Settings of a TrainConfig (`cfg`) run computing in `compute_dtype` (None: float32)."""
    return Settings(
        method=cfg.run.method, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
        compute_bytes=4 if compute_dtype in (None, torch.float32) else 2,
        grad_checkpointing=cfg.run.grad_checkpointing, optim=cfg.optim.optim, lora=cfg.lora.adapter(),
        virtual_tokens=cfg.prompt.num_virtual_tokens, quantize_embeddings=cfg.lora.quantize_embeddings,
        grad_accum=cfg.optim.grad_accum,
    )
