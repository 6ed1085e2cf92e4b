"""One request from outside, as the engine takes it in and answers it: the image checked and
normalised (:func:`image_to_input`), an input the web framework already refused (:class:`Refused`),
an answer's fields (:func:`logits_result`), and an error as one line a web client may see
(:func:`public_message`: the registry's folder written ``<registry>``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD

__all__ = ["SIDE", "image_to_input", "Refused", "logits_result", "message", "public_message"]

SIDE = 28  # MNIST images are 28 x 28


def image_to_input(pixels: object) -> torch.Tensor:
    """An MNIST-style image (28 x 28 nested lists or 784 numbers, ink 1.0 on black 0.0, centred
    as MNIST's are) as the model's (1, 784) input, normalised as in training.

    Raises:
        InvalidArgumentError: not 784 finite numbers in [0, 1].
    """
    try:
        t = torch.as_tensor(pixels, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidArgumentError("the image must be 28 x 28 (or 784) numbers in [0, 1]") from exc
    if t.numel() != SIDE * SIDE or t.dim() not in (1, 2):
        raise InvalidArgumentError(f"the image has shape {tuple(t.shape)}; send 28 x 28 (or 784) numbers in [0, 1]")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidArgumentError("the image's pixels must be finite numbers in [0, 1] (ink 1.0 on black 0.0, as MNIST)")
    return t.reshape(1, SIDE * SIDE).sub_(MNIST_MEAN).div_(MNIST_STD)


@dataclass(frozen=True)
class Refused:
    """An input gradio could not take in for one request of a batch (a file that was not uploaded, a
    malformed value): that request is answered with ``error``, its batch-mates as usual."""

    error: Exception


def logits_result(logits: torch.Tensor) -> dict[str, Any]:
    """One row of logits (10,) as an answer's ``{"label", "probabilities", "logits"}``."""
    return {"label": int(logits.argmax()), "probabilities": logits.softmax(0).tolist(), "logits": logits.tolist()}


def message(exc: BaseException) -> str:
    """``exc`` as one line (a ``KeyError``'s text without its quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())


def public_message(exc: BaseException, root: Path) -> str:
    """:func:`message` with ``root`` (as given, absolute, resolved) replaced by ``<registry>``
    wherever it starts a path."""
    import re

    text = message(exc)
    forms = {str(root), str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        forms.add(str(root.resolve()))
    for form in sorted(forms, key=len, reverse=True):  # the longest first: an absolute root contains the relative one
        if form not in ("", ".", "/"):
            text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?=/|'|\"|\s|$)", "<registry>", text)
    return text
