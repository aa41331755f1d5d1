"""ModelConfig: the architecture of a Llama-family decoder, read from a Hugging Face config.json.

Supported `model_type`s are llama, mistral, qwen2 and qwen3. They differ only in small switches
(biases on q/k/v, RMSNorm on q and k, sliding-window attention, rope scaling), which this one
dataclass carries, so a single decoder implementation serves all four.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.files import read_json_object
from models.hub import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    model_type: str = "llama"  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int = 32000  # rows of the embedding and of lm_head
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 11008  # width of the SwiGLU MLP
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # key/value heads (< query heads: grouped-query attention)
    head_dim: int = 0  # per-head width; 0 means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # rotary base frequency
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096  # the context window the model was trained for
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # bias on q/k/v/o (llama, qwen3 flag)
    qkv_bias: bool = False  # bias on q/k/v only (always on in qwen2)
    mlp_bias: bool = False  # bias on gate/up/down (llama flag)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (qwen3)
    sliding_window: int | None = None  # keys further back than this are not attended to
    layer_types: list[str] = field(default_factory=list)  # per block: "full_attention" / "sliding_attention"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint stores its weights in
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read, written back on save

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {self.model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(f"unsupported rope_type {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}")
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config.json dict onto ModelConfig, accepting both rope spellings.

        Older checkpoints write `rope_theta` and `rope_scaling` at the top level; newer ones write
        `rope_parameters` = {"rope_type", "rope_theta", ...}.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {d['hidden_act']!r}: only 'silu' (SwiGLU) is implemented")
        rope_theta, rope_scaling = _read_rope(d)
        layer_types, sliding = _read_attention_kinds(d, model_type)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=bool(d.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            layer_types=layer_types,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        d = read_json_object(path, missing="missing config.json")
        try:
            return cls.from_hf_dict(d)
        except KeyError as err:
            raise CheckpointError(f"{path}: missing field {err.args[0]!r}") from None
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None

    def to_hf_dict(self, torch_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The config.json to write: the dict we read, with our fields (and the stored dtype) on top."""
        d = dict(self.raw)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        d.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
        if "rope_parameters" not in d:  # keep the spelling the checkpoint used
            d["rope_theta"] = self.rope_theta
            if self.rope_scaling is not None:
                d["rope_scaling"] = dict(self.rope_scaling)
        if torch_dtype is not None:
            name = str(torch_dtype).removeprefix("torch.")
            d["torch_dtype"] = name
            if "dtype" in d:
                d["dtype"] = name
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block, by module name."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either spelling."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-kind spelling
        params = params["full_attention"]
    if isinstance(params, dict):
        params = dict(params)
        theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (params if kind != "default" else None)
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(d.get("rope_theta", 10000.0)), (dict(scaling) if scaling else None)


def _read_attention_kinds(d: dict[str, Any], model_type: str) -> tuple[list[str], int | None]:
    """Which blocks use sliding-window attention, following each family's own switches."""
    n = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if d.get("layer_types"):
        kinds = list(d["layer_types"])
    elif model_type == "mistral":
        kinds = ["sliding_attention" if window else "full_attention"] * n
    elif d.get("use_sliding_window") and window:
        first = d.get("max_window_layers", n)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    else:
        kinds = ["full_attention"] * n
    if "sliding_attention" not in kinds:
        window = None
    return kinds, window
