"""load_pretrained / save_pretrained: Hugging Face checkpoints in safetensors, single or sharded, and
GGUF files (models.gguf: read through the same path, each tensor dequantized as it is read).

Loading builds the model on the meta device (no memory), then reads each tensor from disk straight
into its final dtype and device, one at a time. Tensors are read with plain file reads rather than
a memory map, so the process never holds the file's pages and a converted copy at once: peak memory
is the model in its final dtype plus one tensor. Weights are only ever read from safetensors; nothing
is unpickled. With quantize="nf4", each linear of the decoder blocks is quantized as soon as its
weight is read, so a 4-bit model never exists in 16 or 32 bits as a whole.

`load_checkpoint` returns the model with what loading learned (`Loaded`: the checkpoint directory,
whose tokenizer files go with anything saved from it, and the resolved WeightFormat, which an adapter
trained on this base records); `load_pretrained` is its model alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from models.config import ModelConfig, dtype_from_name
from models.decoder import Decoder, rope_inv_freq
from models.files import atomic_write
from models.gguf import GGUFTensors, gguf_config, is_gguf, read_gguf
from models.gguf_tokenizer import write_hf_tokenizer
from models.hub import CheckpointError, resolve_model_dir
from models.safetensors_io import SafetensorsSource
from models.weight_format import WeightFormat
from quant import NF4Embedding, NF4Linear, NF4Weights, QuantizedHead

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Loaded:
    """What `load_checkpoint` learned besides the model: where it read it from and how it holds it."""

    model: Decoder
    directory: Path  # the checkpoint directory or .gguf file (its tokenizer goes with anything saved from the model)
    format: WeightFormat  # dtype and quantization, resolved: loads the same base again


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    compute_dtype: torch.dtype | None = None,
    quantize_embeddings: bool = False,
) -> Decoder:
    """Load a llama / mistral / qwen2 / qwen3 checkpoint into a `Decoder` (eval mode); see load_checkpoint."""
    return load_checkpoint(path_or_hub_id, dtype, device, quantize, compute_dtype, quantize_embeddings).model


def load_checkpoint(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
    compute_dtype: torch.dtype | None = None,
    quantize_embeddings: bool = False,
) -> Loaded:
    """Load a llama / mistral / qwen2 / qwen3 checkpoint: the model (eval mode), its location and format.

    path_or_hub_id: a Hugging Face checkpoint directory, a hub id, or a `.gguf` file (dequantized
    from llama.cpp's formats as it is read; `Loaded.directory` is then the file).
    dtype: weights' dtype (default: the dtype the checkpoint was saved in, else float32; a quantized
    GGUF file gives float32, its blocks' dequantized values exactly).
    device: "meta" gives the skeleton only (checked against the files, nothing read), for a sharded
    model that is filled from another process later.
    quantize: None or "nf4" (decoder-block linears become frozen 4-bit `NF4Linear`s computing in
    `compute_dtype`, default bfloat16). quantize_embeddings (with quantize="nf4"): the token embedding
    and the output head become 4-bit too (quant.embedding; tied, they stay one module).
    """
    location = resolve_model_dir(path_or_hub_id)
    config = load_config(location)
    dtype = dtype_from_name(dtype) or dtype_from_name(config.torch_dtype) or torch.float32
    device = torch.device(device or "cpu")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: only 'nf4' is supported")
    if quantize_embeddings and not quantize:
        raise ValueError("quantize_embeddings needs quantize='nf4'")
    compute_dtype = (compute_dtype or torch.bfloat16) if quantize else None
    with torch.device("meta"):
        model = Decoder(config)
    expected = expected_tensors(model)
    with _tensor_source(location, config) as source:
        _check_names(source, expected)
        if device.type == "meta":
            if quantize:
                raise ValueError("quantize needs the weights: it cannot load onto the meta device")
            model.to(dtype)
        else:
            with freed_memory_returned():
                _read_weights(model, source, expected, dtype, device, quantize, compute_dtype, quantize_embeddings)
            materialize_buffers(model, device)
    model.tie_weights()
    return Loaded(model.eval(), location, WeightFormat(dtype, quantize, compute_dtype, quantize_embeddings))


def load_config(path_or_hub_id: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, hub id or `.gguf` file, without reading any weights."""
    location = resolve_model_dir(path_or_hub_id)
    return gguf_config(location) if is_gguf(location) else ModelConfig.from_file(location / "config.json")


def _tensor_source(location: Path, config: ModelConfig) -> SafetensorsSource | GGUFTensors:
    if is_gguf(location):
        return GGUFTensors(read_gguf(location), config.num_attention_heads, config.num_key_value_heads)
    return SafetensorsSource(location)


def _read_weights(
    model: Decoder,
    source: SafetensorsSource | GGUFTensors,
    expected: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None,
    compute_dtype: torch.dtype,
    quantize_embeddings: bool = False,
) -> None:
    """Fill the meta model module by module; quantize a block linear (and with quantize_embeddings the
    embedding and an untied head) as soon as its tensors are read."""
    for module_name, module in _leaf_modules(model):
        tensors = {}
        for name in (n for n in expected if n.rpartition(".")[0] == module_name):
            shape, needed = source.shape(name), tuple(expected[name].shape)
            if shape != needed:
                raise CheckpointError(
                    f"{source.file_of(name)}: tensor {name!r} has shape {list(shape)}, the config needs {list(needed)}"
                )
            tensors[name.rpartition(".")[2]] = source.read(name, dtype, device)
        if quantize and _is_quantizable(module_name, module):
            _swap_in_nf4(model, module_name, tensors, compute_dtype)
        elif quantize_embeddings and module_name in ("model.embed_tokens", "lm_head") and tensors:
            _swap_in_nf4_rows(model, module_name, tensors.pop("weight"), compute_dtype)
        else:
            for pname, value in tensors.items():
                setattr(module, pname, nn.Parameter(value))


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While loading, hand freed buffers of 1 MiB and more back to the OS (glibc only).

    glibc raises its mmap threshold after the first large free, so later per-layer temporaries
    (read buffers, quantizer scratch) land on the heap between the small 4-bit results and are never
    returned: a 4-bit load measured 150 MiB resident for a 130 MiB bf16 checkpoint, against 80 MiB
    with the threshold pinned. Afterwards the threshold goes to glibc's own upper bound (32 MiB), the
    value its dynamic rule would reach anyway, and the heap is trimmed.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def _glibc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl or another libc: nothing to tune
        return None


def expected_tensors(model: Decoder) -> dict[str, torch.Tensor]:
    """Parameters a checkpoint must provide (tied lm_head excluded), name -> meta tensor."""
    names = dict(model.named_parameters(remove_duplicate=True))
    return {n: p for n, p in names.items() if not (model.config.tie_word_embeddings and n == "lm_head.weight")}


def _check_names(source: SafetensorsSource | GGUFTensors, expected: dict[str, torch.Tensor]) -> None:
    present = set(source.names())
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source.where}: missing tensor {missing[0]!r}{more}")
    # A tied checkpoint may still carry lm_head.weight, and old ones their rotary buffers: harmless.
    benign = ("lm_head.weight", "rotary_emb.inv_freq")
    unexpected = [n for n in present if n not in expected and not n.endswith(benign)] + source.ignored
    if unexpected:
        warnings.warn(f"{source.where}: ignoring {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in definition order."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _is_quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in QUANTIZABLE


def _swap_in_nf4(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> None:
    parent_name, _, child = name.rpartition(".")
    qlinear = NF4Linear.from_weight(tensors.pop("weight"), tensors.pop("bias", None), compute_dtype=compute_dtype)
    setattr(model.get_submodule(parent_name), child, qlinear)


def _swap_in_nf4_rows(model: nn.Module, name: str, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """The embedding [V, C] as an NF4Embedding, or an untied head as a QuantizedHead over its own rows."""
    try:
        table = NF4Embedding.from_weight(weight, compute_dtype=compute_dtype)
    except ValueError as err:
        raise CheckpointError(f"{name}: cannot hold it in 4 bits: {err}") from None
    if name == "lm_head":
        model.lm_head = QuantizedHead(table)
    else:
        model.model.embed_tokens = table


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary frequencies) that the meta device left empty."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rope_inv_freq(model.config).to(device)


def export_state_dict(model: Decoder, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `model` (4-bit layers dequantized, tied lm_head dropped)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():  # a tied 4-bit head's table is met once, as the embedding
        if isinstance(module, NF4Weights):  # 4-bit linears, embedding and untied head (QuantizedHead.table)
            out[f"{name.removesuffix('.table')}.weight"] = module.dequantize(dtype or torch.float32)
            if isinstance(module, NF4Linear) and module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach()
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            out[full] = p.detach()
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in out.items()}


def save_pretrained(
    model: Decoder,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads.

    config.json, model.safetensors (or shards plus model.safetensors.index.json above
    `max_shard_bytes`), and the tokenizer files from `tokenizer_dir` (e.g. the directory the model was
    loaded from, `Loaded.directory`), if given; a `.gguf` file there gives the Hugging Face tokenizer
    files built from its metadata (models.gguf_tokenizer). Each file is written under a temporary
    name and renamed, so a crash never leaves a file that looks complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = export_state_dict(model, dtype_from_name(dtype))
    stored = next(iter(state.values())).dtype
    shards = _split_shards(state, max_shard_bytes)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        atomic_write(out / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(out / fname, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / "model.safetensors.index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    config = model.config.to_hf_dict(torch_dtype=stored)
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and generation config files that exist in `src` into `dst`; from a `.gguf` file
    `src`, write the Hugging Face files its metadata describes."""
    if is_gguf(src):
        write_hf_tokenizer(src, dst)
        return
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write(dst / name, lambda p, n=name: shutil.copyfile(src / n, p))


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards

