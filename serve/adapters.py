"""The named adapters on the one loaded base: from the command line, the admin endpoint, or loaded on demand.

LoRA adapters live side by side in the same LoRALinear layers (one ModuleDict entry per name), so a
batch can mix them row by row (lora.per_row_adapters). Prompt/prefix-tuning adapters are kept aside
and attached to the model for the batches of their own requests (the model has one set of virtual
tokens at a time). Every kind goes on the model through the one loader (adapters.prepare + install).

Loading never stalls decoding for long: the files are read and the tensors built (`prepare`) with no
lock held; only `install` (module insertions and device-local copies) and unloading take the engine's
lock, which the scheduler releases between steps.

Adapters on demand (LoRAX / S-LoRA style): with an adapter root, a request for a model that is not
loaded loads `root/<name>` on first use. At most `max_adapters` are held at once, all counted; when a
new one needs a slot, the least recently used adapter that was loaded on demand and has no request in
flight is evicted. Adapters the operator chose (command line, admin endpoint) are never evicted.
Requests pin their adapter (`acquire` ... `release`) from the moment it is resolved until their last
event, so an adapter in use is never evicted; when every slot is pinned the request gets a 503.
Concurrent first requests for one adapter load it once (the others wait for that load).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from adapters import Adapter, describe, install, prepare, trained_base
from lora.inject import delete_adapter
from models.decoder import Decoder
from models.hub import CheckpointError
from models.weight_format import WeightFormat
from serve.protocol import APIError

log = logging.getLogger("serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
DEFAULT_MAX_ADAPTERS = 8


class _Loading:
    """One on-demand load in progress: later requests for the same adapter wait on it."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.error: APIError | None = None


class AdapterRegistry:
    """Adapter name -> Adapter, kept in step with the adapters on `model` (held as `base_format`)."""

    def __init__(self, model: Decoder, lock, base_name: str, root: str | Path | None,
                 base_format: WeightFormat, aliases: tuple[str, ...] = (), max_adapters: int = DEFAULT_MAX_ADAPTERS,
                 on_demand: bool = False) -> None:
        self.model = model
        self.lock = lock  # the engine's: held while the model's adapters change
        self.base_name = base_name
        self.aliases = set(aliases) - {base_name}  # other names a request may give the base by (--model as given)
        self.root = Path(root).resolve() if root is not None else None
        self.base_format = base_format
        self.max_adapters = max_adapters
        self.on_demand = on_demand and self.root is not None  # load unknown models from the root on first use
        self._adapters: dict[str, Adapter] = {}  # in the order they were loaded (as /v1/models lists them)
        self._last_used: dict[str, int] = {}  # name -> tick of its last acquire (least recently used: smallest)
        self._ticks = itertools.count()
        self._resident: set[str] = set()  # the operator's (command line, admin): never evicted
        self._pins: Counter[str] = Counter()  # requests in flight per adapter
        self._loading: dict[str, _Loading] = {}
        self._state = threading.Lock()  # guards the bookkeeping above (never held while loading)
        self.loads = 0  # on-demand loads done
        self.evictions = 0  # on-demand adapters evicted to make room

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def directory(self, name: str) -> Path:
        return self._adapters[name].directory

    def items(self) -> list[tuple[str, Path]]:
        """(name, directory) of every adapter: a snapshot, safe while another thread loads or unloads."""
        with self._state:
            return [(name, a.directory) for name, a in self._adapters.items()]

    def has(self, name: str) -> bool:
        return name in self._adapters

    # ------------------------------------------------------------------ requests

    def acquire(self, model_field: str) -> str | None:
        """A request's `model` -> adapter name (None: the base alone), loaded from the root first when it is
        not held (on demand), and pinned until `release`: a pinned adapter is never evicted. 404 when there
        is no such model."""
        if model_field == self.base_name or model_field in self.aliases:
            return None
        while True:
            with self._state:
                if model_field in self._adapters:
                    self._pins[model_field] += 1
                    self._last_used[model_field] = next(self._ticks)
                    return model_field
                if not self.on_demand:
                    raise self._not_found(model_field)
                loading = self._loading.get(model_field)
                if loading is None:
                    loading = self._loading[model_field] = _Loading()
                    break  # this thread loads it; the others wait below
            loading.finished.wait()
            if loading.error is not None:
                raise loading.error
        with self._loaded_or_failed(model_field, loading):
            self._load_on_demand(model_field)
        return model_field

    def release(self, name: str | None) -> None:
        """The request that pinned `name` (through `acquire`) is over."""
        if name is None:
            return
        with self._state:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    def _not_found(self, model_field: str) -> APIError:
        where = "; none under the adapter root either" if self.on_demand else ""
        return APIError(404, f"model {model_field!r} does not exist (have {[self.base_name, *self._adapters]}{where})",
                        "model_not_found")

    def _load_on_demand(self, name: str) -> None:
        """Load root/<name> into a slot (evicting if need be), pinned once for the caller."""
        if not NAME.fullmatch(name):
            raise self._not_found(name)
        directory = self.path_under_root(name)
        if not directory.is_dir():
            raise self._not_found(name)
        prepared = self._prepare(name, directory)
        self._make_room(name)
        self._install(name, prepared, resident=False, pins=1)
        with self._state:  # loads of different adapters run on their requests' threads at once
            self.loads += 1
        log.info("loaded %s adapter %s on demand from %s", prepared.adapter.kind, name, directory)

    def _make_room(self, name: str) -> None:
        """Evict least recently used on-demand adapters until one more fits; 503 when none can go."""
        while True:
            with self._state:
                held = len(self._adapters) + len(self._loading) - (name in self._loading)
                if held < self.max_adapters:
                    return
                evictable = [n for n in self._adapters if n not in self._resident and not self._pins[n]]
                if not evictable:
                    raise APIError(503, f"cannot load adapter {name!r}: all {self.max_adapters} adapter slots "
                                   "(--max-adapters) hold adapters with requests in flight or chosen by the operator; "
                                   "retry later", "adapter_slots_full", "server_error")
                victim = min(evictable, key=self._last_used.__getitem__)
                adapter = self._adapters.pop(victim)  # no request can pin it from here on
                del self._last_used[victim]
            self._remove(adapter)
            with self._state:
                self.evictions += 1
            log.info("evicted adapter %s (least recently used)", victim)

    # ------------------------------------------------------------------ the operator's adapters

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
        """Register adapter `name` from `directory` (LoRA/QLoRA/prompt/prefix, ours or PEFT's) for good (never
        evicted); 4xx APIError when refused, 503 when no slot can be freed."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == self.base_name or name in self.aliases:
            raise APIError(400, f"adapter name {name!r}: 1-64 of A-Z a-z 0-9 . _ : -, not the base's name", "invalid_name")
        directory = Path(directory)
        if not directory.is_dir():
            raise APIError(400, f"{directory}: no such adapter directory", "adapter_not_found")
        with self._state:
            if name in self._adapters or name in self._loading:
                raise APIError(409, f"adapter {name!r} is already loaded", "adapter_exists")
            loading = self._loading[name] = _Loading()  # holds its slot and name while it loads
        with self._loaded_or_failed(name, loading):
            prepared = self._prepare(name, directory)
            self._make_room(name)
            self._install(name, prepared, resident=True, pins=0)
        log.info("loaded %s adapter %s from %s", prepared.adapter.kind, name, directory)

    def unload(self, name: str) -> None:
        with self._state:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise APIError(404, f"no adapter named {name!r}", "adapter_not_found")
            self._resident.discard(name)
            self._last_used.pop(name, None)
        self._remove(adapter)  # requests still running on it end with an error (the engine checks `has`)
        log.info("unloaded adapter %s", name)

    # ------------------------------------------------------------------ loading

    @contextlib.contextmanager
    def _loaded_or_failed(self, name: str, loading: _Loading) -> Iterator[None]:
        """Around the load `loading` stands for: its APIError is kept for the requests waiting on it, and
        when it ends (either way) the name is free again and they are let go."""
        try:
            yield
        except APIError as err:
            loading.error = err
            raise
        finally:
            with self._state:
                del self._loading[name]
            loading.finished.set()

    def _prepare(self, name: str, directory: Path):
        """Check the base it needs and read it, with no lock held (the engine keeps decoding)."""
        try:
            needed = trained_base(directory)
            if needed is not None and needed != self.base_format:
                raise APIError(409, f"adapter {name!r} needs a base held as {describe(needed)} (its training record), "
                               f"but this server holds the base as {describe(self.base_format)}: serve it from a server "
                               "started with that base", "base_mismatch")
            return prepare(self.model, directory, name)
        except (CheckpointError, ValueError, OSError) as err:
            raise APIError(400, f"cannot load adapter {name!r}: {err}", "invalid_adapter") from None

    def _install(self, name: str, prepared, resident: bool, pins: int) -> None:
        """Put a prepared adapter on the model under the engine's lock, between steps."""
        with self.lock:
            try:
                adapter = install(self.model, prepared)
            except (CheckpointError, ValueError, OSError) as err:
                raise APIError(400, f"cannot load adapter {name!r}: {err}", "invalid_adapter") from None
            finally:
                self.model.virtual_tokens = None  # prompt/prefix tuning: batches attach their own
            with self._state:
                self._adapters[name] = adapter
                self._last_used[name] = next(self._ticks)
                if resident:
                    self._resident.add(name)
                if pins:
                    self._pins[name] += pins
        trained = adapter.base
        if trained is not None and bool(trained.quantize) != bool(self.base_format.quantize):
            log.warning("adapter %s was trained on a %s base but serves on a %s one: outputs will differ slightly",
                        name, describe(trained), describe(self.base_format))

    def _remove(self, adapter: Adapter) -> None:
        if adapter.kind == "lora":
            with self.lock:
                delete_adapter(self.model, adapter.name)

    def virtual_tokens(self, name: str | None):
        """The prompt/prefix-tuning module of adapter `name`, or None (a LoRA adapter, or the base)."""
        adapter = self._adapters.get(name) if name is not None else None
        return adapter.virtual_tokens if adapter is not None else None
