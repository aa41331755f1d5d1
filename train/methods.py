"""The five fine-tuning methods, each one object: the only place that knows what a method does.

    full    every weight, float32 master copies; a Hugging Face model in `model/`
    lora    low-rank adapters (float32) on a frozen base kept in the compute dtype; a PEFT adapter in `adapter/`
    qlora   the same adapters on a frozen NF4 base quantized while loading; a PEFT adapter in `adapter/`
    prefix  N virtual keys/values per layer (float32, optionally through an MLP); a PEFT adapter in `adapter/`
    prompt  N virtual input embeddings (float32) before the inputs of a frozen base; a PEFT adapter in `adapter/`

A method owns its defaults (learning rate), the checks of the flags it cares about, how the model is
built (load, quantize, inject, what trains), its terms in the memory estimate (train.memory), and its
product (what is saved, where, with which record). The trainer, the config and the estimate ask
`METHODS[name]`; nothing else tests the method's name. A sixth method is one more class here.

Learning rates when --lr is not given: full and LoRA/QLoRA follow the seed chapter. Soft prompts and
prefixes are a few thousand parameters that must travel far from their init, so they want a rate ~100x
LoRA's: 3e-2 is what PEFT's prompt-tuning causal-LM example uses; prefix tuning trains key/value
activations directly and is the less stable of the two, so it gets the 1e-2 of PEFT's prefix example.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora.adapter_io import save_adapter
from lora.inject import inject_lora
from models.checkpoint import Loaded, load_checkpoint, save_pretrained
from models.config import ModelConfig
from models.tokenizer import load_tokenizer
from prompt.adapter_io import save_virtual_tokens
from prompt.virtual_tokens import PrefixEncoder, PromptEmbedding, attach
from quant import QuantizedHead
from train.errors import ConfigError

if TYPE_CHECKING:  # type hints only: both modules import this one
    from train.config import TrainConfig
    from train.memory import Settings


class Method:
    """What one fine-tuning method trains, how, and what it leaves behind."""

    name: str
    lr: float  # peak learning rate when --lr is not given
    demo_lr: float | None = None  # on the built-in demo (a real 135M model learning in 60 steps), if not `lr`
    product: str = "adapter"  # what the run writes into --output-dir: "adapter" (PEFT) or "model" (HF)
    shards: bool = False  # may train under --fsdp (worth it only when many parameters train)
    quantizes: bool = False  # holds the frozen base in NF4

    # ------------------------------------------------------------------ configuration
    def check(self, cfg: TrainConfig) -> None:
        """Raise ConfigError for a flag this method cannot honour."""
        if cfg.lora.quantize_embeddings and not self.quantizes:
            raise ConfigError(f"--quantize-embeddings is for --method qlora (the base of --method {self.name} "
                              "is not quantized)", field="lora.quantize_embeddings")
        if cfg.run.fsdp and not self.shards:
            raise ConfigError(f"--fsdp shards full and lora training; --method {self.name} trains few "
                              "enough parameters for DDP (run torchrun without --fsdp)", field="run.fsdp")

    # ------------------------------------------------------------------ the model
    def build(self, cfg: TrainConfig, model_path: str, device: torch.device, compute_dtype: torch.dtype) -> Loaded:
        """Load the base and mark exactly the parameters this method trains (float32 master copies).

        Frozen base weights stay in the compute dtype, which is what autocast would cast them to anyway.
        `device` may be "meta" (a skeleton for FSDP2, filled later) for the methods that shard.
        """
        loaded = self.load(cfg, model_path, device, compute_dtype)
        self.prepare(cfg, loaded, model_path)
        loaded.model.gradient_checkpointing = cfg.run.grad_checkpointing
        if cfg.run.compile:
            loaded.model.compile_blocks()
        loaded.model.train()
        return loaded

    def load(self, cfg: TrainConfig, model_path: str, device: torch.device, compute_dtype: torch.dtype) -> Loaded:
        return load_checkpoint(model_path, dtype=compute_dtype, device=device)

    def prepare(self, cfg: TrainConfig, loaded: Loaded, model_path: str) -> None:
        """Freeze what stays frozen and add what trains."""
        raise NotImplementedError

    def save(self, loaded: Loaded, cfg: TrainConfig, out_dir: Path, model_path: str) -> Path:
        """Write the product into `out_dir / self.product`; return its path."""
        raise NotImplementedError

    # ------------------------------------------------------------------ memory-estimate terms
    def param_counts(self, config: ModelConfig, s: Settings) -> tuple[int, int, int]:
        """(trainable, frozen dense, frozen NF4) parameter counts."""
        raise NotImplementedError

    def activation_bytes(self, config: ModelConfig, s: Settings) -> int:
        """Bytes autograd keeps per token per block beyond the frozen block's own activations."""
        return 0

    def first_gradients(self, config: ModelConfig, s: Settings) -> int:
        """Trainable parameters whose gradients exist before backward frees any activation (default: all of
        them, which for adapters is little)."""
        return self.param_counts(config, s)[0]

    def autocast_bytes(self, config: ModelConfig, s: Settings) -> int:
        """Bytes of the compute-dtype copies autocast caches for the step (of trainable matrices)."""
        return 0

    def loss_vocab(self, config: ModelConfig, s: Settings) -> int:
        """Vocabulary width of one chunk of the loss's logits."""
        return config.vocab_size

    def lighter(self, s: Settings) -> list[tuple[str, Settings]]:
        """Other settings of this run that need less memory, as (flags to pass, settings), best first."""
        return []


def _total_params(config: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, those of the block linears, those of the embedding and untied head)."""
    linear = config.num_hidden_layers * sum(a * b for a, b in config.linear_shapes().values())
    norms = config.num_hidden_layers * 2 * config.hidden_size + config.hidden_size  # q/k norms, biases: negligible
    outer = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return linear + norms + outer, linear, outer


def _as_qlora(s: Settings) -> list[tuple[str, Settings]]:
    """The same run as QLoRA, with and without activation checkpointing."""
    return [("--method qlora", dataclasses.replace(s, method="qlora")),
            ("--method qlora --grad-checkpointing", dataclasses.replace(s, method="qlora", grad_checkpointing=True))]


class FullFineTuning(Method):
    name, lr, demo_lr, product, shards = "full", 2e-5, 1e-4, "model", True

    def load(self, cfg, model_path, device, compute_dtype) -> Loaded:
        return load_checkpoint(model_path, dtype=torch.float32, device=device)  # the weights are the masters

    def prepare(self, cfg, loaded, model_path) -> None:
        loaded.model.requires_grad_(True)

    def save(self, loaded, cfg, out_dir, model_path) -> Path:
        return save_pretrained(loaded.model, out_dir / self.product, tokenizer_dir=loaded.directory)

    def param_counts(self, config, s):
        return _total_params(config)[0], 0, 0

    def first_gradients(self, config, s) -> int:
        """The output head's (or the tied embedding's): backward starts there; each block's gradients come
        as its activations go."""
        return config.vocab_size * config.hidden_size

    def autocast_bytes(self, config, s) -> int:
        """Under bf16 autocast a bf16 copy of every block matrix, cached for forward and backward."""
        return 2 * _total_params(config)[1] if s.compute_bytes == 2 else 0

    def lighter(self, s):
        return _as_qlora(s)


class LoRA(Method):
    name, lr, demo_lr, shards = "lora", 2e-4, 1e-3, True

    def prepare(self, cfg, loaded, model_path) -> None:
        model = loaded.model
        model.requires_grad_(False)
        try:
            inject_lora(model, cfg.lora.adapter())
        except ValueError as err:
            raise ConfigError(f"--target-modules: {err}", field="lora.target_modules") from None
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def save(self, loaded, cfg, out_dir, model_path) -> Path:
        return save_adapter(loaded.model, out_dir / self.product, cfg.lora.adapter(), base_model_name_or_path=model_path,
                            base=loaded.format)

    def _adapted(self, config: ModelConfig, s: Settings) -> list[tuple[int, int]]:
        """(in, out) of every block linear the adapters wrap, for one block."""
        shapes, targets = config.linear_shapes(), s.lora.target_modules
        if isinstance(targets, str):  # "all-linear", or a regex: count every linear (an upper bound)
            return list(shapes.values())
        return [shape for name, shape in shapes.items() if name in targets]

    def param_counts(self, config, s):
        adapters = config.num_hidden_layers * sum(s.lora.r * (a + b) for a, b in self._adapted(config, s))
        return adapters, _total_params(config)[0], 0

    def activation_bytes(self, config, s) -> int:
        """Each adapter's own copy of its input and x @ A (compute dtype), and a one-byte dropout mask."""
        inputs = sum(a for a, _ in self._adapted(config, s))
        kept = (inputs + s.lora.r * len(self._adapted(config, s))) * s.compute_bytes
        return kept + (inputs if s.lora.dropout > 0 else 0)

    def lighter(self, s):
        return _as_qlora(s)


class QLoRA(LoRA):
    name, quantizes, shards = "qlora", True, False

    def load(self, cfg, model_path, device, compute_dtype) -> Loaded:
        return load_checkpoint(model_path, dtype=compute_dtype, device=device, quantize="nf4",
                               compute_dtype=compute_dtype, quantize_embeddings=cfg.lora.quantize_embeddings)

    def param_counts(self, config, s):
        adapters, total, _ = super().param_counts(config, s)
        _, linear, outer = _total_params(config)
        nf4 = linear + (outer if s.quantize_embeddings else 0)
        return adapters, total - nf4, nf4

    def loss_vocab(self, config, s) -> int:
        """With a 4-bit head the loss reads it by vocabulary slices."""
        return min(config.vocab_size, QuantizedHead.VOCAB_CHUNK) if s.quantize_embeddings else config.vocab_size

    def lighter(self, s):
        return [] if s.quantize_embeddings else [("--quantize-embeddings", dataclasses.replace(s, quantize_embeddings=True))]


class VirtualTokenMethod(Method):
    """Prompt and prefix tuning: the frozen base in the compute dtype, N trained virtual tokens in front."""

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.data.pack:  # a packed row holds several examples, each would need its own virtual tokens
            raise ConfigError(f"--method {self.name} does not work with --pack", field="data.pack")

    def prepare(self, cfg, loaded, model_path) -> None:
        attach(loaded.model, self.virtual_tokens(cfg, loaded.model, model_path))

    def virtual_tokens(self, cfg: TrainConfig, model: nn.Module, model_path: str) -> nn.Module:
        raise NotImplementedError

    def save(self, loaded, cfg, out_dir, model_path) -> Path:
        return save_virtual_tokens(loaded.model, out_dir / self.product, model_path, init_text=cfg.prompt.prompt_init_text)

    def param_counts(self, config, s):
        return s.virtual_tokens * self.token_width(config), _total_params(config)[0], 0

    def token_width(self, config: ModelConfig) -> int:
        """Trained numbers per virtual token."""
        raise NotImplementedError


class PrefixTuning(VirtualTokenMethod):
    name, lr = "prefix", 1e-2

    def token_width(self, config) -> int:
        """A key and a value per layer (counted at hidden width, an upper bound under grouped-query attention)."""
        return 2 * config.num_hidden_layers * config.hidden_size

    def virtual_tokens(self, cfg, model, model_path) -> nn.Module:
        """The keys and values the base computes for --prefix-init-text; PEFT's random N(0,1) when it is
        empty or the prefix goes through --prefix-projection's MLP."""
        s = cfg.prompt
        module = PrefixEncoder(s.num_virtual_tokens, model.config, s.prefix_projection)
        if s.prefix_init_text and not s.prefix_projection:
            _init(module.init_from_text, model, load_tokenizer(model_path).encode(s.prefix_init_text), "prefix")
        return module


class PromptTuning(VirtualTokenMethod):
    name, lr = "prompt", 3e-2

    def token_width(self, config) -> int:
        return config.hidden_size

    def virtual_tokens(self, cfg, model, model_path) -> nn.Module:
        """PEFT's TEXT init from --prompt-init-text; its RANDOM one when that is empty."""
        module = PromptEmbedding(cfg.prompt.num_virtual_tokens, model.config.hidden_size)
        if cfg.prompt.prompt_init_text:
            ids = load_tokenizer(model_path).encode(cfg.prompt.prompt_init_text)
            _init(module.init_from_tokens, model.model.embed_tokens, ids, "prompt")
        return module


def _init(init, source: nn.Module, token_ids: list[int], which: str) -> None:
    """Run a virtual-token init from text; an init text that encodes to nothing is a ConfigError."""
    try:
        init(source, token_ids)
    except ValueError as err:
        raise ConfigError(f"--{which}-init-text: {err}", field=f"prompt.{which}_init_text") from None


METHODS: dict[str, Method] = {m.name: m for m in (FullFineTuning(), LoRA(), QLoRA(), PrefixTuning(), PromptTuning())}
