"""Prompt tuning and prefix tuning: N trained virtual tokens in front of a frozen decoder, in PEFT's format.

    from prompt import PromptEmbedding, PrefixEncoder, attach, save_virtual_tokens, load_virtual_tokens
    attach(model, PrefixEncoder(20, model.config))        # model frozen, the prefix trains
    save_virtual_tokens(model, "out/adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B")
"""
from prompt.adapter_io import is_virtual_token_adapter, load_virtual_tokens, save_virtual_tokens
from prompt.virtual_tokens import PrefixEncoder, PromptEmbedding, VirtualTokens, attach

__all__ = ["PrefixEncoder", "PromptEmbedding", "VirtualTokens", "attach", "is_virtual_token_adapter",
           "load_virtual_tokens", "save_virtual_tokens"]
