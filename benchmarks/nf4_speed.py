"""NF4 speed: our pure-PyTorch kernels vs bitsandbytes', on one device (CPU by default).

    OMP_NUM_THREADS=1 python -m benchmarks.nf4_speed [--device cpu] [--reps 5] [--tokens 8]

For each layer shape it times (median of --reps runs, milliseconds):
- quantize:          quant.quantize_nf4 vs bitsandbytes.functional.quantize_4bit(nf4, nested)
- dequantize -> T:   NF4Linear.dequantize(T) with backend "torch" vs "bnb"
- forward / fwd+bwd: NF4Linear on x [tokens, in] in bfloat16 (backward w.r.t. x only, as in QLoRA)
and checks that both backends produce identical bits. The numbers picked quant.backend.DEFAULT_BACKEND (benchmarks/NF4_SPEED.md).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from quant import NF4Linear
from quant.nf4 import quantize_nf4

SHAPES = ((2048, 2048), (4096, 11008))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _layer(shape: tuple[int, int], device: torch.device, backend: str) -> NF4Linear:
    torch.manual_seed(0)
    weight = torch.randn(shape, device=device) * 0.02
    layer = NF4Linear.from_weight(weight, None, compute_dtype=torch.bfloat16)
    layer.backend = backend
    return layer


def _forward_backward(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    layer(x).sum().backward()
    return x.grad


def bench_shape(shape: tuple[int, int], device: torch.device, reps: int, tokens: int) -> list[tuple[str, float, float]]:
    """Rows (operation, ours ms, bnb ms) for one [out, in] layer."""
    import bitsandbytes.functional as bnbf

    ours, bnb = _layer(shape, device, "torch"), _layer(shape, device, "bnb")
    weight = torch.randn(shape, device=device) * 0.02
    x = torch.randn(tokens, shape[1], device=device, dtype=torch.bfloat16)

    def bnb_quantize():
        return bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)

    t_ours = time_ms(lambda: quantize_nf4(weight), device, reps)
    rows = [("quantize (fp32 in)", t_ours, time_ms(bnb_quantize, device, reps))]
    ops: dict[str, Callable[[NF4Linear], torch.Tensor]] = {
        "dequantize -> bf16": lambda layer: layer.dequantize(torch.bfloat16),
        "dequantize -> fp32": lambda layer: layer.dequantize(torch.float32),
        f"forward bf16, {tokens} tok": lambda layer: layer(x),
        f"fwd+bwd bf16, {tokens} tok": lambda layer: _forward_backward(layer, x),
    }
    for name, op in ops.items():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            if not torch.equal(op(ours), op(bnb)):
                raise AssertionError(f"{shape} {name}: the two backends differ")
            rows.append((name, time_ms(lambda: op(ours), device, reps), time_ms(lambda: op(bnb), device, reps)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'layer':<12} {'operation':<24} {'ours ms':>9} {'bnb ms':>9} {'ours/bnb':>9}")
    for shape in SHAPES:
        for name, t_ours, t_bnb in bench_shape(shape, device, args.reps, args.tokens):
            print(f"{shape[0]}x{shape[1]:<7} {name:<24} {t_ours:9.1f} {t_bnb:9.1f} {t_ours / t_bnb:9.2f}")


if __name__ == "__main__":
    main()
