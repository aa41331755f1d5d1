"""NF4Embedding and QuantizedHead: a large-vocabulary embedding matrix [V, C] held once, in 4 bits.

At Qwen2.5-0.5B's shape (151,936 x 896) the table is 260 MiB in bfloat16 and 67 MiB in NF4 (quant.nf4's
format, bit-exact with bitsandbytes, in the same four buffers as NF4Linear). NF4Embedding looks rows up;
QuantizedHead, the output head of a model with tied embeddings, holds the very same NF4Embedding and
multiplies by it VOCAB_CHUNK rows at a time, so the dense [V, C] matrix never exists.

Every row is whole 64-blocks (C % 64 == 0, checked), so rows r0..r1 are the packed bytes
[r0*C/2, r1*C/2) and the scales of blocks [r0*C/64, r1*C/64): a run of complete NF4 blocks that can be
dequantized alone, with the bits of the full dequantization (tests/test_nf4_embedding.py). The scales
are computed for those blocks only, by the same float32 operations as quant.nf4.dequantize_absmax.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quant.backend import decode_blocks, wants_cpu_kernel
from quant.backend import scratch as scratch_buffer
from quant.nf4 import BLOCKSIZE, NF4Tensor, dynamic_code, quantize_nf4
from quant.weights import NF4Weights

# ---------------------------------------------------------------------- rows of an NF4 matrix


def block_scales(state: NF4Tensor, codes: Tensor, blocks: Tensor) -> Tensor:
    """float32 [k]: the scales of the 64-blocks `blocks` (int64 [k]) whose 8-bit codes are `codes` (uint8 [k]).

    The operations of quant.nf4.dequantize_absmax (code value times its 256-group's nested absmax, plus
    the offset, each rounded in float32), elementwise: the same bits as dequantize_absmax(state)[blocks].
    """
    nested = state.nested_absmax.index_select(0, blocks // state.nested_blocksize)
    return dynamic_code(state.device)[codes.to(torch.int64)] * nested + state.offset


def dequantize_rows(state: NF4Tensor, start: int, stop: int, backend: str = "auto", scratch: bool = False) -> Tensor:
    """Rows [start, stop) of the [V, C] matrix `state` (C % 64 == 0), in state.dtype: [stop-start, C].

    Bit-identical to dequantize_nf4(state)[start:stop]; touches only those rows' bytes and scales.
    scratch: on CPU, write into quant.backend.scratch's per-thread buffer (valid until its next use).
    """
    vocab, cols = state.shape
    if not 0 <= start <= stop <= vocab:
        raise IndexError(f"dequantize_rows: rows [{start}, {stop}) are not within [0, {vocab})")
    b0, b1 = start * cols // BLOCKSIZE, stop * cols // BLOCKSIZE
    blocks = torch.arange(b0, b1, device=state.device)
    scales = block_scales(state, state.absmax_q[b0:b1], blocks)
    n = (stop - start) * cols
    out = scratch_buffer(n, state.dtype) if scratch and state.device.type == "cpu" else None
    bnb = wants_cpu_kernel(backend, state, cols)
    packed = state.packed[start * cols // 2 : stop * cols // 2]
    return decode_blocks(packed, scales, stop - start, cols, state.dtype, out, bnb)


def gather_rows(state: NF4Tensor, ids: Tensor, backend: str = "auto") -> Tensor:
    """Rows `ids` (int [n], repeats allowed) of the [V, C] matrix `state` in state.dtype: [n, C].

    Bit-identical to dequantize_nf4(state)[ids]; gathers the rows' packed bytes and 8-bit codes first, so
    only n rows are dequantized. An id outside [0, V) raises IndexError, as nn.Embedding does.
    """
    vocab, cols = state.shape
    per_row = cols // BLOCKSIZE
    packed = state.packed.view(vocab, cols // 2).index_select(0, ids)
    codes = state.absmax_q.view(vocab, per_row).index_select(0, ids)
    blocks = ids.to(torch.int64)[:, None] * per_row + torch.arange(per_row, device=ids.device)
    scales = block_scales(state, codes.view(-1), blocks.view(-1))
    bnb = wants_cpu_kernel(backend, state, cols)
    return decode_blocks(packed.view(-1), scales, ids.numel(), cols, state.dtype, None, bnb)


def vocab_slices(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive row ranges of at most `chunk` rows covering [0, vocab)."""
    return [(v, min(v + chunk, vocab)) for v in range(0, vocab, chunk)]


# ---------------------------------------------------------------------- the embedding


class NF4Embedding(NF4Weights):
    """Frozen token embedding [V, C] held in NF4 (same four buffers and format as NF4Linear, no bias).

    num_embeddings V, embedding_dim C (a multiple of 64: each row is whole NF4 blocks). forward returns
    compute_dtype; `rows` hands out dequantized row ranges, for QuantizedHead and the chunked loss.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        """An NF4Embedding with empty (uninitialised) buffers of the right sizes, e.g. to load a state_dict."""
        if embedding_dim % BLOCKSIZE:
            raise ValueError(
                f"NF4Embedding: embedding_dim C = {embedding_dim} must be a multiple of {BLOCKSIZE}, so that each "
                f"row of the [{num_embeddings}, {embedding_dim}] table is whole NF4 blocks"
            )
        super().__init__(num_embeddings * embedding_dim, compute_dtype, device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    @classmethod
    def from_weight(cls, weight: Tensor, compute_dtype: torch.dtype | None = None) -> NF4Embedding:
        """Quantize weight [V, C] (float32/bf16/fp16, C % 64 == 0, else ValueError).

        compute_dtype defaults to the weight's dtype if float32 or bfloat16, else bfloat16. Keeps no
        reference to `weight`, so a loader can drop the full-precision table right after this call.
        """
        if weight.dim() != 2:
            raise ValueError(f"NF4Embedding.from_weight: weight must be [V, C], got shape {list(weight.shape)}")
        compute_dtype = compute_dtype or cls.default_compute_dtype(weight.dtype)
        # Built on the meta device first (no allocation; checks C before the quantizing work).
        table = cls(weight.shape[0], weight.shape[1], compute_dtype, device="meta")
        table._take_quantized(quantize_nf4(weight))
        return table

    @property
    def weight_shape(self) -> torch.Size:
        """[V, C]."""
        return torch.Size((self.num_embeddings, self.embedding_dim))

    def rows(self, start: int, stop: int, dtype: torch.dtype | None = None, scratch: bool = False) -> Tensor:
        """Rows [start, stop) [stop-start, C] in `dtype` (default compute_dtype): dequantize(dtype)[start:stop]'s bits.

        Only those rows are dequantized. scratch=True (CPU): the result lives in quant.backend.scratch's
        per-thread buffer, overwritten by the next scratch user; for loops that use each slice at once.
        """
        return dequantize_rows(self.quant_state(dtype), start, stop, self.backend, scratch)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids int [...] -> [..., C] in compute_dtype: dequantize()[input_ids]'s bits, no gradient."""
        rows = gather_rows(self.quant_state(), input_ids.reshape(-1), self.backend)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, compute_dtype={self.compute_dtype}, "
            f"nf4 blocksize={BLOCKSIZE}"
        )


# ---------------------------------------------------------------------- the tied output head


class _HeadMatmul(torch.autograd.Function):
    """logits = x @ W.T in `dtype`, W [V, C] from the NF4 buffers, dequantized `chunk` rows at a time.

    Saves only the 4-bit buffers; backward re-dequantizes chunk by chunk (grad_x = grad @ W, summed in
    float32 over the chunks). Autocast is off inside: the caller has decided the dtype already.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax_q, nested_absmax, offset, shape, dtype, out_dtype, chunk, backend):
        state = NF4Tensor(packed, absmax_q, nested_absmax, offset, shape, dtype)
        x2 = x.reshape(-1, shape[1]).to(dtype)
        out = torch.empty(x2.shape[0], shape[0], dtype=out_dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start, stop in vocab_slices(shape[0], chunk):
                w = dequantize_rows(state, start, stop, backend, scratch=True)
                if out_dtype == dtype:  # straight into the output's columns (a strided view BLAS can write)
                    torch.mm(x2, w.t(), out=out[:, start:stop])
                else:
                    out[:, start:stop] = x2 @ w.t()
        ctx.save_for_backward(packed, absmax_q, nested_absmax, offset)
        ctx.meta = (shape, dtype, x.dtype, x.shape, chunk, backend)
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, x_dtype, x_shape, chunk, backend = ctx.meta
        grad_x = None
        if ctx.needs_input_grad[0]:
            state = NF4Tensor(*ctx.saved_tensors, shape, dtype)
            grad = grad_out.reshape(-1, shape[0])
            grad_x = torch.zeros(grad.shape[0], shape[1], dtype=torch.float32, device=grad.device)
            with torch.autocast(grad.device.type, enabled=False):
                for start, stop in vocab_slices(shape[0], chunk):
                    w = dequantize_rows(state, start, stop, backend, scratch=True)
                    grad_x += grad[:, start:stop].to(dtype) @ w
            grad_x = grad_x.to(x_dtype).view(x_shape)
        return grad_x, None, None, None, None, None, None, None, None, None


class QuantizedHead(torch.nn.Module):
    """lm_head whose weight [V, C] is an NF4Embedding's rows (tied: `table` is embed_tokens itself).

    forward: x [..., C] -> logits [..., V] = x @ W.T, W dequantized VOCAB_CHUNK rows at a time (into a
    reused buffer on CPU). Outside autocast it computes in table.compute_dtype and returns x's dtype;
    under autocast, the autocast dtype (as NF4Linear). Differentiable w.r.t. x only.
    """

    VOCAB_CHUNK: int = 8192  # rows dequantized at a time: 8192 x 896 bf16 is 14 MiB

    def __init__(self, table: NF4Embedding) -> None:
        super().__init__()
        self.table = table

    @property
    def out_features(self) -> int:
        return self.table.num_embeddings

    @property
    def in_features(self) -> int:
        return self.table.embedding_dim

    def rows(self, start: int, stop: int, dtype: torch.dtype | None = None, scratch: bool = False) -> Tensor:
        """Head rows [start, stop) [stop-start, C]: NF4Embedding.rows (what train.loss's chunked loss reads)."""
        return self.table.rows(start, stop, dtype, scratch)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., C] -> [..., V]."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = out_dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype, out_dtype = self.table.compute_dtype, x.dtype
        t = self.table
        return _HeadMatmul.apply(
            x,
            t.weight_packed,
            t.absmax_q,
            t.nested_absmax,
            t.absmax_offset,
            t.weight_shape,
            dtype,
            out_dtype,
            self.VOCAB_CHUNK,
            t.backend,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to an NF4Embedding"
