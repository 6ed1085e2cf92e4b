"""Adapter stacks: a weighted list of registry references, parsed and checked at every door (a spec
string from the web, a list of pairs from an API client, the Draw tab's pickers), and the
:class:`Stack` a spec resolves to against the registry (:func:`resolve_stack`), keyed on every byte
its combined adapter depends on (:func:`entry_key`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from mnist_peft.errors import InvalidArgumentError, MnistPeftError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.registry.names import parse_ref

from .resolvers import HUB_PREFIX, Member, RegistryResolver, Resolver, is_hub_ref, parse_hub_ref, resolve_ref

__all__ = [
    "MAX_ITEM_CHARS",
    "MAX_SPEC_CHARS",
    "MAX_STACK",
    "MAX_WEIGHT",
    "parse_stack",
    "check_stack",
    "stack_items",
    "format_stack",
    "Stack",
    "check_servable",
    "entry_key",
    "resolve_stack",
    "resolve_items",
    "ResolvedStacks",
]

MAX_STACK = 10  # adapters in one stack
MAX_WEIGHT = 10.0  # |stack weight|; far beyond any useful value, small enough to stay finite
# One item of a spec, "name@version:weight" with spaces: a name is at most 100 characters, a version
# 10 digits, a weight ~25 ("-1.2345678901234567e-05"); a Hub reference "hub:OWNER/REPO/NAME@<commit>"
# at most 4 + 96 + 1 + 96 + 1 + 100 + 41 = 339; 400 leaves room for spaces around each part.
MAX_ITEM_CHARS = 400
MAX_NAME_ITEM_CHARS = 200  # a registry reference alone: name (100) and version (10) with room for spaces
MAX_SPEC_CHARS = MAX_STACK * (MAX_ITEM_CHARS + 1)  # ten items and their commas: 4,010 characters


def parse_stack(spec: str | None) -> list[tuple[str, float]]:
    """``"digit-9@1:1.0, digit-3:0.5"`` -> ``[("digit-9@1", 1.0), ("digit-3", 0.5)]``.

    Registry references only (``name`` or ``name@version``; never a folder: the spec comes from
    the web). A missing weight is 1. ``""``, ``"none"`` or ``"base"`` is the empty stack.

    The sizes are checked before any work (a spec from the web may be megabytes long): its length
    against :data:`MAX_SPEC_CHARS`, then its commas against :data:`MAX_STACK`, both without
    copying or splitting it.

    Raises:
        InvalidArgumentError: a spec over 4,010 characters, a malformed reference or weight, a
            repeated adapter, a weight that is not finite or beyond +-10, or more than 10 adapters.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        raise InvalidArgumentError(f"the adapter spec must be a string such as 'digit-9@1:1.0,digit-3:0.5', got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise InvalidArgumentError(
            f"the adapter spec is {len(spec):,} characters; the limit is {MAX_SPEC_CHARS:,} ({MAX_STACK} adapters, "
            f"'name@version:weight' each): send a shorter one"
        )
    if spec.count(",") >= MAX_STACK:
        raise InvalidArgumentError(f"a stack holds at most {MAX_STACK} adapters; got {spec.count(',') + 1} comma-separated items")
    if spec.strip().lower() in ("", "none", "base"):
        return []
    items: list[tuple[str, object]] = []
    for part in spec.split(","):
        part = part.strip()
        hub = HUB_PREFIX if part.startswith(HUB_PREFIX) else ""  # hub:OWNER/REPO@vN:0.5 -- the first colon is the prefix's
        ref, sep, weight_text = part[len(hub) :].partition(":")
        items.append((hub + ref.strip(), weight_text.strip() if sep else 1.0))
    return check_stack(items, where=f"adapter spec {spec[:200]!r}: ")


def check_stack(items: Sequence[tuple[object, object]], *, where: str = "") -> list[tuple[str, float]]:
    """``(ref, weight)`` pairs checked as :func:`parse_stack` checks them; weights become floats.

    Raises:
        InvalidArgumentError: see :func:`parse_stack`.
    """
    if len(items) > MAX_STACK:  # before any work: a hostile list may be long
        raise InvalidArgumentError(f"{where}a stack holds at most {MAX_STACK} adapters; got {len(items)}")
    checked: list[tuple[str, float]] = []
    for ref, weight in items:
        if not isinstance(ref, str):
            raise InvalidArgumentError(f"{where}{_short(ref)!r} is not a registry name (a string such as 'digit-9@1')")
        if len(ref) > (MAX_ITEM_CHARS if is_hub_ref(ref) else MAX_NAME_ITEM_CHARS):  # before the pattern is matched against it
            raise InvalidArgumentError(
                f"{where}the adapter reference {ref[:40]!r}... is {len(ref):,} characters; a name is at most 100, a Hub reference 339"
            )
        try:
            _ = parse_hub_ref(ref) if is_hub_ref(ref) else parse_ref(ref)
        except MnistPeftError as exc:
            raise InvalidArgumentError(f"{where}{exc}") from None
        try:
            if isinstance(weight, bool) or not isinstance(weight, (int, float, str)) or (isinstance(weight, str) and len(weight) > 40):
                raise TypeError(weight)
            value = float(weight)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range, such as 10**400
            raise InvalidArgumentError(f"{where}the weight {_short(weight)!r} of {ref!r} is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
            raise InvalidArgumentError(
                f"{where}the weight of {ref!r} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {value}"
            )
        checked.append((ref, value))
    names = [r.rpartition("@")[0] if is_hub_ref(r) else parse_ref(r)[0] for r, _ in checked]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"{where}an adapter is named twice; give each once (its weight scales it)")
    return checked


def _short(value: object) -> str:
    """``value`` shown in at most 40 characters, for a message: a container through ``reprlib`` (a
    hostile list may be huge or deeply nested), and an int of 5,000 digits, which has no ``str``."""
    import reprlib

    try:
        return (reprlib.repr(value) if isinstance(value, (list, tuple, dict, set)) else str(value))[:40]
    except (ValueError, RecursionError):  # Python refuses to write an int of more than 4,300 digits
        return f"<{type(value).__name__} too long to show>"


def stack_items(spec: object) -> list[tuple[str, float]]:
    """A stack spec from outside as checked ``(ref, weight)`` pairs: a string (:func:`parse_stack`),
    ``None``, or a list of ``[ref, weight]`` pairs (:func:`check_stack`). Anything else is refused.

    Raises:
        InvalidArgumentError: any other type, an item that is not a pair, or what the parsers refuse.
    """
    if spec is None or isinstance(spec, str):
        return parse_stack(spec)
    hint = "the adapter spec must be a string such as 'digit-9@1:1.0,digit-3:0.5' or a list of [name, weight] pairs"
    if not isinstance(spec, (list, tuple)):
        raise InvalidArgumentError(f"{hint}, got {type(spec).__name__}")
    if len(spec) > MAX_STACK:
        raise InvalidArgumentError(f"a stack holds at most {MAX_STACK} adapters; got {len(spec)}")
    for item in spec:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidArgumentError(f"{hint}; {_short(item)!r} is not a [name, weight] pair")
    return check_stack(spec)


def format_stack(items: Sequence[tuple[str, float]]) -> str:
    """The inverse of :func:`parse_stack`: ``"digit-9@1:1,digit-3@1:0.5"`` (``"none"`` when empty)."""
    return ",".join(f"{ref}:{weight:g}" for ref, weight in items) or "none"


@dataclass(frozen=True)
class Stack:
    """A weighted stack resolved by the engine's resolvers: every adapter's exact entry and weight.

    A named stack in the spec stands for its members (its weight multiplying theirs), so ``items``
    lists adapters only. ``key`` is everything the combined adapter depends on (each adapter's label,
    the sha256 of its weights file and of its ``adapter_config.json``, its weight), so a cached adapter
    can never stand for other bytes.
    """

    items: tuple[tuple[str, float], ...]
    """``(label, weight)`` per adapter, in the order given: ``digit-9@1``, or a Hub one's
    ``hub:OWNER/REPO@<commit>/digit-9@1``."""
    key: tuple[tuple[str, str, str, float], ...]
    """``(label, weights sha256, config sha256, weight)`` per adapter."""
    members: tuple[Member, ...] = field(default=(), compare=False, repr=False)
    """The registries and entries the adapters were resolved to."""

    @property
    def label(self) -> str:
        return " + ".join(f"{w:g} x {ref}" if w != 1 else ref for ref, w in self.items)

    def to_list(self) -> list[dict[str, object]]:
        return [{"adapter": ref, "weight": w} for ref, w in self.items]

    def pinned(self) -> list[tuple[str, float]]:
        """``(reference, weight)`` per adapter that resolves to this very stack again (versions and Hub commits pinned)."""
        return [(m.pinned, m.weight) for m in self.members]

    def describe(self) -> list[dict[str, object]]:
        """Per adapter: ``{"adapter", "weight", "sha256"}`` (the sha256 of its weights file), as an answer names it."""
        return [{"adapter": ref, "weight": w, "sha256": k[1]} for (ref, w), k in zip(self.items, self.key, strict=True)]


def check_servable(members: Sequence[tuple[str, str, float]]) -> None:
    """Refuse a stack the engine cannot serve as one adapter per row: one with a DoRA member (``(ref,
    adapter type, weight)`` per member) beside others or at a weight other than 1. A DoRA layer rescales
    each output row by m/||W + s B A||, so a DoRA adapter is no additive update that combines into one
    adapter with others or scales by a weight.

    Raises:
        InvalidArgumentError: names the DoRA member and what to ask for instead.
    """
    for ref, kind, weight in members:
        if kind != "lora" and (len(members) > 1 or weight != 1.0):
            raise InvalidArgumentError(
                f"{ref!r} is a {'DoRA' if kind == 'dora' else kind} adapter, which is served alone at weight 1 (its layers rescale "
                "each output row by m/||W + s B A||, so it combines with no other adapter and scales by no weight): ask for "
                f"{ref!r} alone, or stack it on the command line (mnist-peft eval --adapter ...)"
            )


def entry_key(entry: RegistryEntry) -> tuple[str, str, str]:
    """What an entry's adapter depends on: ``name@version`` and the sha256 the index records for
    its weights and its config (an entry the index lists without them cannot load, and says so)."""
    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    return tuple(  # type: ignore[return-value]
        [entry.ref, *(str(entry.files.get(fname, {}).get("sha256", "")) for fname in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME))]
    )


def resolve_stack(source: AdapterRegistry | Sequence[Resolver], spec: object) -> Stack | None:
    """The stack a spec names (``None`` for the empty stack), each reference answered by the first of
    ``source``'s resolvers that takes its kind (a registry alone: :class:`RegistryResolver` over it),
    now: an unversioned name is its latest version at this call, so a version registered while a
    server runs is used from the next request on.

    Raises:
        InvalidArgumentError: a malformed spec (see :func:`stack_items`), an adapter named twice once
            named stacks are expanded, more than :data:`MAX_STACK` adapters, or a DoRA adapter in a stack
            of several or at a weight other than 1 (:func:`check_servable`).
        EntryNotFoundError, RegistryError, HubError, IntegrityError: what a resolver says.
    """
    items = stack_items(spec)
    return resolve_items(source, items) if items else None


def resolve_items(source: AdapterRegistry | Sequence[Resolver], items: Sequence[tuple[str, float]]) -> Stack:
    """The stack of checked ``(ref, weight)`` items (see :func:`resolve_stack`); a Ray Serve replica
    calls it with a stack's :meth:`Stack.pinned` items."""
    resolvers = [RegistryResolver(source)] if isinstance(source, AdapterRegistry) else list(source)
    members: list[Member] = []
    for ref, weight in items:
        members += resolve_ref(resolvers, ref, float(weight))
    names = [(str(m.registry.root), m.entry.name) for m in members]  # an adapter at two versions is named twice too
    if len(set(names)) != len(names):
        raise InvalidArgumentError("an adapter is named twice once the named stacks are expanded; give each once (its weight scales it)")
    if len(members) > MAX_STACK:
        raise InvalidArgumentError(f"a stack holds at most {MAX_STACK} adapters; this one expands to {len(members)}")
    for m in members:
        if not math.isfinite(m.weight) or abs(m.weight) > MAX_WEIGHT:
            raise InvalidArgumentError(
                f"the weight of {m.label!r} comes to {m.weight:g}; stack weights multiply to within +-{MAX_WEIGHT:g}"
            )
    check_servable([(m.label, m.entry.adapter_type or "lora", m.weight) for m in members])
    return Stack(
        tuple((m.label, m.weight) for m in members),
        tuple((m.label, *entry_key(m.entry)[1:], m.weight) for m in members),
        tuple(members),
    )


RESOLVED_SIZE = 1024  # spec strings kept resolved (each a few hundred bytes): a server's working set of stacks


class ResolvedStacks:
    """:func:`resolve_stack` with a small LRU of spec strings, each kept while the registry's index is
    unchanged since it was resolved (:meth:`~mnist_peft.registry.adapter_registry.AdapterRegistry.index_signature`;
    nothing is kept where that cannot be told). Resolving reads the index (and a named stack's file) for
    every reference, which a server would otherwise do per request. Hub references are pinned, so what
    they resolve to does not change. Thread-safe.
    """

    def __init__(self, registry: AdapterRegistry, resolvers: Sequence[Resolver], *, size: int = RESOLVED_SIZE) -> None:
        self.registry, self.resolvers, self.size = registry, resolvers, size
        self._kept: OrderedDict[str, tuple[tuple[object, ...], Stack | None]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, spec: object) -> Stack | None:
        if not isinstance(spec, str):
            return resolve_stack(self.resolvers, spec)
        signature = self.registry.index_signature()
        with self._lock:
            kept = self._kept.get(spec)
            if kept is not None and signature is not None and kept[0] == signature:
                self._kept.move_to_end(spec)
                return kept[1]
        stack = resolve_stack(self.resolvers, spec)
        if signature is not None and signature == self.registry.index_signature():  # not written while we read
            with self._lock:
                self._kept[spec] = (signature, stack)
                while len(self._kept) > self.size:
                    self._kept.popitem(last=False)
        return stack
