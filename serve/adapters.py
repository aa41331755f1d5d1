"""The named adapters on the one loaded base: registered at start-up or through the admin endpoint.

LoRA adapters live side by side in the same LoRALinear layers (one ModuleDict entry per name), so a
batch can mix them row by row (lora.per_row_adapters). Prompt/prefix-tuning adapters are kept aside
and attached to the model for the batches of their own requests (the model has one set of virtual
tokens at a time, so those batches hold that adapter's requests only). Changing the set mutates the model, so it
happens under the engine's lock, between batches.
"""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from serve.protocol import APIError

log = logging.getLogger("serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class AdapterRegistry:
    """Adapter name -> directory, kept in step with the LoRA adapters injected into `model`."""

    def __init__(self, model, lock: threading.Lock, base_name: str, root: str | Path | None, quantized: bool) -> None:
        self.model = model
        self.lock = lock
        self.base_name = base_name
        self.root = Path(root).resolve() if root is not None else None
        self.quantized = quantized
        self._dirs: dict[str, Path] = {}
        self._virtual: dict[str, object] = {}  # prompt/prefix-tuning adapters: name -> VirtualTokens module

    @property
    def names(self) -> list[str]:
        return list(self._dirs)

    def directory(self, name: str) -> Path:
        return self._dirs[name]

    def items(self) -> list[tuple[str, Path]]:
        """(name, directory) of every adapter: a snapshot, safe while another thread loads or unloads."""
        return list(self._dirs.items())

    def has(self, name: str) -> bool:
        return name in self._dirs

    def resolve(self, model_field: str) -> str | None:
        """A request's `model` -> adapter name (None: the base alone); 404 for anything else."""
        if model_field == self.base_name:
            return None
        if model_field in self._dirs:
            return model_field
        raise APIError(404, f"model {model_field!r} does not exist (have {[self.base_name, *self._dirs]})",
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
        from lora.adapter_io import load_adapter, read_training_record
        from models.hub import CheckpointError
        from models.virtual_tokens_io import is_virtual_token_adapter

        if not isinstance(name, str) or not NAME.fullmatch(name) or name == self.base_name:
            raise APIError(400, f"adapter name {name!r}: 1-64 of A-Z a-z 0-9 . _ : -, not the base's name", "invalid_name")
        directory = Path(directory)
        if not directory.is_dir():
            raise APIError(400, f"{directory}: no such adapter directory", "adapter_not_found")
        if is_virtual_token_adapter(directory):
            return self._load_virtual(name, directory)
        record = read_training_record(directory)  # {} for a PEFT adapter: nothing known to compare
        trained_4bit = bool(record.get("base_quantization"))
        if record and trained_4bit != self.quantized:
            log.warning("adapter %s was trained on a %s base but serves on a %s one: outputs will differ slightly",
                        name, "4-bit" if trained_4bit else "full-precision", "4-bit" if self.quantized else "full-precision")
        with self.lock:
            if name in self._dirs:
                raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
            try:
                load_adapter(self.model, directory, adapter_name=name)
            except (CheckpointError, ValueError, OSError) as err:
                raise APIError(400, f"cannot load adapter {name!r}: {err}", "invalid_adapter") from None
            self.model.eval()  # new LoRA layers start in training mode (dropout on)
            self._dirs[name] = directory
        log.info("loaded adapter %s from %s", name, directory)

    def _load_virtual(self, name: str, directory: Path) -> None:
        """A prompt/prefix-tuning adapter: kept aside, attached to the model only while its batch runs."""
        from models.hub import CheckpointError
        from models.virtual_tokens_io import load_virtual_tokens

        with self.lock:
            if name in self._dirs:
                raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
            try:
                module = load_virtual_tokens(self.model, directory)
            except (CheckpointError, ValueError, OSError) as err:
                raise APIError(400, f"cannot load adapter {name!r}: {err}", "invalid_adapter") from None
            finally:
                self.model.virtual_tokens = None  # load_virtual_tokens attaches it; batches attach their own
            self._virtual[name] = module.eval()
            self._dirs[name] = directory
        log.info("loaded prompt/prefix adapter %s from %s", name, directory)

    def virtual_tokens(self, name: str | None):
        """The prompt/prefix-tuning module of adapter `name`, or None (a LoRA adapter, or the base)."""
        return self._virtual.get(name) if name is not None else None

    def unload(self, name: str) -> None:
        from lora.inject import delete_adapter

        with self.lock:
            if name not in self._dirs:
                raise APIError(404, f"no adapter named {name!r}", "adapter_not_found")
            if self._virtual.pop(name, None) is None:
                delete_adapter(self.model, name)
            del self._dirs[name]
        log.info("unloaded adapter %s", name)
