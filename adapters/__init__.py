"""Adapter directories of every kind (LoRA, prompt and prefix tuning; ours or PEFT's) put on a model.

    from adapters import attach, load_adapted
    adapted = load_adapted("Qwen/Qwen2.5-0.5B", "runs/qlora/adapter")
"""
from adapters.load import (
                           Adapted,
                           Adapter,
                           Prepared,
                           adapter_dir,
                           adapter_kind,
                           attach,
                           describe,
                           install,
                           load_adapted,
                           prepare,
                           trained_base,
)

__all__ = ["Adapted", "Adapter", "Prepared", "adapter_dir", "adapter_kind", "attach", "describe", "install", "load_adapted",
           "prepare", "trained_base"]
