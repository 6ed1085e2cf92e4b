"""Files in PEFT layout: save and load adapters, peft key mapping and the parity harness, model cards."""

from __future__ import annotations

from .adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    AdapterFiles,
    load_adapter,
    load_stack,
    read_adapter,
    save_adapter,
    write_adapter,
)

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
