"""The engine's two caches, both least-recently-used:

- :class:`EntryCache`: registry entries read from disk and checked (each file against the sha256 the
  index records, the adapter's base fingerprint against the engine's), keyed on
  :func:`~mnist_peft.serving.stacks.entry_key`, so a new weight or mix of known adapters reads no file.
- :class:`StackCache`: each distinct weighted stack combined into one adapter of the engine's model
  (the exact ``cat`` combination), kept while a byte budget allows and removed with ``delete_adapter``.
  A DoRA adapter is no additive update and combines with nothing: it is served alone, at weight 1,
  as its own files (:func:`~mnist_peft.serving.stacks.check_servable`).

Neither locks: the engine (:class:`~mnist_peft.serving.engine.Predictor`) calls them on its one
model thread (:class:`~mnist_peft.serving.lane.ModelLane`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mnist_peft.errors import FingerprintMismatchError, InvalidArgumentError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.tuners.lora.model import LoraModel

from .stacks import Stack, check_servable, entry_key

__all__ = ["DEFAULT_CACHE_BYTES", "ENTRY_CACHE_SIZE", "CacheInfo", "EntryCache", "StackCache", "check_cache_bytes"]

DEFAULT_CACHE_BYTES = 64 << 20  # ~600 rank-4 adapters of this MLP (109 KB each)
ENTRY_CACHE_SIZE = 64  # registry entries kept read and checked (~109 KB each): a new weight of a known adapter reads no file


@dataclass
class CacheInfo:
    """The LRU cache of combined stacks: what it holds and what it has done; and the small LRU of
    registry entries read from disk and checked (``entry_*``), which the stacks are combined from."""

    entries: int
    nbytes: int
    budget: int
    hits: int
    misses: int
    evictions: int
    entry_files: int = 0
    entry_hits: int = 0
    entry_misses: int = 0


def check_cache_bytes(cache_bytes: int) -> None:
    """Refuse a negative byte budget.

    Raises:
        InvalidArgumentError: ``cache_bytes`` < 0.
    """
    if cache_bytes < 0:
        raise InvalidArgumentError(f"cache_bytes must be >= 0, got {cache_bytes}")


class EntryCache:
    """Registry entries' adapters (``AdapterFiles``), read and checked once, up to ``size`` of them."""

    def __init__(self, registry: AdapterRegistry, fingerprint: str, *, size: int = ENTRY_CACHE_SIZE) -> None:
        self.registry = registry
        self.fingerprint = fingerprint
        self.size = size
        self._files: OrderedDict[tuple[str, str, str, str], Any] = OrderedDict()  # (registry, ref, weights sha, config sha) -> AdapterFiles
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._files)

    def get(self, entry: RegistryEntry, registry: AdapterRegistry | None = None, *, label: str | None = None) -> Any:
        """``entry``'s adapter (``AdapterFiles``) in ``registry`` (default: the engine's), from the LRU or
        read now: each of its two files read once and checked against the sha256 the index records (the
        bytes parsed are the bytes checked), then its base fingerprint against the engine's."""
        registry = registry or self.registry
        key = (str(registry.root), *entry_key(entry))
        files = self._files.get(key)
        if files is not None:
            self._files.move_to_end(key)
            self.hits += 1
            return files
        from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, adapter_from_bytes, check_fingerprint

        self.misses += 1
        config, weights = (registry.read_file(entry, fname) for fname in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))
        files = adapter_from_bytes(config, weights, folder=registry.folder(entry))
        try:
            check_fingerprint(files, self.fingerprint)
        except FingerprintMismatchError as exc:
            raise FingerprintMismatchError(
                f"adapter {label or entry.ref!r} was trained on base {exc.expected[:12]}..., but this server's base is "
                f"{exc.actual[:12]}...; ask a server of its own base for it (mnist-peft serve --base ...)",
                expected=exc.expected,
                actual=exc.actual,
            ) from None
        self._files[key] = files
        while len(self._files) > self.size:
            self._files.popitem(last=False)
        return files


@dataclass
class _Cached:
    name: str  # the adapter's name inside the model
    nbytes: int


class StackCache:
    """Combined stacks as adapters of ``model``, keyed on :attr:`Stack.key`, within ``budget`` bytes
    (least recently used first out; :meth:`evict` can keep a batch's own stacks while it runs)."""

    def __init__(self, model: LoraModel, entries: EntryCache, *, budget: int = DEFAULT_CACHE_BYTES) -> None:
        check_cache_bytes(budget)
        self.model = model
        self.entries = entries
        self.budget = budget
        self._cache: OrderedDict[tuple, _Cached] = OrderedDict()
        self._counter = 0
        self.hits = self.misses = self.evictions = 0

    def load(self, stack: Stack) -> str:
        """The model's adapter for ``stack``, loaded (and cached) if needed."""
        cached = self._cache.get(stack.key)
        if cached is not None:
            self._cache.move_to_end(stack.key)
            self.hits += 1
            return cached.name
        from mnist_peft.merging.combine import combine_adapters

        self.misses += 1
        files = [self.entries.get(m.entry, m.registry, label=m.label) for m in stack.members]
        weights = [w for _, w in stack.items]
        kinds = [getattr(f.config, "adapter_type", "lora") for f in files]
        check_servable(list(zip([ref for ref, _ in stack.items], kinds, weights, strict=True)))  # the files' word, not the index's
        if kinds == ["lora"] * len(files):
            combined = combine_adapters(files, weights, method="cat")  # exact: sum_i w_i s_i B_i A_i
            config, state_dict = combined.config, combined.state_dict
        else:  # one DoRA adapter at weight 1: its own files
            config, state_dict = files[0].config, files[0].state_dict
        self._counter += 1
        name = f"stack-{self._counter}"
        self.model.add_adapter(name, config, state_dict=state_dict, source=stack.label)
        for p in self.model.parameters():
            p.requires_grad_(False)
        nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
        self._cache[stack.key] = _Cached(name, nbytes)
        return name

    def evict(self, keep: frozenset[tuple] | set[tuple] = frozenset()) -> None:
        """Drop least recently used stacks (not those in ``keep``) until the budget holds."""
        total = self.nbytes
        for key in list(self._cache):
            if total <= self.budget:
                break
            if key in keep:
                continue
            cached = self._cache.pop(key)
            self.model.delete_adapter(cached.name)
            total -= cached.nbytes
            self.evictions += 1

    def resize(self, budget: int) -> None:
        """Change the byte budget; least recently used stacks go until it holds."""
        check_cache_bytes(budget)
        self.budget = budget
        self.evict()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cache.values())

    def cached(self) -> list[tuple[tuple, str]]:
        """The cached stacks, least recently used first: ``(Stack.key, adapter name in the model)``."""
        return [(key, c.name) for key, c in self._cache.items()]

    def info(self) -> CacheInfo:
        return CacheInfo(
            entries=len(self._cache),
            nbytes=self.nbytes,
            budget=self.budget,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            entry_files=len(self.entries),
            entry_hits=self.entries.hits,
            entry_misses=self.entries.misses,
        )
