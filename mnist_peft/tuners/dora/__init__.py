"""The native DoRA: ``config`` (DoraConfig, the magnitude bound; plain Python) and ``layer`` (the
DoRA math as a LoRA variant: exact and inference forwards, the merge step). It plugs into the LoRA
layer through :class:`~mnist_peft.tuners.lora.layer.LoraVariant`; nothing in ``tuners/lora`` names it."""

from __future__ import annotations

from .config import DoraConfig

__all__ = ["DoraConfig"]
