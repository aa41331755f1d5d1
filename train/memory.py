"""Peak-memory estimate of a training run, checked before training starts (the "safety valve").

`estimate_peak_bytes` is a pure function of the model's shape and the run's settings; `check_fits`
compares it with what the device has free (CUDA: `mem_get_info`; CPU: MemAvailable in /proc/meminfo)
and, when it will not fit, names settings that would, instead of letting the run die later with OOM.

The model, in bytes (p = parameters; a = compute-dtype bytes, 2 for bf16 autocast, 4 for float32):

    weights      trainable p x 4 (float32 masters); frozen p x a; NF4 block linears (and with
                 --quantize-embeddings the embedding and head) p x 4.127/8
    grads        trainable p x 4
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
    runtime      a fixed 96 MiB: kernels, allocator pools and library state that appear with the first
                 training step (measured on CPU; on CUDA the context is already outside the free memory)

It ignores allocator fragmentation and the transient of loading the checkpoint; tests/test_memory.py
measures real peaks against it and states the factor the estimate is within.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from models.config import ModelConfig
from quant.embedding import QuantizedHead
from train.loss import chunk_rows

NF4_BITS_PER_PARAM = 4.127  # 4-bit codes + double-quantized absmax (blocks of 64, second level of 256)
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")
ALLOCATOR_SLACK = 0.25  # fraction of activations + logits lost to fragmentation (tests/test_memory.py)


@dataclass(frozen=True)
class Settings:
    """What the estimate depends on besides the model's shape."""

    method: str  # full | lora | qlora | prefix | prompt
    batch_size: int  # rows per micro-batch
    seq_len: int  # tokens per row
    compute_bytes: int = 4  # 2 under bf16 autocast, 4 in float32
    grad_checkpointing: bool = False
    optim: str = "adamw"
    lora_rank: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    virtual_tokens: int = 20
    quantize_embeddings: bool = False  # qlora: embedding and head in NF4 as well


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes by component; `peak` is what must fit."""

    weights: int
    grads: int
    optimizer: int
    autocast_copies: int
    activations: int
    logits: int
    step_scratch: int
    slack: int
    trainable_params: int
    runtime: int = 96 * 2**20

    @property
    def peak(self) -> int:
        """Bytes at the worst moment: the end of backward, or the optimizer step if that is larger."""
        static = self.weights + self.grads + self.optimizer + self.runtime
        return static + max(self.autocast_copies + self.activations + self.logits + self.slack, self.step_scratch)

    def summary(self) -> str:
        parts = {k: v for k, v in asdict(self).items() if k != "trainable_params" and v}
        return f"{gib(self.peak)} (" + ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in parts.items()) + ")"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear in one decoder block."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _targets(s: Settings, names) -> list[str]:
    if "all-linear" in s.lora_targets:
        return list(names)
    return [n for n in names if n in s.lora_targets]


def param_counts(cfg: ModelConfig, s: Settings) -> tuple[int, int, int]:
    """(trainable, frozen dense, frozen NF4) parameter counts for the method."""
    shapes = _linear_shapes(cfg)
    block_linear = sum(a * b for a, b in shapes.values())
    block_other = 2 * cfg.hidden_size  # two RMSNorm weights (biases and q/k norms are negligible)
    embed = cfg.vocab_size * cfg.hidden_size
    outer = embed * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    layers = cfg.num_hidden_layers
    total = outer + layers * (block_linear + block_other)
    if s.method == "full":
        return total, 0, 0
    if s.method in ("prefix", "prompt"):
        per_token = cfg.hidden_size * (2 * layers if s.method == "prefix" else 1)
        return s.virtual_tokens * per_token, total, 0
    adapters = layers * sum(s.lora_rank * (a + b) for a, b in (shapes[n] for n in _targets(s, shapes)))
    if s.method == "qlora":
        nf4 = layers * block_linear + (outer - cfg.hidden_size if s.quantize_embeddings else 0)
        return adapters, total - nf4, nf4
    return adapters, total, 0


def activation_bytes_per_token_layer(cfg: ModelConfig, s: Settings) -> int:
    """Bytes autograd keeps per token for one decoder block (compute dtype)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = cfg.head_dim or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    # two norms (input + output each), q/k/v before and after rope, attention output, SwiGLU's four
    elems = 4 * h + 3 * q + 4 * kv + 4 * i
    if s.method in ("lora", "qlora"):
        shapes = _linear_shapes(cfg)
        targets = [shapes[n][0] for n in _targets(s, shapes)]
        elems += sum(targets) + s.lora_rank * len(targets)  # each adapter's own copy of its input, and x @ A
        if s.lora_dropout > 0:
            return elems * s.compute_bytes + sum(targets)  # plus a one-byte dropout mask per input element
    return elems * s.compute_bytes


def estimate_peak_bytes(cfg: ModelConfig, s: Settings) -> MemoryEstimate:
    """The breakdown of the peak memory (bytes) of one training step with settings `s`."""
    trainable, frozen, nf4 = param_counts(cfg, s)
    tokens = s.batch_size * s.seq_len
    per_layer = activation_bytes_per_token_layer(cfg, s) * tokens
    residual = cfg.hidden_size * s.compute_bytes * tokens  # a block's input (kept per layer when checkpointing)
    layers = cfg.num_hidden_layers
    activations = layers * residual + per_layer if s.grad_checkpointing else layers * per_layer
    activations += 3 * residual  # embedding output, final norm, the hidden rows gathered for the loss
    vocab = cfg.vocab_size
    if s.method == "qlora" and s.quantize_embeddings:  # the loss reads the 4-bit head by vocabulary slices
        vocab = min(vocab, QuantizedHead.VOCAB_CHUNK)
    rows = min(chunk_rows(vocab), tokens)
    # train.loss keeps one chunk alive: float32 logits, turned into their gradient in place, and that
    # gradient's copy in the compute dtype (none in float32, where .to() returns the same tensor)
    logits = rows * vocab * (4 + (s.compute_bytes if s.compute_bytes != 4 else 0))
    optim_bytes = 2 if s.optim in EIGHT_BIT_OPTIMIZERS else 8
    matrices = sum(a * b for a, b in _linear_shapes(cfg).values()) * layers
    autocast = matrices * 2 if s.method == "full" and s.compute_bytes == 2 else 0
    return MemoryEstimate(
        weights=trainable * 4 + frozen * s.compute_bytes + int(nf4 * NF4_BITS_PER_PARAM / 8),
        grads=trainable * 4,
        optimizer=trainable * optim_bytes,
        autocast_copies=autocast,
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
    if s.method == "qlora" and not s.quantize_embeddings:
        options.append(("--quantize-embeddings", replace(s, quantize_embeddings=True)))
    if s.method in ("full", "lora"):
        options.append(("--method qlora", replace(s, method="qlora")))
        options.append(("--method qlora --grad-checkpointing", replace(s, method="qlora", grad_checkpointing=True)))
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


def settings_from(cfg, compute_dtype: torch.dtype | None) -> Settings:
    """Settings of a TrainConfig (`cfg`) run computing in `compute_dtype` (None: float32)."""
    return Settings(
        method=cfg.run.method, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
        compute_bytes=4 if compute_dtype in (None, torch.float32) else 2,
        grad_checkpointing=cfg.run.grad_checkpointing, optim=cfg.optim.optim, lora_rank=cfg.lora.rank,
        lora_dropout=cfg.lora.dropout,
        lora_targets=tuple(cfg.lora.target_modules), virtual_tokens=cfg.prompt.num_virtual_tokens,
        quantize_embeddings=cfg.lora.quantize_embeddings,
    )
