"""LoRA, rsLoRA and DoRA adapters for the decoder, stored in PEFT's format.

    from lora import LoraConfig, inject_lora, trainable_report, save_adapter, load_adapter
    names = inject_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    print(trainable_report(model))
    ...train adapter_parameters(model, "default").values()...
    save_adapter(model, "out/adapter", config, base_model_name_or_path="meta-llama/Llama-3.2-1B")

Merging to a plain checkpoint: `python -m lora.merge --base MODEL --adapter DIR --output DIR`.
"""
from lora.adapter_io import (
    base_format,
    install_adapter,
    load_adapter,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from lora.inject import (
    LoraConfig,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    find_targets,
    inject_lora,
    lora_layers,
    lora_state_dict,
    mark_only_adapter_trainable,
    merge_lora,
    per_row_adapters,
    set_active_adapter,
    trainable_report,
    unload,
    unmerge_lora,
)
from lora.linear import LoRALinear

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "adapter_parameters",
    "base_format",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "inject_lora",
    "install_adapter",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "mark_only_adapter_trainable",
    "merge_lora",
    "per_row_adapters",
    "read_adapter_config",
    "read_adapter_tensors",
    "save_adapter",
    "set_active_adapter",
    "trainable_report",
    "unload",
    "unmerge_lora",
]
