"""The named adapters on the one loaded base: registered at start-up or through the admin endpoint.

LoRA adapters live side by side in the same LoRALinear layers (one ModuleDict entry per name), so a
batch can mix them row by row (lora.per_row_adapters). Prompt/prefix-tuning adapters are kept aside
and attached to the model for the batches of their own requests (the model has one set of virtual
tokens at a time, so those batches hold that adapter's requests only). Changing the set mutates the
model, so it happens under the engine's lock, between batches. Every kind goes on the model through
the one loader, adapters.attach.
"""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from adapters import Adapter, attach
from lora.inject import delete_adapter
from models.decoder import Decoder
from models.hub import CheckpointError
from models.weight_format import WeightFormat
from serve.protocol import APIError

log = logging.getLogger("serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class AdapterRegistry:
    """Adapter name -> Adapter, kept in step with the adapters on `model` (held as `base_format`)."""

    def __init__(self, model: Decoder, lock: threading.Lock, base_name: str, root: str | Path | None,
                 base_format: WeightFormat, aliases: tuple[str, ...] = ()) -> None:
        self.model = model
        self.lock = lock
        self.base_name = base_name
        self.aliases = set(aliases) - {base_name}  # other names a request may give the base by (--model as given)
        self.root = Path(root).resolve() if root is not None else None
        self.base_format = base_format
        self._adapters: dict[str, Adapter] = {}

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def directory(self, name: str) -> Path:
        return self._adapters[name].directory

    def items(self) -> list[tuple[str, Path]]:
        """(name, directory) of every adapter: a snapshot, safe while another thread loads or unloads."""
        return [(name, a.directory) for name, a in list(self._adapters.items())]

    def has(self, name: str) -> bool:
        return name in self._adapters

    def resolve(self, model_field: str) -> str | None:
        """A request's `model` -> adapter name (None: the base alone); 404 for anything else."""
        if model_field == self.base_name or model_field in self.aliases:
            return None
        if model_field in self._adapters:
            return model_field
        raise APIError(404, f"model {model_field!r} does not exist (have {[self.base_name, *self._adapters]})",
                       "model_not_found")

    def path_under_root(self, path: str) -> Path:
        """`path` (relative to the root, or absolute) resolved, symlinks included; 403 if outside the root."""
        if self.root is None:
            raise APIError(403, "adapter administration is disabled: start the server with --adapter-root", "admin_disabled",
                           "permission_error")
        resolved = (self.root / path).resolve()  # an absolute `path` replaces the root here
        if not resolved.is_relative_to(self.root):
            raise APIError(403, f"{path!r} is outside the adapter root", "path_not_allowed", "permission_error")
        return resolved

    def load(self, name: str, directory: str | Path) -> None:
        """Register adapter `name` from `directory` (LoRA/QLoRA/prompt/prefix, ours or PEFT's); 4xx APIError when refused."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == self.base_name or name in self.aliases:
            raise APIError(400, f"adapter name {name!r}: 1-64 of A-Z a-z 0-9 . _ : -, not the base's name", "invalid_name")
        directory = Path(directory)
        if not directory.is_dir():
            raise APIError(400, f"{directory}: no such adapter directory", "adapter_not_found")
        with self.lock:
            if name in self._adapters:
                raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
            try:
                adapter = attach(self.model, directory, name)
            except (CheckpointError, ValueError, OSError) as err:
                raise APIError(400, f"cannot load adapter {name!r}: {err}", "invalid_adapter") from None
            finally:
                self.model.virtual_tokens = None  # prompt/prefix tuning: batches attach their own
            self._adapters[name] = adapter
        trained = adapter.base
        if trained is not None and bool(trained.quantize) != bool(self.base_format.quantize):
            log.warning("adapter %s was trained on a %s base but serves on a %s one: outputs will differ slightly",
                        name, _held(trained), _held(self.base_format))
        log.info("loaded %s adapter %s from %s", adapter.kind, name, directory)

    def virtual_tokens(self, name: str | None):
        """The prompt/prefix-tuning module of adapter `name`, or None (a LoRA adapter, or the base)."""
        adapter = self._adapters.get(name) if name is not None else None
        return adapter.virtual_tokens if adapter is not None else None

    def unload(self, name: str) -> None:
        with self.lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise APIError(404, f"no adapter named {name!r}", "adapter_not_found")
            if adapter.kind == "lora":
                delete_adapter(self.model, name)
        log.info("unloaded adapter %s", name)


def _held(fmt: WeightFormat) -> str:
    return "4-bit" if fmt.quantize else "full-precision"
