"""What every tab's handlers share: the serving engine over a read-only registry (:class:`AppContext`),
a memo per tab for what a tab caches, and the checks two tabs make of an entry. No gradio here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.requests import public_message

__all__ = ["AppContext", "adapter_label", "verify_status"]


@dataclass
class AppContext:
    """The app's one state: ``predictor`` (the engine, its base and caches; it owns the registry) and
    ``memo``, where a tab keeps what it computed, under its own key (e.g. the registry tab's heat map)."""

    predictor: Predictor
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def registry(self) -> AdapterRegistry:
        return self.predictor.registry

    def adapter_choices(self) -> list[str]:
        """Every adapter entry as ``name@version`` (all versions): what a picker's value may be."""
        return [e.ref for e in self.registry.list() if e.kind == "lora"]

    def adapter_picker_choices(self) -> list[tuple[str, str]]:
        """The pickers' options, ``(label, value)``: the value is the entry's ``name@version``, the label
        names its type where it is not plain LoRA (``digit-9@2 (dora)``)."""
        return [(adapter_label(e), e.ref) for e in self.registry.list() if e.kind == "lora"]

    def public_message(self, exc: BaseException) -> str:
        """``exc`` as one line for the browser (see :meth:`Predictor.public_message`)."""
        return self.predictor.public_message(exc)

    def usable(self, entries: Sequence[RegistryEntry]) -> list[RegistryEntry]:
        """The adapter entries of ``entries`` that fit the app's base and verify (a bad file leaves
        its entry out of the test-image and heat-map tabs; the registry tab says what is wrong)."""
        fits = [e for e in entries if e.kind == "lora" and e.base_fingerprint in (None, self.predictor.fingerprint)]
        return [e for e in fits if verify_status(self.registry, e) == "ok"]


def adapter_label(entry: RegistryEntry) -> str:
    """``name@version``, and the adapter type in brackets unless it is plain LoRA: ``digit-9@2 (dora)``."""
    return entry.ref if entry.adapter_type in (None, "lora") else f"{entry.ref} ({entry.adapter_type})"


def verify_status(registry: AdapterRegistry, entry: RegistryEntry) -> str:
    """``"ok"``, or ``"BAD: "`` and what ``verify`` found (the registry's folder written ``<registry>``)."""
    from mnist_peft.errors import IntegrityError

    try:
        registry.verify_entry(entry)
    except IntegrityError as exc:
        return "BAD: " + public_message(exc, registry.root)
    return "ok"
