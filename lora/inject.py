"""Putting LoRA adapters into a model, and everything done to all of them at once.

Which parameters are "the adapter" is decided in one place, `LoRALinear.adapter_parameters`; here
`adapter_parameters(model, name)` walks the model with it, and freezing, optimizer groups
(`adapter_parameters`), saving (`lora_state_dict`) and counting (`trainable_report`) all use that walk.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from lora.linear import LoRALinear
from quant import NF4Linear, NF4Weights

ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"  # never a target of "all-linear", as in PEFT


@dataclass
class LoraConfig:
    """Hyperparameters of one adapter. The defaults are PEFT's LoraConfig's (its Llama targets q and v);
    the trainer's own defaults are train.config.LoraSettings'.

    target_modules: a list of module names, each matching a module whose full name equals it or
    ends with "." + it (PEFT's rule: "q_proj" matches every block's q_proj); a str is a regex that
    must match the full module name; "all-linear" is every linear layer except the output head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA (magnitude vector per output row)
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, (tuple, set)):
            self.target_modules = targets = sorted(targets)
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as err:
                    raise ValueError(f"LoraConfig.target_modules {targets!r} is not a valid regex ({err})") from None
        elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list of names, a regex or 'all-linear', got {targets!r}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name or "." in self.adapter_name:
            raise ValueError(f"LoraConfig.adapter_name must be a non-empty name without dots, got {self.adapter_name!r}")


# ---------------------------------------------------------------------- finding targets


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear or a 4-bit NF4Linear."""
    return isinstance(module, (nn.Linear, NF4Linear))


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module, skipping the insides of LoRALinears (their base and lora_A/B)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name)
        yield name, module


def _matches(name: str, module: nn.Module, targets: list[str] | str) -> bool:
    if targets == ALL_LINEAR:
        return (is_linear(module) or isinstance(module, LoRALinear)) and name.split(".")[-1] != OUTPUT_LAYER
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Full names of the modules `targets` selects; ValueError if it selects nothing or a non-linear module."""
    found, wrong = [], []
    for name, module in _candidates(model):
        if not name or not _matches(name, module, targets):
            continue
        (found if is_linear(module) or isinstance(module, LoRALinear) else wrong).append(name)
    if wrong:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in wrong})
        raise ValueError(f"target_modules={targets!r} selects non-linear module(s) {wrong[:3]} ({', '.join(kinds)}): LoRA wraps linear layers only")
    if not found:
        linears = [n for n, m in _candidates(model) if n and (is_linear(m) or isinstance(m, LoRALinear))]
        short = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(
            f"target_modules={targets!r} matches no linear layer. Available linear module names: "
            f"{', '.join(short)} (full names like {linears[0] if linears else '-'!r})"
        )
    return found


# ---------------------------------------------------------------------- injecting


def inject_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every target linear of `model` in a LoRALinear carrying adapter `config.adapter_name`.

    A layer already wrapped gets the adapter added beside its others. The new adapter becomes the
    active one, and afterwards only its parameters require grad. Returns the wrapped module names.
    """
    names = find_targets(model, config.target_modules)
    for name in names:  # check all before changing any, so a refusal leaves the model untouched
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and config.adapter_name in module.adapter_names:
            raise ValueError(f"{name} already has an adapter named {config.adapter_name!r}")
        if isinstance(module, LoRALinear) and module.merged:
            raise ValueError(f"{name} has adapter {module.merged_adapter!r} merged: unmerge before adding another")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(config.adapter_name, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora)
            continue
        wrapped = LoRALinear(
            module, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora, config.adapter_name
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped)
    set_active_adapter(model, config.adapter_name)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Adapter `adapter_name`'s parameters keyed `<module path>.lora_A.weight` / `.lora_B.weight` / `.lora_magnitude_vector`.

    These keys are PEFT's file keys without the `base_model.model.` prefix. Pass `.values()` to the
    optimizer.
    """
    out: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.adapter_names:
            out.update({f"{path}.{key}": p for key, p in layer.adapter_parameters(adapter_name).items()})
    return out


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached copies of adapter `adapter_name`'s tensors, keyed as in `adapter_parameters`."""
    state = {k: p.detach().clone() for k, p in adapter_parameters(model, adapter_name).items()}
    if not state:
        raise KeyError(f"model has no LoRA adapter named {adapter_name!r}")
    return state


def mark_only_adapter_trainable(model: nn.Module, adapter_name: str) -> None:
    """requires_grad on exactly the parameters of `adapter_name`; everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name).values():
        p.requires_grad_(True)


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Route every LoRA layer through `adapter_name` (layers without it run their base only), train only it."""
    layers = list(lora_layers(model))
    if not any(adapter_name in layer.adapter_names for _, layer in layers):
        have = sorted({n for _, layer in layers for n in layer.adapter_names})
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r} (has: {have})")
    for _, layer in layers:
        layer.set_active_adapter(adapter_name if adapter_name in layer.adapter_names else None)
    mark_only_adapter_trainable(model, adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name` everywhere; a LoRALinear left with no adapter is replaced by its base."""
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (e.g. a reference model for DPO or KL)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.set_disabled(True)
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None], layers: list[LoRALinear] | None = None) -> Iterator[nn.Module]:
    """Within the block, batch row i runs through adapter names[i] (None: the base alone).

    For serving several adapters in one batch; the row grouping is computed once here, not per layer.
    The active adapter is ignored inside the block and in force again after it. `layers`: the model's
    LoRA layers when the caller keeps them (walking every module costs more than a small decode step).
    """
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(row)
    if layers is None:
        layers = [layer for _, layer in lora_layers(model)]
    device = next(model.parameters()).device
    tensors = {n: torch.tensor(rows, dtype=torch.long, device=device) for n, rows in groups.items()}
    try:
        for layer in layers:
            layer.row_groups = tensors
        yield model
    finally:
        for layer in layers:
            layer.row_groups = None


# ---------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> None:
    """Fold each layer's active adapter into its weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base, after merging its active adapter (merge=False: drop adapters)."""
    for path, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


# ---------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts its logical parameters (num_params())."""
    quantized = [m for m in model.modules() if isinstance(m, NF4Weights)]
    skip = {id(p) for m in quantized for p in m.parameters()}
    trainable = total = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in quantized:
        total += m.num_params()
        trainable += sum(p.numel() for p in m.parameters() if p.requires_grad)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line, e.g. 'trainable params: 4,194,304 || all params: 6,738,415,616 || trainable%: 0.0622'."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
