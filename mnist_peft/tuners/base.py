"""What any adapter type implements: a config and a layer, as two small protocols.

Taken from what the package's callers use, nothing more. A config is read from and written to
``adapter_config.json`` by :mod:`mnist_peft.io.adapters` (its reader chosen by ``peft_type`` in
``ADAPTER_TYPES``); a layer wraps one base ``nn.Linear`` and is driven by its model (add/delete an
adapter, merge in two steps so ``safe_merge`` can refuse before anything changes, unmerge, forward;
a mixed batch reaches it through the model's shared state).

Generic here: the protocols, and the ledger (:mod:`mnist_peft.tuners.lora.ledger`): its record,
edit tracking and replay take each merged update as a ``MergeStep`` object of the adapter's type.

Two seams, two levels. A type with its own layer (an IA3-like input scaling:
``tests/test_tuner_seam.py`` holds one) satisfies these protocols. A type that shares LoRA's A and
B plugs in per adapter, as peft's ``lora_variant``: a :class:`~mnist_peft.tuners.lora.layer.LoraVariant`
named by its config's ``layer_variant()``, to which the LoRA layer hands every per-adapter step
(create, forward, mixed-batch block, merge step, extra tensors). DoRA is one
(``tuners/dora/``: ``DoraConfig``, the magnitude vector m, ``W' = m (W + s B A) / ||W + s B A||``), so
LoRA and DoRA adapters share a layer, a stack, a merge ledger (bit-exact unmerge) and a mixed batch.
The fused inference path (:mod:`mnist_peft.tuners.lora.fused`) computes plain LoRA only
(``LoraVariant.fusable``); the weight merging of :mod:`mnist_peft.merging` refuses DoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["AdapterConfig", "AdapterLayer"]


@runtime_checkable
class AdapterConfig(Protocol):
    """An adapter type's hyper-parameters (e.g. :class:`~mnist_peft.tuners.lora.config.LoraConfig`)."""

    peft_type: str
    """The ``peft_type`` of ``adapter_config.json`` ("LORA"): picks the reader in ``io.adapters.ADAPTER_TYPES``."""
    target_modules: list[str]
    """Names (or dotted suffixes) of the ``nn.Linear`` modules to adapt, sorted."""

    def to_dict(self) -> dict[str, object]:
        """The fields, as plain JSON values."""
        ...


@runtime_checkable
class AdapterLayer(Protocol):
    """One adapted ``nn.Linear`` holding named adapters (e.g. :class:`~mnist_peft.tuners.lora.layer.LoraLinear`).

    Merge is two calls so a model can check every new weight before any is live: ``merged_weight``
    computes, ``commit_merge`` makes it live; ``unmerge`` restores the base weight (bit-exactly, for LoRA).
    """

    base_layer: nn.Module
    """The wrapped layer; the model gets it back on unload."""
    merged_adapters: list[str]
    """The adapters merged into ``base_layer.weight``, in merge order."""

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters that this layer holds."""
        ...

    def update_layer(self, adapter_name: str, config: Any, weights: Any = None) -> None:
        """Add adapter ``adapter_name`` per ``config`` (the type's config), with fresh weights or
        ``weights`` (the type's own tensors; LoRA: ``(A, B)``) copied in."""
        ...

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (refused while it is merged)."""
        ...

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update of ``base_layer.weight``, (out, in): merged weight = weight + delta."""
        ...

    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The current weight with the named adapters merged, in a new tensor (nothing live changes)."""
        ...

    def commit_merge(self, adapter_names: Sequence[str], new_weight: torch.Tensor) -> None:
        """Make ``new_weight`` (from :meth:`merged_weight`) live; remember how to restore the base."""
        ...

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without merged adapters (the live weight when nothing is merged)."""
        ...

    def unmerge(self) -> None:
        """Restore the base weight; idempotent."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The forward: base output plus the active adapters' updates."""
        ...
