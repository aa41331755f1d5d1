"""LoRALinear: a frozen linear layer plus one or more named low-rank adapters.

Maths (per adapter, W [out,in] the frozen base weight, b its bias, x [..., in]):

    LoRA:   y = W x + b + s · B A drop(x)          A [r,in] Kaiming-uniform, B [out,r] zeros
    scale:  s = alpha / r,  or alpha / sqrt(r) with rsLoRA
    DoRA:   y = m ⊙ (W + s·BA) x / ||W + s·BA||_row + b
            computed as PEFT does, on top of the base output:
            y = base(x) + (m/n - 1) ⊙ (W x') + (m/n) ⊙ s · B A x'     with n = ||W + s·BA||_row
            where x' = drop(x) and n is detached (DoRA paper §4.3: the norm is a constant for
            backprop). m [out] starts at n, so a fresh DoRA layer also equals its base exactly.

Merging folds the active adapter into the weight: W <- W + s·BA (LoRA) or W <- m/n ⊙ (W + s·BA)
(DoRA, n taken before merging), and `unmerge` takes it out again using the adapter's current A, B, m.

The one thing that can go wrong: changing an adapter while it is merged. The weight keeps the delta
from merge time while `unmerge` subtracts the current one, so W is silently not restored (and the
merged output no longer matches the adapter). Hence forward refuses to run a merged layer with
gradients in training mode, and switching, disabling or adding adapters is refused while merged.
(Merging also rounds: in bf16/fp16 W + s·BA is rounded to the weight dtype, so merged outputs
drift slightly from unmerged ones; a 4-bit base cannot hold W + s·BA at all, see `merge`.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora.dropout import keep_mask
from lora.lowrank import compute_dtype, drop, lora_delta
from quant import NF4Weights


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's dense weight [out,in]: nn.Linear's parameter, or a 4-bit layer dequantized."""
    return base.dequantize() if isinstance(base, NF4Weights) else base.weight


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


def _traced_lora_term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, p: float) -> torch.Tensor:
    """lora_delta's maths in plain ops for torch.compile (`train.run --compile`), which cannot trace NumPy's
    generator: every mask would split the block's graph. The keep-mask comes from `bernoulli_`, so under
    compile the masks are the compiler's draws from torch's seeded state (still independent Bernoulli(1-p),
    reproducible from the seed), not lora.dropout's; autograd's saved tensors are the compiler's choice.
    """
    dtype = compute_dtype(x, a.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype)
        if p > 0:
            xc = drop(xc, torch.empty_like(xc, dtype=torch.bool).bernoulli_(1.0 - p), 1.0 / (1.0 - p))
        return F.linear(F.linear(xc, a.to(dtype)), b.to(dtype)) * s  # (..., r) then (..., out)


class LoRALinear(nn.Module):
    """A base linear layer (nn.Linear or quant.NF4Linear, kept frozen as `self.base`) plus named adapters.

    Adapters live in ModuleDicts keyed by adapter name, as in PEFT: `lora_A[name]` (nn.Linear in→r),
    `lora_B[name]` (nn.Linear r→out), `lora_dropout[name]`, and for DoRA `lora_magnitude_vector[name]`
    (a [out] Parameter in a ParameterDict). One adapter is active at a time (`active_adapter`);
    `disabled` bypasses all of them. forward: x [..., in] -> [..., out] in the base output's dtype.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = "default",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None  # which adapter the base weight currently contains
        # Per-row adapters for serving a mixed batch: adapter name -> row indices [n] (LongTensor).
        # Set through lora.inject.per_row_adapters; None keeps the single-adapter path below.
        self.row_groups: dict[str, torch.Tensor] | None = None
        # DoRA: n at merge time, needed to unmerge (a buffer so it follows .to(); not saved).
        self.register_buffer("_merge_norm", None, persistent=False)
        for p in base.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, use_dora, dtype)

    # ------------------------------------------------------------------ adapters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Add adapter `name` (A Kaiming-uniform, B zero, so the output is unchanged) and make it active."""
        if r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got r={r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise RuntimeError("cannot add an adapter while one is merged: call unmerge() first")
        device = _base_device(self.base)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.reset_adapter(name)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._weight_norm(name).to(dtype))
        self.active_adapter = name

    def reset_adapter(self, name: str) -> None:
        """PEFT's default init: A as nn.Linear's own init (kaiming_uniform_, a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged: call unmerge() before deleting it")
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.r, self.alpha, self.scaling):
            table.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active_adapter(self, name: str | None) -> None:
        """Route forward through adapter `name` (None: base only). Refused while another one is merged."""
        if name is not None and name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (have {self.adapter_names})")
        if self.merged and name != self.merged_adapter:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged: call unmerge() before switching to {name!r}")
        self.active_adapter = name

    def set_disabled(self, disabled: bool) -> None:
        """Bypass the adapters (forward = base). Refused while merged: the base weight holds the adapter."""
        if disabled and self.merged:
            raise RuntimeError("cannot disable adapters while one is merged into the base weight: call unmerge() first")
        self.disabled = disabled

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of adapter `name`, keyed as in PEFT's files: lora_A.weight, lora_B.weight, lora_magnitude_vector.

        This is the one place that says what an adapter parameter is; freezing, optimizer groups and
        saving all go through it.
        """
        params = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return params

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ------------------------------------------------------------------ maths

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A [out,in] in float32 (low-precision CPU matmuls are slow and lossy)."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def _weight_norm(self, name: str) -> torch.Tensor:
        """n = ||W + s·BA|| per output row [out], float32, detached (as in PEFT and the DoRA paper)."""
        with torch.no_grad():
            w = base_weight(self.base).float()
            return torch.linalg.norm(w + self.delta_weight(name), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.merged and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weight: training it now would leave a "
                "stale delta in the weight; call unmerge() first (or use eval mode / torch.no_grad() for inference)"
            )
        result = self.base(x)
        if self.row_groups is not None:
            return self._per_row(x, result)
        name = self.active_adapter
        if self.disabled or self.merged or name is None:  # merged: the base weight already holds it
            return result
        out_dtype = result.dtype
        if name in self.lora_magnitude_vector:
            result = result + self._dora_term(x.to(self.lora_A[name].weight.dtype), result, name)
        else:
            result = result + self._lora_term(x, name)
        return result.to(out_dtype)

    def _lora_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B A drop(x) for x [..., in] -> [..., out], through lora.lowrank (no float32 copy of x kept)."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if torch.compiler.is_compiling():
            return _traced_lora_term(x, a, b, s, p if dropout.training else 0.0)
        return lora_delta(x, a, b, s, p, dropout.training)

    def _per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row group gets its own adapter's delta: x [B, ..., in], rows gathered per adapter.

        The same maths as the single-adapter path on the gathered rows, so a row's output equals the
        row run alone with its adapter active. Rows in no group (or whose adapter this layer lacks)
        get the base output.
        """
        if self.merged:  # the base weight holds one adapter's delta for every row
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged: per-row adapters need unmerged layers")
        if self.disabled:
            return result
        out_dtype = result.dtype
        out = result
        for name, rows in self.row_groups.items():
            if name not in self.lora_A or rows.numel() == 0:
                continue
            A = self.lora_A[name]
            whole = rows.numel() == x.shape[0]  # one adapter for the whole batch: no gather needed
            xs = x if whole else x.index_select(0, rows)
            base = result if whole else result.index_select(0, rows)
            if name in self.lora_magnitude_vector:
                delta = self._dora_term(xs.to(A.weight.dtype), base, name)
            else:
                delta = self._lora_term(xs, name)
            # Summed and rounded as the single-adapter path does, so low-precision outputs match it too.
            rows_out = (base + delta).to(out_dtype)
            if whole:
                return rows_out
            if out is result:
                out = result.clone()  # groups are disjoint: each reads the base output of its own rows
            out.index_copy_(0, rows, rows_out)
        return out

    def _dora_term(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """(m/n - 1) ⊙ W x' + (m/n) ⊙ s·BA x', exactly as PEFT's DoraLinearLayer.forward computes it."""
        A, B = self.lora_A[name], self.lora_B[name]
        dropout, s = self.lora_dropout[name], self.scaling[name]
        weight = base_weight(self.base).to(x.dtype)
        lora_weight = (B.weight @ A.weight).detach().to(x.dtype)
        norm = torch.linalg.norm(weight + s * lora_weight, dim=1).to(weight.dtype).detach()
        mag_norm_scale = (self.lora_magnitude_vector[name] / norm).view(1, -1)
        if isinstance(dropout, nn.Identity) or not self.training:
            # Reuse the base output without its bias: the magnitude rescales W x only.
            bias = getattr(self.base, "bias", None)
            base_result = result - bias if bias is not None else result
            x_drop = x
        else:
            # With dropout the base term must see the same dropped input as the adapter.
            x_drop = drop(x, *keep_mask(x.shape, dropout.p, x.device))
            base_result = F.linear(x_drop, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * B(A(x_drop)) * s

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight; a no-op when already merged.

        nn.Linear base: its weight is updated in place (computed in float32, stored in its dtype).
        4-bit base (quant.NF4Weights): 4 bits cannot hold W + s·BA, so the base is replaced by a plain
        nn.Linear holding the dequantized weight plus the delta, in the 4-bit layer's compute dtype; the
        4-bit layer is kept aside (outside the state dict, see `unmerged_base`) and `unmerge` puts it
        back unchanged.
        """
        name = self.active_adapter
        if self.merged or name is None:
            return
        w = base_weight(self.base).float()
        delta = self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(w + delta, dim=1)
            self._merge_norm = norm
            merged = (self.lora_magnitude_vector[name].float() / norm)[:, None] * (w + delta)
        else:
            merged = w + delta
        if isinstance(self.base, NF4Weights):
            self._swap_in_dense(merged)
        else:
            self.base.weight.data = merged.to(self.base.weight.dtype)
        self.merged_adapter = name

    @property
    def unmerged_base(self) -> nn.Module:
        """The frozen base layer as it was before any merge: the 4-bit layer a merge set aside, else `base`."""
        return self.__dict__.get("_quantized_base", self.base)

    def _swap_in_dense(self, weight: torch.Tensor) -> None:
        quantized = self.base
        dtype = quantized.compute_dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=quantized.bias is not None, device=weight.device, dtype=dtype)
        dense.weight.data = weight.to(dtype)
        if quantized.bias is not None:
            dense.bias.data = quantized.bias.detach().to(dtype)
        dense.requires_grad_(False)
        # Not a submodule: the merged layer's state dict must be the dense one only.
        object.__setattr__(self, "_quantized_base", quantized)
        self.base = dense

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter back out of the base weight; a no-op when nothing is merged."""
        name = self.merged_adapter
        if name is None:
            return
        quantized = self.__dict__.pop("_quantized_base", None)
        if quantized is not None:
            self.base = quantized  # the untouched 4-bit layer: exact
        else:
            w = self.base.weight.float()
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                w = w / (self.lora_magnitude_vector[name].float() / self._merge_norm)[:, None]
            self.base.weight.data = (w - delta).to(self.base.weight.dtype)
        self._merge_norm = None
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}, "
            f"active={self.active_adapter!r}, merged={self.merged_adapter!r}"
        )
