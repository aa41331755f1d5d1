"""Loading paths: hub ids from the local cache (no network), and quantize-while-loading."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import models
from quant import NF4Linear
from tests.conftest import left_padded_batch
from tests.test_checkpoint import _write_big_bf16_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _fake_hub_cache(cache: Path, repo: str, checkpoint: Path) -> None:
    """Lay `checkpoint` out as huggingface_hub's cache does: models--o--n/{refs/main, snapshots/<rev>/}."""
    rev = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)


def test_cached_hub_snapshot_loads_without_touching_the_network(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen2")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-qwen", path)
    script = textwrap.dedent(
        """
        import torch, models
        from tests.conftest import left_padded_batch
        m = models.load_pretrained("someone/tiny-qwen")
        ids, mask = left_padded_batch(m.config.vocab_size)
        torch.save(m(ids, attention_mask=mask).detach(), "logits.pt")
        """
    )
    # A closed port as the hub endpoint: any network access would fail the load.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True)
    ids, mask = left_padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert (torch.load(tmp_path / "logits.pt") - ref).abs()[mask.bool()].max() <= 1e-4


def test_qlora_base_resident_bytes_match_the_nf4_formula(hf_checkpoint):
    path, _ = hf_checkpoint("llama", hidden_size=128, intermediate_size=256)
    model = models.load_pretrained(path, quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    elements = sum(m.in_features * m.out_features for m in layers)
    resident = sum(b.numel() * b.element_size() for m in layers for name, b in m.named_buffers() if name != "bias")
    formula = elements * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert abs(resident - formula) / formula < 0.01
    assert all(not isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))


def test_quantize_while_loading_never_holds_the_whole_model_in_16_bits(tmp_path):
    size = _write_big_bf16_checkpoint(tmp_path / "big")
    script = textwrap.dedent(
        f"""
        import gc, resource, torch, models
        from quant import NF4Linear
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        with torch.device("meta"):  # first meta model pulls in torch code once
            models.Decoder(models.ModelConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=1, num_key_value_heads=1, vocab_size=8))
        NF4Linear.from_weight(torch.randn(64, 64), None)  # and the quantizer's code paths
        gc.collect()
        before = rss()
        model = models.load_pretrained({str(tmp_path / "big")!r}, quantize="nf4")
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
        print(before, peak)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    before, peak = map(int, out.stdout.split())
    cfg = json.loads((tmp_path / "big" / "config.json").read_text())
    embed_and_head = 2 * cfg["vocab_size"] * cfg["hidden_size"] * 2  # stay bf16
    # Everything else is 4-bit; allow one full-size bf16 layer plus quantizer scratch in flight.
    largest_layer = cfg["intermediate_size"] * cfg["hidden_size"] * 2
    quantized = (size - embed_and_head) * (4.127 / 16)
    assert peak - before <= embed_and_head + quantized + 6 * largest_layer, (peak - before, size)
    assert peak - before < size  # the bf16 model as a whole never existed
