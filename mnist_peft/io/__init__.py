"""Files in PEFT layout: save and load adapters, peft key mapping and the parity harness, model
cards, and the output probe (``probe``) that ``registry add``/``verify`` and loading run.

The names below resolve on first use (PEP 562): ``io.probe`` is torch-free, and importing it (from
``registry verify`` or ``push``) must not import the adapter reader, which needs torch."""

from __future__ import annotations

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


def __getattr__(name: str) -> object:
    import importlib

    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.adapters"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
