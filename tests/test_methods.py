"""train.methods: each method is one object, and a sixth is one class away.

The five methods' behaviour is tested end to end elsewhere (test_train, test_virtual_tokens,
test_quantized_embeddings, test_distributed); here: the table is what the CLI offers, and a method
the trainer has never heard of (LayerNorm tuning, as PEFT's LN_TUNING: only the norm weights train)
runs through `python -m train.run` once it is added to train.methods.METHODS, with nothing else changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import Loaded
from models.config import ModelConfig
from tests.conftest import make_task_data
from train.config import parse_args
from train.errors import ConfigError
from train.memory import Settings, estimate_peak_bytes
from train.methods import METHODS, Method
from train.run import main


def test_the_cli_offers_exactly_the_methods_of_the_table():
    assert list(METHODS) == ["full", "lora", "qlora", "prefix", "prompt"]
    for name, method in METHODS.items():
        cfg = parse_args(["--method", name])
        assert cfg.method is method and cfg.optim.lr == method.lr and method.product in ("adapter", "model")
    with pytest.raises(ConfigError, match="invalid choice: 'ia3'"):
        parse_args(["--method", "ia3"])


class NormTuning(Method):
    """Only the RMSNorm weights train (float32 masters); the product is those tensors."""

    name, lr = "norms", 1e-2

    def prepare(self, cfg, loaded: Loaded, model_path: str) -> None:
        loaded.model.requires_grad_(False)
        for name, p in loaded.model.named_parameters():
            if name.endswith("norm.weight"):
                p.data = p.data.float()
                p.requires_grad_(True)

    def save(self, loaded: Loaded, cfg, out_dir: Path, model_path: str) -> Path:
        out = out_dir / self.product
        out.mkdir(parents=True, exist_ok=True)
        norms = {n: p.detach().contiguous() for n, p in loaded.model.named_parameters() if p.requires_grad}
        save_file(norms, str(out / "norms.safetensors"))
        return out

    def param_counts(self, config, s):
        trainable = (2 * config.num_hidden_layers + 1) * config.hidden_size
        return trainable, METHODS["full"].param_counts(config, s)[0] - trainable, 0


def test_a_sixth_method_is_one_class(run_model, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "norms", NormTuning())
    data = make_task_data(tmp_path / "task.jsonl", 40)
    out = tmp_path / "o"
    argv = ["--method", "norms", "--model", str(run_model), "--data", str(data), "--output-dir", str(out),
            "--val-fraction", "0.2", "--seq-len", "32", "--batch-size", "8", "--max-steps", "4", "--dtype", "float32"]
    assert main(argv) == 0
    config = ModelConfig.from_file(run_model / "config.json")
    saved = load_file(str(out / "adapter" / "norms.safetensors"))
    base = load_file(str(run_model / "model.safetensors"))
    assert len(saved) == 2 * config.num_hidden_layers + 1 and all(n.endswith("norm.weight") for n in saved)
    assert all(not torch.equal(saved[n], base[n].float()) for n in saved)  # every norm weight moved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "norms" and summary["best_val_loss"] < summary["first_val_loss"]
    estimate = estimate_peak_bytes(config, Settings("norms", 8, 32))
    assert estimate.trainable_params == sum(t.numel() for t in saved.values())
