"""What each method trains and how its result is saved.

    full   every weight, float32 master copies; saved as a Hugging Face model in `model/`
    lora   low-rank adapters (float32) on a frozen base kept in the compute dtype; PEFT adapter in `adapter/`
    qlora  the same adapters on a frozen NF4 base quantized while loading; PEFT adapter in `adapter/`
    prompt N virtual input embeddings (float32) before the inputs of a frozen base; PEFT adapter in `adapter/`
    prefix N virtual keys/values per layer (float32, optionally through an MLP); PEFT adapter in `adapter/`
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora.adapter_io import save_adapter
from lora.inject import LoraConfig, inject_lora
from models.checkpoint import load_pretrained, save_pretrained
from models.virtual_tokens import PrefixEncoder, PromptEmbedding, attach
from models.virtual_tokens_io import save_virtual_tokens
from train.config import ConfigError, TrainConfig

ADAPTER_METHODS = ("lora", "qlora")
VIRTUAL_TOKEN_METHODS = ("prompt", "prefix")


def lora_config(cfg: TrainConfig) -> LoraConfig:
    s = cfg.lora
    return LoraConfig(
        r=s.rank,
        alpha=s.alpha,
        dropout=s.dropout,
        target_modules=list(s.target_modules),
        use_rslora=s.use_rslora,
        use_dora=s.use_dora,
    )


def build_model(cfg: TrainConfig, model_path: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Load the base for `cfg.run.method` and mark exactly the parameters it trains.

    Trainable tensors are float32 (the master copies the optimizer updates); frozen base weights of
    lora/qlora stay in the compute dtype, which is what autocast would cast them to anyway.
    """
    method = cfg.run.method
    if method == "full":
        model = load_pretrained(model_path, dtype=torch.float32, device=device)
        model.requires_grad_(True)
    elif method in ADAPTER_METHODS:
        quantize = "nf4" if method == "qlora" else None
        model = load_pretrained(model_path, dtype=compute_dtype, device=device, quantize=quantize,
                                compute_dtype=compute_dtype, quantize_embeddings=cfg.lora.quantize_embeddings)
        model.requires_grad_(False)
        try:
            inject_lora(model, lora_config(cfg))
        except ValueError as err:
            raise ConfigError(f"--target-modules: {err}", field="lora.target_modules") from None
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    elif method in VIRTUAL_TOKEN_METHODS:
        model = load_pretrained(model_path, dtype=compute_dtype, device=device)
        attach(model, virtual_tokens(cfg, model, model_path))
    else:
        raise ValueError(f"unknown --method {method}")
    model.gradient_checkpointing = cfg.run.grad_checkpointing
    return model.train()


def virtual_tokens(cfg: TrainConfig, model: nn.Module, model_path: str) -> nn.Module:
    """The prompt embedding or prefix encoder `cfg` asks for, initialised as PEFT would."""
    s = cfg.prompt
    if cfg.data.pack:  # a packed row holds several examples, each would need its own virtual tokens
        raise ConfigError(f"--method {cfg.run.method} does not work with --pack", field="data.pack")
    if cfg.run.method == "prefix":
        return PrefixEncoder(s.num_virtual_tokens, model.config, s.prefix_projection)
    module = PromptEmbedding(s.num_virtual_tokens, model.config.hidden_size)
    if s.prompt_init_text is not None:
        from models.tokenizer import load_tokenizer

        try:
            module.init_from_tokens(model.model.embed_tokens, load_tokenizer(model_path).encode(s.prompt_init_text))
        except ValueError as err:
            raise ConfigError(str(err), field="prompt.prompt_init_text") from None
    return module


def save_result(model: nn.Module, cfg: TrainConfig, out_dir: Path, model_path: str) -> Path:
    """Write the run's product: `adapter/` (PEFT format) for lora/qlora/prompt/prefix, `model/` (HF format) for full."""
    if cfg.run.method in VIRTUAL_TOKEN_METHODS:
        return save_virtual_tokens(model, out_dir / "adapter", model_path, init_text=cfg.prompt.prompt_init_text)
    if cfg.run.method in ADAPTER_METHODS:
        return save_adapter(model, out_dir / "adapter", lora_config(cfg), base_model_name_or_path=model_path)
    return save_pretrained(model, out_dir / "model", tokenizer_dir=getattr(model, "source_dir", None))
