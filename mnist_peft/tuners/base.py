"""What any adapter type implements: a config and a layer, as two small protocols.

Taken from what the package's callers use, nothing more. A config is read from and written to
``adapter_config.json`` by :mod:`mnist_peft.io.adapters` (its reader chosen by ``peft_type`` in
``ADAPTER_TYPES``); a layer wraps one base ``nn.Linear`` and is driven by its model (add/delete an
adapter, merge in two steps so ``safe_merge`` can refuse before anything changes, unmerge, forward;
a mixed batch reaches it through the model's shared state).

Generic here: the protocols, and the ledger's edit tracking
(:func:`mnist_peft.tuners.lora.ledger.track_data_access`), which watches any weight.
LoRA-only (they assume the update ``W + s * B @ A``): the merge ledger's replay
(:mod:`mnist_peft.tuners.lora.ledger`), the fused inference path (:mod:`mnist_peft.tuners.lora.fused`),
the key layout ``<module>.lora_A.weight`` and the weight merging of :mod:`mnist_peft.merging`.

Where a second type goes. DoRA (peft writes it as ``peft_type: LORA`` with ``use_dora: true``)
would be ``tuners/dora/config.py`` (its config, satisfying :class:`AdapterConfig`) and
``tuners/dora/layer.py`` (its layer, satisfying :class:`AdapterLayer`: lora_A, lora_B and the
magnitude vector m, ``W' = m * (W + s B A) / ||W + s B A||``), plus its reader in
``io/adapters.py``. DoRA's merged weight is not ``W + s B A``, so it does not reuse the ledger's
replay or the fused path; it reuses them only by providing what they take: for the ledger, each
merged update as an ``(A, B, s)`` whose ``W + s * B @ A`` is the merged weight bit for bit
(:data:`~mnist_peft.tuners.lora.ledger.LoraDelta`), else its own deterministic replay of
``merged_weight`` for unmerge; for the fused path, an update of the form ``s (x A^T) B^T``.
``tests/test_tuner_seam.py`` holds a second type (an IA3-like input scaling) that these protocols accept.
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
