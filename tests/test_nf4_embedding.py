"""NF4Embedding and QuantizedHead (quant.embedding) against quant.nf4's full dequantization and bitsandbytes."""
from __future__ import annotations

import gc
import weakref

import bitsandbytes.functional as bnbf
import pytest
import torch

import quant.embedding
import quant.weights
from quant import NF4Embedding, NF4Linear, QuantizedHead, dequantize_absmax, dequantize_nf4, nf4_nbytes, quantize_nf4
from quant.embedding import block_scales

# [V, C] with C % 64 == 0. None has V*C a multiple of 64*256, so the last nested 256-block of absmax is
# partial. C = 192 and 320 (3 and 5 blocks a row) put nested boundaries inside rows: block 256 is the
# second block of row 85 when C = 192.
SHAPES = [(1000, 192), (300, 128), (77, 320), (5, 64)]
U32 = 2.0**-24  # unit roundoff of float32 (and of its accumulators)
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}  # unit roundoff of the final rounding to a dtype


def table_weight(shape, dtype, seed=0) -> torch.Tensor:
    """Gaussian rows with per-64-block scales over six decades and an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).view(-1)
    scales = 10 ** torch.empty(w.numel() // 64).uniform_(-4, 2, generator=g)
    w = w * scales.repeat_interleave(64)
    w[64:128] = 0
    return w.view(shape).to(dtype)


def make_table(shape=(1000, 192), dtype=torch.float32, compute_dtype=None, seed=0):
    w = table_weight(shape, dtype, seed)
    return NF4Embedding.from_weight(w, compute_dtype), w


def within_rounding(got, ref, a, b, k, out_dtype) -> bool:
    """|got - ref| <= what rounding allows two computations of a @ b (k products a sum, summed in float32 in
    any order, then each rounded once to out_dtype): 2*gamma_k*S + 2*u*(1 + gamma_k)*S, S = |a| @ |b|."""
    gamma = k * U32 / (1 - k * U32)
    s = a.double().abs() @ b.double().abs()
    bound = (2 * gamma + 2 * U_OUT[out_dtype] * (1 + gamma)) * s
    return bool(((got.double() - ref.double()).abs() <= bound).all())


# ---------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_buffers_are_quantize_nf4s_and_bitsandbytes(shape, dtype):
    table, w = make_table(shape, dtype)
    ours = quantize_nf4(w)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    for buffer, reference, bnb in (
        (table.weight_packed, ours.packed, packed.view(-1)),
        (table.absmax_q, ours.absmax_q, qs.absmax),
        (table.nested_absmax, ours.nested_absmax, qs.state2.absmax),
        (table.absmax_offset, ours.offset, qs.offset),
    ):
        assert buffer.dtype == reference.dtype and torch.equal(buffer, reference) and torch.equal(buffer, bnb)
    assert table.weight_shape == w.shape and (table.num_embeddings, table.embedding_dim) == shape
    assert table.compute_dtype == dtype  # the default, as NF4Linear.from_weight's
    assert list(table.parameters()) == [] and not any(b.requires_grad for b in table.buffers())
    assert torch.equal(table.dequantize(torch.float32), dequantize_nf4(ours, torch.float32))


def test_block_scales_have_the_bits_of_the_full_absmax():
    state = quantize_nf4(table_weight((1000, 192), torch.float32))
    full = dequantize_absmax(state)  # 3000 blocks: 11 whole nested 256-blocks and a partial one
    for b0, b1 in [(0, 3000), (255, 257), (200, 900), (2815, 3000), (2999, 3000), (1, 1)]:
        blocks = torch.arange(b0, b1)
        assert torch.equal(block_scales(state, state.absmax_q[b0:b1], blocks), full[b0:b1]), (b0, b1)
    blocks = torch.randint(0, 3000, (500,))
    assert torch.equal(block_scales(state, state.absmax_q[blocks], blocks), full[blocks])


def test_embedding_dim_not_a_multiple_of_64_is_refused():
    with pytest.raises(ValueError, match="C = 96"):
        NF4Embedding.from_weight(torch.randn(10, 96))
    with pytest.raises(ValueError, match="C = 65"):
        NF4Embedding(10, 65)
    with pytest.raises(ValueError, match=r"\[V, C\]"):
        NF4Embedding.from_weight(torch.randn(640))


def test_weight_bytes_and_num_params():
    table, _ = make_table((1000, 192))
    assert table.weight_bytes() == nf4_nbytes(1000 * 192) == 96000 + 3000 + 4 * 12 + 4
    assert table.num_params() == 1000 * 192


def test_from_weight_keeps_no_reference_to_the_full_precision_weight():
    w = torch.randn(100, 128, dtype=torch.bfloat16)
    ref = weakref.ref(w)
    table = NF4Embedding.from_weight(w)
    assert w.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in table.buffers()}
    del w
    gc.collect()
    assert ref() is None
    assert table.compute_dtype == torch.bfloat16
    assert NF4Embedding.from_weight(torch.randn(8, 64).half()).compute_dtype == torch.bfloat16
    assert NF4Embedding.from_weight(torch.randn(8, 64), torch.bfloat16).compute_dtype == torch.bfloat16


# ---------------------------------------------------------------------- lookup and row ranges


@pytest.mark.parametrize("backend", ["torch", "bnb"])
@pytest.mark.parametrize(
    "dtype,compute_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)], ids=str
)
def test_forward_is_the_full_dequantization_indexed(dtype, compute_dtype, backend):
    table, _ = make_table((1000, 192), dtype, compute_dtype)
    table.backend = backend
    full = dequantize_nf4(table.quant_state())
    ids = torch.randint(0, 1000, (3, 17))
    ids[0, :4] = torch.tensor([999, 0, 85, 999])  # last row, first row, a row across a nested boundary, a repeat
    ids[2] = ids[1]
    out = table(ids)
    assert out.shape == (3, 17, 192) and out.dtype == table.compute_dtype and not out.requires_grad
    assert torch.equal(out, full[ids])
    assert torch.equal(table(ids[0].int()), full[ids[0]])  # int32 ids, as nn.Embedding takes
    assert table(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 192)
    for bad in (1000, -1):
        with pytest.raises(IndexError):
            table(torch.tensor([[0, bad]]))


@pytest.mark.parametrize("backend", ["torch", "bnb"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_are_slices_of_the_full_dequantization(weight_dtype, backend):
    table, _ = make_table((1000, 192), weight_dtype)
    table.backend = backend
    # Starting at row 0, inside a nested 256-block (row 85 holds blocks 255..257), one row, empty, the end.
    ranges = [(0, 1000), (85, 86), (84, 171), (100, 613), (333, 334), (500, 500), (910, 1000), (999, 1000)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        full = dequantize_nf4(table.quant_state(dtype))
        for start, stop in ranges:
            for scratch in (False, True):
                got = table.rows(start, stop, dtype, scratch=scratch)
                assert got.shape == (stop - start, 192) and got.dtype == dtype
                assert torch.equal(got, full[start:stop]), (dtype, start, stop, scratch)
    assert table.rows(3, 9).dtype == weight_dtype  # default: compute_dtype
    with pytest.raises(IndexError):
        table.rows(990, 1001)


def test_rows_scratch_reuses_one_buffer():
    table, _ = make_table((1000, 192))
    table.rows(0, 1000, scratch=True)  # grows this thread's buffer to the largest size needed below
    first = table.rows(0, 100, scratch=True).data_ptr()
    assert table.rows(400, 480, scratch=True).data_ptr() == first
    assert table.rows(0, 100).data_ptr() != first


def test_only_the_needed_rows_are_dequantized(monkeypatch):
    table, _ = make_table((1000, 192))
    head = QuantizedHead(table)
    monkeypatch.setattr(QuantizedHead, "VOCAB_CHUNK", 128)
    decoded: list[int] = []  # rows of each call of decode_blocks, through which every dequantization goes
    decode = quant.embedding.decode_blocks
    monkeypatch.setattr(quant.embedding, "decode_blocks", lambda *a: decoded.append(a[2]) or decode(*a))

    def whole_table(*args, **kwargs):
        raise AssertionError("the whole table was dequantized")

    monkeypatch.setattr(quant.weights, "dequantize", whole_table)  # what NF4Embedding.dequantize() calls
    table(torch.tensor([[5, 7, 5]]))
    table.rows(10, 30)
    head(torch.randn(2, 192))
    assert decoded == [3, 20] + [128] * 7 + [104]


# ---------------------------------------------------------------------- the head


def head_reference_slices(x, w, chunk):
    """x @ w.T computed slice by slice over w's rows, each slice as a plain matmul of the same shape."""
    return torch.cat([x @ w[v : v + chunk].T for v in range(0, w.shape[0], chunk)], dim=-1)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_forward_is_x_times_the_dequantized_table(compute_dtype, x_dtype, autocast, monkeypatch):
    table, _ = make_table((1000, 192), torch.float32, compute_dtype)
    head = QuantizedHead(table)
    assert head.table is table and (head.out_features, head.in_features) == (1000, 192)
    assert list(head.parameters()) == []
    x = torch.randn(2, 5, 192).to(x_dtype)
    dtype = torch.bfloat16 if autocast else compute_dtype
    out_dtype = torch.bfloat16 if autocast else x_dtype
    w = table.dequantize(dtype)
    dense = (x.to(dtype) @ w.T).to(out_dtype)
    for chunk in (1000, 96):  # one slice; 10 slices of 96 rows and one of 40 (1000 is no multiple of 96)
        monkeypatch.setattr(QuantizedHead, "VOCAB_CHUNK", chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = head(x)
        assert y.shape == (2, 5, 1000) and y.dtype == out_dtype
        # Each slice is exactly a matmul of that slice's rows (right rows, right columns)...
        assert torch.equal(y, head_reference_slices(x.to(dtype), w, chunk).to(out_dtype))
        if chunk >= 1000:
            assert torch.equal(y, dense)  # ...and one slice is the dense product itself.
        else:
            # BLAS picks its kernel by shape (e.g. narrow slices go to another kernel that sums the C products
            # in another order), so against the one dense matmul only float32 rounding may differ.
            rounded_to = torch.bfloat16 if torch.bfloat16 in (dtype, out_dtype) else torch.float32
            assert within_rounding(y, dense, x.to(dtype), w.T, 192, rounded_to)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_input_gradient_is_the_dense_ones(compute_dtype, monkeypatch):
    table, _ = make_table((1000, 192), torch.float32, compute_dtype)
    head = QuantizedHead(table)
    w = table.dequantize()
    x = torch.randn(3, 4, 192)
    grad_out = torch.randn(3, 4, 1000)
    x_ref = x.clone().requires_grad_()
    ((x_ref.to(compute_dtype) @ w.T).float() * grad_out).sum().backward()
    for chunk in (1000, 96):
        monkeypatch.setattr(QuantizedHead, "VOCAB_CHUNK", chunk)
        x_ours = x.clone().requires_grad_()
        (head(x_ours) * grad_out).sum().backward()
        assert x_ours.grad.dtype == torch.float32
        if chunk >= 1000:
            assert torch.equal(x_ours.grad, x_ref.grad)
            continue
        # Per slice grad @ rows in compute_dtype, summed in float32 in slice order: exactly that...
        g = grad_out.to(compute_dtype)
        expected = torch.zeros(3, 4, 192)
        for v in range(0, 1000, chunk):
            expected += g[..., v : v + chunk] @ w[v : v + chunk]
        assert torch.equal(x_ours.grad, expected)
        # ...which differs from the dense product by the rounding of the per-slice sums only (each rounded to
        # compute_dtype once, then float32 sums over the 1000 products in another order).
        assert within_rounding(x_ours.grad, x_ref.grad, g.float(), w.float(), 1000, compute_dtype)


def test_head_saves_no_dense_weight_for_backward_and_trains_nothing_of_its_own(monkeypatch):
    table, _ = make_table((1000, 192), torch.float32, torch.bfloat16)
    head = QuantizedHead(table)
    monkeypatch.setattr(QuantizedHead, "VOCAB_CHUNK", 256)
    proj = torch.nn.Linear(192, 192)  # something trainable in front, so x needs grad
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = head(proj(torch.randn(4, 192)))
    y.float().pow(2).sum().backward()
    assert proj.weight.grad.abs().sum() > 0
    assert all(b.grad is None for b in table.buffers())
    # A dense table, or even one 256-row slice of it, is 256 * 192 floats or more; nothing like it is kept.
    assert max(t.numel() for t in saved if t.is_floating_point()) < 256 * 192
    assert any(t.dtype == torch.uint8 and t.numel() == 1000 * 192 // 2 for t in saved)


def test_head_rows_are_the_tables():
    table, _ = make_table((300, 128))
    head = QuantizedHead(table)
    assert torch.equal(head.rows(7, 70, torch.float32), table.rows(7, 70, torch.float32))


# ---------------------------------------------------------------------- casts and checkpoints


def test_dtype_casts_keep_the_float32_statistics_and_state_dict_round_trips():
    table, _ = make_table((300, 128), torch.float32, torch.bfloat16)
    model = torch.nn.ModuleDict({"embed": table, "head": QuantizedHead(table)})
    before = {k: v.clone() for k, v in table.state_dict().items()}
    model.to(torch.bfloat16)  # a model-wide cast reaches the table twice (embed and head.table)
    table.half().float()
    for key, value in table.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    fresh = NF4Embedding(300, 128)
    fresh.load_state_dict(table.state_dict())
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(fresh(ids), table(ids))
    x = torch.randn(3, 128)
    assert torch.equal(QuantizedHead(fresh)(x), QuantizedHead(table)(x))
    assert isinstance(table, quant.weights.NF4Weights) and not isinstance(table, NF4Linear)
