"""train.memory: the peak-memory estimate, the pre-training safety valve, and the estimate vs measured peaks."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.config import ModelConfig
from quant import nf4_nbytes
from tests.conftest import TASK_WORDS, make_task_data, make_tokenizer_files
from train import memory
from train.loss import chunk_rows
from train.memory import Settings, estimate_peak_bytes
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

# ~16M parameters: big enough that weights, optimizer state and activations dominate the peak.
PROBE_MODEL = {"vocab_size": 8000, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
               "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 512,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)


def test_parameter_bytes_follow_the_stated_per_parameter_costs():
    s = Settings("full", batch_size=1, seq_len=2)
    full = estimate_peak_bytes(LLAMA_7B, s)
    assert 6.7e9 < full.trainable_params < 6.8e9  # Llama-2-7B has 6.74B parameters
    assert (full.weights, full.grads, full.optimizer) == (4 * full.trainable_params, 4 * full.trainable_params,
                                                         8 * full.trainable_params)
    eight_bit = estimate_peak_bytes(LLAMA_7B, Settings("full", 1, 2, optim="adamw8bit"))
    assert eight_bit.optimizer == 2 * full.trainable_params
    lora = estimate_peak_bytes(LLAMA_7B, Settings("lora", 1, 2, compute_bytes=2))
    qlora = estimate_peak_bytes(LLAMA_7B, Settings("qlora", 1, 2, compute_bytes=2))
    assert lora.trainable_params == qlora.trainable_params == 32 * 4 * 16 * (4096 + 4096)
    block_linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    # NF4: 4 bits + an 8-bit scale per 64 + a float32 per 16384 (quant.nf4_nbytes: 4.127 bits per parameter)
    assert lora.weights - qlora.weights == pytest.approx(block_linears * 2 - nf4_nbytes(block_linears), rel=1e-6)
    assert qlora.peak < lora.peak < full.peak


def test_activations_scale_with_tokens_and_shrink_with_checkpointing():
    one = estimate_peak_bytes(LLAMA_7B, Settings("lora", 1, 512, compute_bytes=2))
    four = estimate_peak_bytes(LLAMA_7B, Settings("lora", 4, 512, compute_bytes=2))
    assert four.activations == pytest.approx(4 * one.activations, rel=1e-9)
    ckpt = estimate_peak_bytes(LLAMA_7B, Settings("lora", 4, 512, compute_bytes=2, grad_checkpointing=True))
    assert ckpt.activations < four.activations / 5
    assert chunk_rows(32000) < 4 * 512
    # one chunk of rows, not all 4 * 512: float32 logits (their gradient in place) and the bf16 gradient
    assert four.logits == chunk_rows(32000) * 32000 * (4 + 2)


def test_valve_refuses_a_run_that_will_not_fit_and_names_settings_that_would(run_model, tmp_path, monkeypatch, capsys):
    data = make_task_data(tmp_path / "task.jsonl", 20)
    argv = ["--model", str(run_model), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--method", "full",
            "--seq-len", "64", "--batch-size", "64", "--max-steps", "1", "--dtype", "float32"]
    cfg = ModelConfig.from_file(run_model / "config.json")
    need = estimate_peak_bytes(cfg, Settings("full", 64, 64)).peak
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: estimated peak memory") and "exceeds" in err
    assert "--batch-size 32 --grad-accum 2" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before anything was written
    assert main([*argv, "--skip-memory-check"]) == 0  # the user overrides the estimate
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    assert main([*argv, "--overwrite"]) == 0


def test_available_bytes_reads_meminfo_on_cpu():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory) -> tuple[Path, Path]:
    """A random ~16M-parameter llama and long text records (every row fills seq 256)."""
    root = tmp_path_factory.mktemp("probe")
    make_tokenizer_files(root / "model")
    torch.manual_seed(0)
    models.save_pretrained(models.Decoder(ModelConfig(**PROBE_MODEL)), root / "model", tokenizer_dir=root / "model")
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(TASK_WORDS) for _ in range(400))}) for _ in range(16)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "model", root / "data.jsonl"


PROBE = """
import json, sys
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
import torch, models, lora.inject, quant.linear, train.loop
from train import run as run_mod
from train.config import parse_args
base = status("VmRSS")  # after imports: what the training itself adds is measured from here
run = run_mod.setup(parse_args(sys.argv[1:]))
run_mod.save = lambda run: None  # measure training, not checkpoint serialisation
run_mod.fit(run)
print(json.dumps({"peak": status("VmHWM") - base}))
"""

# Measured on 2 CPU cores (float32, seq 256, batch 4, ~16M params), MiB estimate / measured (VmHWM
# minus RSS after imports):
#   full 680/647 (1.05), full+grad-ckpt 510/515 (0.99), lora 565/673 (0.84), lora without dropout
#   549/572 (0.96), lora+grad-ckpt 339/435 (0.78), qlora 528/648-714 (0.74-0.82: its peak varies run to run).
# Since the loss keeps one chunk instead of two and 4-bit weights are dequantized into a reused buffer
# (and the estimate counts one chunk): full 604/551-580 (1.04-1.10), qlora 452/472-479 (0.94-0.96).
# The full estimate drifted back up to 1.18-1.25 (measured 491-513): it counted every gradient beside every
# activation, while backward frees each block's activations as it makes its gradients; with the peak split
# into the start of backward (the head's gradient only) and the optimizer step: full 555/491-513 (1.08-1.13).
# QLoRA no longer imports bitsandbytes' Python package to reach its CPU kernel (~120 MiB resident, which the
# fixed 96 MiB runtime term had absorbed); the term is now the 24-26 MiB a 2-layer model measures, rounded to
# 32: full 491/499-513 (0.96-0.99), qlora 388/346-365 (1.06-1.12).
# Without the 25% allocator slack the adapter methods were at 0.63-0.83. The estimate is still low
# for QLoRA (dequantize temporaries and the many small LoRA tensors fragment the heap more), so the
# valve errs on the side of letting a run start. The test holds it to 0.65x-1.25x of the real peak.
LOW, HIGH = 0.65, 1.25


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_estimate_is_within_the_stated_factor_of_the_measured_peak(probe_model, tmp_path, method):
    model_dir, data = probe_model
    argv = ["--method", method, "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--seq-len", "256", "--batch-size", "4", "--max-steps", "2", "--dtype", "float32", "--save-every", "0",
            "--eval-every", "0"]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    estimate = estimate_peak_bytes(ModelConfig.from_file(model_dir / "config.json"), Settings(method, 4, 256)).peak
    ratio = estimate / measured
    print(f"{method}: estimate {estimate / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB, ratio {ratio:.2f}")
    assert LOW <= ratio <= HIGH
