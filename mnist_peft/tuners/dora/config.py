"""DoRA's configuration: :class:`DoraConfig`, LoRA's fields with the magnitude vector (peft's
``LoraConfig(use_dora=True)``).

Plain Python (no torch), like LoRA's config: ``registry add``/``verify`` read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mnist_peft.tuners.lora.config import LoraConfig

__all__ = ["DoraConfig"]


@dataclass
class DoraConfig(LoraConfig):
    """DoRA hyper-parameters (Liu et al. 2024): LoRA's, with the weight split into a magnitude vector
    ``m`` and a direction that LoRA adapts::

        W' = m * (W + s B A) / ||W + s B A||_row        (the norm detached from the gradient, as in peft)

    Written as peft writes it: ``peft_type: LORA``, ``use_dora: true``, and a
    ``lora_magnitude_vector`` tensor (out,) per layer. Example:
        >>> model = LoraModel(MnistMLP(), DoraConfig(r=4, lora_alpha=4))
    """

    use_dora: ClassVar[bool] = True
    adapter_type: ClassVar[str] = "dora"

    def layer_variant(self) -> object:
        from .layer import DORA

        return DORA
