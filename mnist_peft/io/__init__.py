"""Files in PEFT layout: save and load adapters, peft key mapping and the parity harness, model
cards, and the output probe (``probe``) that ``registry add``/``verify`` and loading run.

The names below resolve on first use (PEP 562): ``io.probe`` is torch-free, and importing it (from
``registry verify`` or ``push``) must not import the adapter reader, which needs torch."""

from __future__ import annotations

from mnist_peft.lazy import lazy_names

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MODEL_CARD_NAME",
    "AdapterFiles",
    "load_adapter",
    "load_stack",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]


__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(__all__, "adapters"), globals())
