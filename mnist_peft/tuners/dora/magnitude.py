"""DoRA's magnitude vector in files: its key and the bound on its values (plain Python: the torch-free
probe of ``registry add``/``verify`` runs it on numpy arrays, loads on torch tensors)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from mnist_peft.errors import NonFiniteError

__all__ = ["MAGNITUDE_KEY", "MAX_MAGNITUDE", "check_magnitudes", "is_magnitude_key", "require_no_magnitudes"]

MAGNITUDE_KEY = "lora_magnitude_vector"
"""peft's key suffix of the magnitude vector in a file: ``base_model.model.<module>.lora_magnitude_vector``."""

MAX_MAGNITUDE = 1e4
"""The largest |m_j| a DoRA adapter may hold. A DoRA layer's output j is ``m_j <d_j, x>`` with d_j a
unit-norm row, so |y_j| <= |m_j| ||x||; a unit-RMS input of up to 10,000 features has ||x|| <= 100,
so this bound keeps every output within ``numerics.MAX_ABS_OUTPUT`` (1e6), the probe's limit for
LoRA updates. Real magnitudes start as the base's row norms (0.9 to 7 on the digit base)."""


def check_magnitudes(tensors: Iterable[tuple[str, Any]], *, what: str, fix: str, path: str | None = None) -> None:
    """Refuse a magnitude vector (numpy array or torch tensor) holding NaN/Inf or values beyond
    :data:`MAX_MAGNITUDE`; the other tensors of ``tensors`` are not looked at.

    Raises:
        NonFiniteError: names the tensor.
    """
    for key, t in tensors:
        if not is_magnitude_key(key) or _numel(t) == 0:
            continue
        peak = float(abs(t).max())
        if not math.isfinite(peak):
            raise NonFiniteError(f"tensor {key!r} of {what} holds NaN or Inf values: {fix}", key=key, path=path)
        if peak > MAX_MAGNITUDE:
            raise NonFiniteError(
                f"tensor {key!r} of {what} holds magnitudes beyond +-{MAX_MAGNITUDE:g} ({peak:.3g}), which would overflow the "
                f"model's outputs: {fix}",
                key=key,
                path=path,
            )


def is_magnitude_key(key: str) -> bool:
    """Whether ``key`` names a magnitude vector, in any of peft's forms (``<m>.lora_magnitude_vector``,
    ``...lora_magnitude_vector.default.weight``)."""
    return MAGNITUDE_KEY in key.split(".")


def _numel(t: Any) -> int:
    n = getattr(t, "numel", None)
    return int(n()) if callable(n) else int(getattr(t, "size", 0))


def require_no_magnitudes(keys: Iterable[str], *, use_dora: object, where: str, error: type[Exception]) -> None:
    """Refuse magnitude vectors in a file whose config does not say ``use_dora: true``: loaded as LoRA
    they would be ignored (or trip a reader that expects only ``lora_A``/``lora_B``)."""
    if use_dora is True:
        return
    stray = next((k for k in keys if is_magnitude_key(k)), None)
    if stray is not None:
        raise error(
            f"{where} holds DoRA magnitude vectors ({stray!r}) but its adapter_config.json says use_dora: {use_dora!r}; "
            "set use_dora: true if it is a DoRA adapter, or remove those tensors"
        )
