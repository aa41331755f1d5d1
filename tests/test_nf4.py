"""NF4 with double quantization: bit-exact with bitsandbytes (CPU), NF4Linear forward/backward,
the bitsandbytes fast path, memory per weight, and what quantize-while-loading relies on."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from quant import NF4Linear, dequantize_nf4, dynamic_code, nf4_code, nf4_nbytes, quantize_nf4
from quant.backend import bnb_cpu_kernel, dequantize_scratch, resolve_backend
from quant.nf4 import _dynamic_lut, dequantize_absmax, quantize_blockwise_8bit

# (300,77) and (3,5) are odd: a half-filled last byte; none is a multiple of 64*256, so the last
# 64-block and the last 256-block of absmax are partial (except (64,64): one partial 256-block).
SHAPES = [(64, 64), (300, 77), (1000, 130), (3, 5), (1, 1), (129,), (2, 3, 65), (16, 1024 + 32)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = Path(__file__).resolve().parents[1]
HALF_GAP = float((nf4_code()[1:] - nf4_code()[:-1]).max()) / 2  # 0.1519, between -1 and -0.696


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes runs its odd-width dequantize through torch.compile: seconds per new shape. Eager
    executes the same operations; exactness against the compiled kernel was checked when writing this."""
    with torch._dynamo.config.patch(disable=True):
        yield


def weight(shape, dtype, seed=0) -> torch.Tensor:
    """Gaussian weights with the awkward cases planted: per-block scales spread over six decades, an
    all-zero full block, exact NF4 midpoints (ties), and for even seeds an all-zero partial last block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).view(-1)
    n = w.numel()
    scales = 10 ** torch.empty(-(-n // 64)).uniform_(-4, 2, generator=g)
    w = w * scales.repeat_interleave(64)[:n]
    if n >= 192:
        w[64:192] = 0
        code = nf4_code()
        w[128:143] = (code[:-1] + code[1:]) / 2 * 0.5  # ties once the block max 0.5 is at w[143]
        w[143] = 0.5
    if n % 64 and n > 64 and seed % 2 == 0:
        w[n - n % 64 :] = 0
    return w.view(shape).to(dtype)


def bnb_quantize(w):
    return bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


# ---------------------------------------------------------------------- bit-exact format


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_equals_bitsandbytes_exactly(shape, dtype, seed):
    w = weight(shape, dtype, seed)
    packed, qs = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))  # bnb: [ceil(n/2), 1]
    assert torch.equal(ours.absmax_q, qs.absmax)
    assert torch.equal(ours.nested_absmax, qs.state2.absmax)
    assert torch.equal(ours.offset, qs.offset)
    assert (ours.shape, ours.dtype) == (qs.shape, qs.dtype)
    assert (ours.blocksize, ours.nested_blocksize) == (qs.blocksize, qs.state2.blocksize) == (64, 256)


def bnb_row_kernel_is_wrong(shape) -> bool:
    """bitsandbytes' AVX-512 CPU dequantize (row width a multiple of 16) looks absmax up per row as
    row * (width // 64) + col // 64: wrong when 64 does not divide the width, e.g. [16, 1056]."""
    return len(shape) > 1 and shape[-1] % 16 == 0 and shape[-1] % 64 != 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes_exactly(shape, dtype, seed):
    w = weight(shape, dtype, seed)
    packed, qs = bnb_quantize(w)
    ours = quantize_nf4(w)
    for out_dtype in DTYPES:
        qs.dtype = out_dtype
        got = dequantize_nf4(ours, out_dtype)
        assert got.dtype == out_dtype and got.shape == w.shape
        if not bnb_row_kernel_is_wrong(shape):
            assert torch.equal(got, bnbf.dequantize_4bit(packed, qs)), out_dtype
        # As one row, the same bits go through bitsandbytes' kernels without the 2-D indexing.
        qs.shape = torch.Size([w.numel()])
        assert torch.equal(got.view(-1), bnbf.dequantize_4bit(packed, qs).view(-1)), out_dtype
        qs.shape = w.shape


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3000),
    log_scale=st.floats(-6, 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_equals_bitsandbytes_for_any_size(n, log_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * 10**log_scale).to(dtype)
    packed, qs = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax_q, qs.absmax)
    assert torch.equal(ours.nested_absmax, qs.state2.absmax) and torch.equal(ours.offset, qs.offset)
    # .view(-1): for n <= 2 (one packed byte) bitsandbytes returns its result transposed.
    assert torch.equal(dequantize_nf4(ours).view(-1), bnbf.dequantize_4bit(packed, qs).view(-1))


def near(values: torch.Tensor, ulps: int = 16) -> torch.Tensor:
    """values and their float32 neighbours up to `ulps` steps away on either side."""
    out, up, down = [values], values, values
    for _ in range(ulps):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, float("-inf")))
        out += [up, down]
    return torch.cat(out)


def scale_sensitive(block_max: float) -> torch.Tensor:
    """Values v in (-block_max, block_max) whose NF4 code depends on computing v * (1/max) or v / max."""
    a = torch.tensor(block_max)
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    v = near(mids * a)
    v = v[v.abs() < a]
    return v[torch.bucketize(v * torch.reciprocal(a), mids) != torch.bucketize(v / a, mids)]


def test_scaling_and_ties_follow_bitsandbytes_to_the_last_ulp():
    """Full blocks scale by the reciprocal, a partial last block divides, midpoints take the lower code."""
    blocks = []
    for block_max in (3.0, 0.7, 1.1, 5.3, 0.013):
        v = scale_sensitive(block_max)
        assert 0 < v.numel() <= 63
        blocks.append(torch.cat([torch.tensor([block_max]), v, torch.zeros(63 - v.numel())]))
    ties = (nf4_code()[:-1] + nf4_code()[1:]) / 2 * 0.5  # exact midpoints once scaled by 1/0.5
    blocks.append(torch.cat([torch.tensor([0.5]), ties, torch.zeros(48)]))
    tail = torch.cat([torch.tensor([5.3]), scale_sensitive(5.3)])
    for w in (torch.cat(blocks), torch.cat(blocks + [tail]), tail):
        packed, qs = bnb_quantize(w)
        ours = quantize_nf4(w)
        assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax_q, qs.absmax)
        assert torch.equal(ours.offset, qs.offset) and torch.equal(ours.nested_absmax, qs.state2.absmax)


@pytest.mark.parametrize("fill", [0.0, 0.5, -3.0])
def test_constant_weights_equal_bitsandbytes(fill):
    """Equal absmax everywhere: absmax - offset is all zero, so every nested block is all zero."""
    w = torch.full((300, 77), fill)
    packed, qs = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax_q, qs.absmax)
    assert torch.equal(ours.offset, qs.offset) and torch.equal(ours.nested_absmax, qs.state2.absmax)
    assert torch.equal(dequantize_nf4(ours), bnbf.dequantize_4bit(packed, qs))


def test_absmax_8bit_rule_is_bitsandbytes_lookup_table_not_nearest():
    """bitsandbytes' CPU 8-bit quantizer snaps to 65536 bins before choosing a code; plain nearest
    differs on some inputs, so this test would catch either rule being swapped for the other."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 800, generator=g) * 10 ** torch.empty(256 * 800).uniform_(-3, 1, generator=g)
    x[:256] = 0  # an all-zero block: bitsandbytes writes code 0
    # Values right at the bins where the table's code changes, in blocks whose max is 1.7: these
    # also tell x * (1/max) from x / max.
    lut = _dynamic_lut()
    steps = torch.nonzero(lut[1:] != lut[:-1]).flatten() + 1
    edges = near((((steps - 0.5) / 65535) * 2 - 1).float() * 1.7, ulps=8)
    edges = edges[edges.abs() < 1.7]
    per_block = edges[: edges.numel() // 255 * 255].view(-1, 255)
    edge_blocks = torch.cat([torch.full((per_block.shape[0], 1), 1.7), per_block], dim=1).view(-1)
    x = torch.cat([x, edge_blocks])
    ref_codes, ref_state = bnbf.quantize_blockwise(x, blocksize=256)
    codes, absmax = quantize_blockwise_8bit(x, 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes[:256], torch.zeros(256, dtype=torch.uint8))
    code = dynamic_code()
    scaled = (x.view(-1, 256) * torch.reciprocal(absmax.clamp(min=1e-38))[:, None]).view(-1)[256:]
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    assert (nearest != codes[256:]).sum() > 10
    assert _dynamic_lut().numel() == 65536


def test_dequantized_weight_is_close_to_the_original():
    w = weight((256, 320), torch.float32)
    state = quantize_nf4(w)
    scales = dequantize_absmax(state)
    true_absmax = w.view(-1, 64).abs().amax(1)
    # 8-bit dynamic codes near 1 are 1/64 apart: relative error of a scale below ~1/128 of the largest.
    assert ((scales - true_absmax).abs() <= true_absmax.max() / 100).all()
    err = (dequantize_nf4(state) - w).view(-1, 64).abs().amax(1)
    # At most half the widest NF4 gap (-1 to -0.696: 0.152) of the block max, plus the scale's own error.
    assert (err <= HALF_GAP * true_absmax + (scales - true_absmax).abs() + 1e-12).all()


# ---------------------------------------------------------------------- NF4Linear


def nf4_layer(in_features=128, out_features=48, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()
    return NF4Linear.from_linear(linear, compute_dtype=compute_dtype), linear


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 128), (2, 3, 128)], ids=str)
def test_forward_is_x_times_dequantized_weight(compute_dtype, bias, x_shape):
    layer, _ = nf4_layer(bias=bias, compute_dtype=compute_dtype)
    x = torch.randn(x_shape)
    w = layer.dequantize()
    assert w.dtype == compute_dtype and w.shape == (48, 128)
    expected = x.to(compute_dtype) @ w.T
    if bias:
        expected = expected + layer.bias.to(compute_dtype)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x_shape[:-1], 48)
    assert torch.equal(y, expected.to(x.dtype))


def test_forward_under_cpu_autocast_computes_in_bfloat16():
    layer, _ = nf4_layer(compute_dtype=torch.float32)
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = x.bfloat16() @ layer.dequantize(torch.bfloat16).T + layer.bias.bfloat16()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_gradient_matches_autograd_through_a_dense_linear(compute_dtype):
    layer, _ = nf4_layer(compute_dtype=compute_dtype)
    x = torch.randn(2, 3, 128, requires_grad=True)
    grad_out = torch.randn(2, 3, 48)
    layer(x).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = (x_ref.to(compute_dtype) @ layer.dequantize().T + layer.bias.to(compute_dtype)).float()
    dense.backward(grad_out)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, x_ref.grad)
    # Under autocast too (the QLoRA training setting).
    x.grad = x_ref.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().backward(grad_out)
        ref = (x_ref.bfloat16() @ layer.dequantize(torch.bfloat16).T + layer.bias.bfloat16()).float()
    ref.backward(grad_out)
    assert torch.equal(x.grad, x_ref.grad)


def test_weights_never_get_gradients_and_no_dense_copy_is_saved_for_backward():
    layer, _ = nf4_layer(in_features=256, out_features=64)
    assert list(layer.parameters()) == []
    assert all(not b.requires_grad for b in layer.buffers())
    lora_a = nn.Parameter(torch.randn(8, 256) * 0.1)  # a LoRA-like branch in front, so x needs grad
    lora_b = nn.Parameter(torch.randn(256, 8) * 0.1)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = torch.randn(4, 256)
        y = layer(x + x @ lora_a.T @ lora_b.T)
    y.sum().backward()
    assert lora_a.grad.abs().sum() > 0 and lora_b.grad.abs().sum() > 0
    assert all(b.grad is None for b in layer.buffers())
    # The dense weight has 64*256 floats; nothing that large may be held for backward.
    assert max(t.numel() for t in saved if t.is_floating_point()) < 64 * 256
    assert any(t.dtype == torch.uint8 and t.numel() == 64 * 256 // 2 for t in saved)


def test_bitsandbytes_fast_path_is_identical_to_the_reference():
    layer, _ = nf4_layer(in_features=192, out_features=40, compute_dtype=torch.bfloat16)
    assert resolve_backend("bnb", layer.quant_state()) == "bnb"
    x = torch.randn(3, 192, requires_grad=True)
    results = {}
    for backend in ("torch", "bnb"):
        layer.backend = backend
        x.grad = None
        y = layer(x)
        y.backward(torch.ones_like(y))
        deq = [layer.dequantize(dt) for dt in DTYPES]
        results[backend] = (y.detach(), x.grad.clone(), *deq)
    for ours, theirs in zip(results["torch"], results["bnb"]):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_scratch_dequantization_has_the_reference_bits_and_reuses_one_buffer(backend):
    """The matmuls' dequantization writes into one per-thread buffer: same bits, no new allocation."""
    assert bnb_cpu_kernel(torch.bfloat16) is not None  # bitsandbytes' native kernel is what "bnb" calls
    # (24, 80): whole blocks but rows that split them, which the kernel decodes as one flat row
    states = [quantize_nf4(weight(shape, torch.float32, seed=i)) for i, shape in enumerate(SHAPES + [(96, 192), (24, 80)])]
    for dtype in DTYPES:
        for state in sorted(states, key=lambda s: -s.numel):  # largest first: later calls reuse its buffer
            out = dequantize_scratch(state, dtype, backend)
            assert out.shape == state.shape and out.dtype == dtype
            assert torch.equal(out, dequantize_nf4(state, dtype)), (state.shape, dtype)
        first = dequantize_scratch(states[0], dtype, backend).data_ptr()
        assert dequantize_scratch(states[1], dtype, backend).data_ptr() == first


def test_training_matmuls_reach_the_native_kernel_without_importing_bitsandbytes():
    """The 4-bit matmuls and embedding rows load bitsandbytes' CPU library by path: importing the package
    would add ~120 MiB of resident memory (it pulls in sympy, networkx, ...) to every QLoRA run."""
    code = """
import sys, torch
import quant.backend as qb
from quant import NF4Linear, quantize_nf4, dequantize_nf4
from quant.embedding import dequantize_rows, gather_rows
calls, kernel = [], qb.bnb_cpu_kernel
def counted(dtype):  # every kernel call is counted, so the table-lookup fallback cannot pass unnoticed
    run = kernel(dtype)
    return lambda *args: (calls.append(dtype), run(*args))[1]
qb.bnb_cpu_kernel = counted
torch.manual_seed(0)
dense = torch.nn.Linear(128, 96, bias=False)
layer = NF4Linear.from_linear(dense, torch.bfloat16)
x = torch.randn(4, 128, requires_grad=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = layer(x)
y.float().sum().backward()
w = dequantize_nf4(layer.quant_state(torch.bfloat16), torch.bfloat16)
assert torch.equal(y, (x.detach().bfloat16() @ w.t())), "forward"
table = quantize_nf4(torch.randn(40, 128))
assert torch.equal(dequantize_rows(table, 3, 9), dequantize_nf4(table)[3:9])
assert torch.equal(gather_rows(table, torch.tensor([5, 1, 5])), dequantize_nf4(table)[[5, 1, 5]])
print(len(calls), "bitsandbytes" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "False"]  # forward, backward, a row range, gathered rows; no import


def test_fast_path_is_not_used_where_bitsandbytes_cpu_kernel_is_wrong():
    """bitsandbytes' AVX-512 dequantize picks absmax per row as if 64 divided in_features: [10, 80] is wrong."""
    layer, linear = nf4_layer(in_features=80, out_features=10)
    assert resolve_backend("bnb", layer.quant_state()) == "torch"
    layer.backend = "bnb"
    w = layer.dequantize(torch.float32)
    assert torch.equal(w, dequantize_nf4(layer.quant_state(torch.float32)))
    assert (w - linear.weight).abs().max() <= 1.05 * HALF_GAP * linear.weight.abs().max()


def test_weight_bytes_is_4_127_bits_per_weight():
    # n = 1024*2048 is a multiple of 64*256, so no block is padded:
    # bytes = n/2 (codes) + n/64 (8-bit absmax) + 4n/(64*256) (float32 nested absmax) + 4 (float32 offset)
    layer, _ = nf4_layer(in_features=2048, out_features=1024, bias=False)
    n = 1024 * 2048
    assert layer.weight_bytes() == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
    assert layer.weight_bytes() == n * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4
    assert abs(8 * (layer.weight_bytes() - 4) / n - 4.127) < 1e-3
    assert layer.num_params() == n
    odd, _ = nf4_layer(in_features=77, out_features=300)  # partial blocks round up
    assert odd.weight_bytes() == nf4_nbytes(77 * 300) == 11550 + 361 + 4 * 2 + 4
    assert odd.num_params() == 77 * 300 + 300


def test_from_weight_keeps_no_reference_to_the_full_precision_weight():
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    b = torch.randn(64, dtype=torch.bfloat16)
    ref = weakref.ref(w)
    layer = NF4Linear.from_weight(w, b)
    storages = {t.untyped_storage().data_ptr() for t in layer.buffers()}
    assert w.untyped_storage().data_ptr() not in storages and b.untyped_storage().data_ptr() not in storages
    del w
    gc.collect()
    assert ref() is None
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert NF4Linear.from_weight(torch.randn(8, 64), None).compute_dtype == torch.float32
    assert NF4Linear.from_weight(torch.randn(8, 64).half(), None).compute_dtype == torch.bfloat16
    assert NF4Linear.from_weight(torch.randn(8, 64), None, torch.bfloat16).compute_dtype == torch.bfloat16


def test_state_dict_round_trip_and_dtype_casts_keep_the_bits():
    layer, _ = nf4_layer(compute_dtype=torch.bfloat16)
    fresh = NF4Linear(128, 48, bias=True, compute_dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.float16).float()  # a model-wide dtype cast must not round the float32 statistics
    for key in ("weight_packed", "absmax_q", "nested_absmax", "absmax_offset"):
        assert layer.state_dict()[key].dtype == before[key].dtype and torch.equal(layer.state_dict()[key], before[key])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backends_agree_with_the_cpu_bits():
    layer, _ = nf4_layer(in_features=256, out_features=128, compute_dtype=torch.bfloat16)
    cpu_w = layer.dequantize(torch.float32)
    layer.cuda()
    for backend in ("torch", "bnb"):
        layer.backend = backend
        assert torch.equal(layer.dequantize(torch.float32).cpu(), cpu_w), backend
