"""Names a package hands on, imported on first use (PEP 562): :func:`lazy_names` makes a package's
``__getattr__`` and ``__dir__`` from a table of name -> submodule, so that importing the package (or a
torch-free module inside it) does not import the heavier modules its public names live in."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_names"]


def lazy_names(
    package: str, homes: Mapping[str, str], namespace: dict[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` is read from ``package.<homes[name]>`` on
    first use and kept in the package's ``namespace`` (its ``globals()``), so later uses cost nothing.

    Example:
        >>> __getattr__, __dir__ = lazy_names(__name__, {"Predictor": "engine"}, globals())
    """

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *homes})

    return __getattr__, __dir__
