"""NF4 4-bit quantization (QLoRA's format, bit-exact with bitsandbytes): a frozen 4-bit linear layer, and a
4-bit token embedding with a tied output head.

    from quant import NF4Embedding, NF4Linear, QuantizedHead, quantize_nf4, dequantize_nf4
    layer = NF4Linear.from_weight(weight, bias, compute_dtype=torch.bfloat16)   # weight [out, in]
    y = layer(x)                       # dequantize-on-the-fly matmul, backward w.r.t. x only
    w = layer.dequantize(torch.float32)
    state = quantize_nf4(w); w2 = dequantize_nf4(state, torch.bfloat16)
    embed = NF4Embedding.from_weight(table)   # table [V, C], C % 64 == 0; embed(ids) -> [..., C]
    head = QuantizedHead(embed)                # tied lm_head: logits = x @ table.T, VOCAB_CHUNK rows at a time
"""
from quant.backend import DEFAULT_BACKEND, bnb_quant_state, dequantize, dequantize_bnb
from quant.embedding import NF4Embedding, QuantizedHead
from quant.linear import NF4Linear
from quant.nf4 import (
    BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4_VALUES,
    NF4Tensor,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    nf4_nbytes,
    quantize_nf4,
)
from quant.weights import NF4Weights

__all__ = [
    "BLOCKSIZE",
    "DEFAULT_BACKEND",
    "NESTED_BLOCKSIZE",
    "NF4Embedding",
    "NF4Linear",
    "NF4Tensor",
    "NF4Weights",
    "NF4_VALUES",
    "QuantizedHead",
    "bnb_quant_state",
    "dequantize",
    "dequantize_absmax",
    "dequantize_bnb",
    "dequantize_nf4",
    "dynamic_code",
    "nf4_code",
    "nf4_nbytes",
    "quantize_nf4",
]
