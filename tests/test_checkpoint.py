"""Saving, sharding, dtype handling and clear errors for bad checkpoint files."""
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models
from models.hub import CheckpointError
from models.safetensors_io import read_safetensors_header
from tests.conftest import left_padded_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant,shard_bytes", [("llama_tied", None), ("qwen3", 40_000), ("llama3_rope_old", None)])
def test_saved_model_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path, variant, shard_bytes):
    import transformers

    path, _ = hf_checkpoint(variant)
    ours = models.load_pretrained(path)
    kwargs = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    out = models.save_pretrained(ours, tmp_path / "saved", **kwargs)
    if shard_bytes:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask).logits - ours(ids, attention_mask=mask)).abs()[mask.bool()].max()
        again = models.load_pretrained(out)(ids, attention_mask=mask)
    assert diff <= 1e-4
    assert torch.equal(again, ours(ids, attention_mask=mask))


def test_dtype_follows_checkpoint_and_can_be_overridden(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    bf16 = models.save_pretrained(models.load_pretrained(path), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert models.load_pretrained(bf16).lm_head.weight.dtype == torch.bfloat16
    assert models.load_pretrained(bf16, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_tokenizer_files_are_copied(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    (path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    loaded = models.load_checkpoint(path)  # the model, and the directory its tokenizer files are in
    out = models.save_pretrained(loaded.model, tmp_path / "out", tokenizer_dir=loaded.directory)
    assert (out / "tokenizer_config.json").read_text() == '{"add_bos_token": true}'
    assert (out / "generation_config.json").is_file()


def _rewrite_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_config(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        models.load_pretrained(path)


def test_unsupported_model_type_names_the_supported_ones(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    _rewrite_config(path, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config\.json.*'gpt2'.*llama, mistral, qwen2, qwen3"):
        models.load_pretrained(path)


def test_truncated_safetensors(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        models.load_pretrained(path)


def test_dtype_change_while_reading_goes_piece_by_piece_with_the_same_bits(hf_checkpoint, monkeypatch):
    """float32 stored, bfloat16 wanted: converted through a small staging buffer, bit-identical to .to()."""
    import models.safetensors_io as io

    path, hf = hf_checkpoint("llama")
    monkeypatch.setattr(io, "READ_CHUNK_BYTES", 1000)  # not a multiple of any row: pieces end mid-row
    ours = models.load_pretrained(path, dtype=torch.bfloat16)
    for name, p in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p.to(torch.bfloat16)), name
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        models.load_pretrained(path, dtype=torch.bfloat16)


def test_corrupt_safetensors_header(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at "
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        models.load_pretrained(path)


def test_wrong_shape_names_file_and_tensor(hf_checkpoint):
    path, _ = hf_checkpoint("llama")
    _rewrite_config(path, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.gate_proj\.weight'.*\[112, 64\]"):
        models.load_pretrained(path)


def test_missing_tensor_names_it(hf_checkpoint):
    path, hf = hf_checkpoint("llama")
    state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.v_proj.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        models.load_pretrained(path)


def test_pickle_weights_are_never_loaded(hf_checkpoint):
    path, hf = hf_checkpoint("llama")
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded"):
        models.load_pretrained(path)


def test_header_length_beyond_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        read_safetensors_header(f)


def test_missing_local_dir_is_not_fetched(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        models.load_pretrained(tmp_path / "nope" / "deeper")


def _write_big_bf16_checkpoint(path: Path) -> int:
    cfg = dict(
        model_type="llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, torch_dtype="bfloat16",
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in models.Decoder(models.ModelConfig.from_hf_dict(cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, path / "model.safetensors")
    return (path / "model.safetensors").stat().st_size


def test_bf16_load_peak_memory_is_close_to_checkpoint_size(tmp_path):
    """Loading a bf16 checkpoint never holds a float32 copy or the file's pages beside the model."""
    size = _write_big_bf16_checkpoint(tmp_path / "big")
    script = textwrap.dedent(
        f"""
        import resource, gc, torch, models
        from models.checkpoint import load_pretrained
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        # The first meta-device model pulls in ~70 MiB of torch code once; that is not the checkpoint's.
        with torch.device("meta"):
            models.Decoder(models.ModelConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=1, num_key_value_heads=1, vocab_size=8))
        gc.collect()
        before = rss()
        model = load_pretrained({str(tmp_path / "big")!r})
        # VmHWM is this process's own peak; ru_maxrss would include the parent's size at fork.
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
        assert model.lm_head.weight.dtype == torch.bfloat16
        print(before, peak, file=open(1, "w", closefd=False))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    before, peak = map(int, out.stdout.split())
    assert peak - before <= 1.3 * size, f"peak {(peak - before) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
