"""One request from outside, as the engine takes it in and answers it: the image checked and
normalised (:func:`image_to_input`), an input the web framework already refused (:class:`Refused`),
an answer's fields (:func:`logits_result`), and an error as one line a web client may see
(:func:`public_message`, the one gate every error a client sees passes: the toolkit's own messages
with the registry's folder written ``<registry>`` and any other server path ``<path>``, anything
else one fixed :data:`GENERIC_MESSAGE`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError, MnistPeftError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.numerics import require_bounded

__all__ = [
    "GENERIC_MESSAGE",
    "SIDE",
    "Refused",
    "image_to_input",
    "images_to_input",
    "png_to_pixels",
    "logits_result",
    "message",
    "public_message",
    "require_answer",
    "without_paths",
]

SIDE = 28  # MNIST images are 28 x 28
GENERIC_MESSAGE = (
    "the server could not answer this request: check its values against the app's API page "
    "(an image of 28 x 28 numbers in [0, 1], an adapter spec such as 'digit-9@1:1.0') and send it again"
)
MAX_MESSAGE_CHARS = 1000  # a message quotes outside input cut short; this bounds the whole line
# An absolute POSIX path not inside a word, a URL or an already written "<registry>/...": what a
# message may carry of the server's folders (the data directory, a base folder, the working directory).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.<>/:-])/[\w.@+~-][^\s'\"(),;:`]*")


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
    if isinstance(pixels, (list, tuple)) and any(
        type(v) is bool for row in pixels for v in (row if isinstance(row, (list, tuple)) else (row,))
    ):
        raise InvalidArgumentError("the image's pixels must be numbers in [0, 1], not true/false (JSON booleans)")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidArgumentError("the image's pixels must be finite numbers in [0, 1] (ink 1.0 on black 0.0, as MNIST)")
    return t.reshape(1, SIDE * SIDE).sub_(MNIST_MEAN).div_(MNIST_STD)


MAX_PNG_CHARS = 16 << 10  # base64 of a 28 x 28 PNG: ~1 KB grey, ~4.5 KB RGBA stored uncompressed; 16 KB bounds the work
# The chunks a 28 x 28 PNG may carry: the image's own and a few small ancillary ones. Text (tEXt, zTXt,
# iTXt) and ICC profiles (iCCP) are refused: a compressed one would be inflated by the decoder first.
PNG_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"bKGD", b"sBIT"})


def png_to_pixels(text: str) -> torch.Tensor:
    """A base64-encoded 28 x 28 PNG (grey, or colour taken as its luminance; ink light on dark, as
    MNIST's) as 784 pixels in [0, 1]. A ``data:image/png;base64,`` prefix is allowed.

    Raises:
        InvalidArgumentError: too long, not base64, not a PNG, or not 28 x 28 (checked from the
            header, before any pixel is decoded).
    """
    import base64
    import binascii
    import io

    if len(text) > MAX_PNG_CHARS:
        raise InvalidArgumentError(
            f"the PNG is {len(text):,} characters of base64; a 28 x 28 image needs a few thousand (limit {MAX_PNG_CHARS:,})"
        )
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError("the image string is not base64: send a base64-encoded 28 x 28 PNG, or 784 numbers") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise InvalidArgumentError("the image string is base64 but not a PNG: send a base64-encoded 28 x 28 PNG, or 784 numbers")
    _check_png_chunks(raw)
    try:
        from PIL import Image
    except ImportError:  # pillow comes with the ui and serve extras
        raise InvalidArgumentError("this server cannot read PNG images (pillow is not installed): send 784 numbers in [0, 1]") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.size != (SIDE, SIDE):
                raise InvalidArgumentError(f"the PNG is {img.size[0]} x {img.size[1]}; send a 28 x 28 one (MNIST's size)")
            grey = img.convert("L")
            pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    except InvalidArgumentError:
        raise
    except Exception:  # a truncated or corrupt PNG: PIL's own messages name no field
        raise InvalidArgumentError("the PNG could not be decoded (truncated or corrupt): send a valid 28 x 28 PNG") from None
    return pixels.to(torch.float32).div_(255.0)


def _check_png_chunks(raw: bytes) -> None:
    """Walk the PNG's chunks before any is decoded: only :data:`PNG_CHUNKS`, and a 28 x 28 header.

    Raises:
        InvalidArgumentError: another chunk, a truncated chunk, or another size.
    """
    import struct

    pos = 8
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise InvalidArgumentError("the PNG is truncated: send a valid 28 x 28 PNG")
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        if kind not in PNG_CHUNKS:
            raise InvalidArgumentError(
                f"the PNG holds a {kind.decode('latin-1')!r} chunk; send a plain 28 x 28 PNG (no text or colour-profile chunks)"
            )
        if kind == b"IHDR" and raw[pos + 8 : pos + 16] != struct.pack(">II", SIDE, SIDE):
            w, h = struct.unpack(">II", raw[pos + 8 : pos + 16].ljust(8, b"\0"))
            raise InvalidArgumentError(f"the PNG is {w} x {h}; send a 28 x 28 one (MNIST's size)")
        pos += 12 + length
        if kind == b"IEND":
            return
    raise InvalidArgumentError("the PNG has no end (IEND): send a valid 28 x 28 PNG")


def images_to_input(images: object, *, max_images: int) -> torch.Tensor:
    """A request's ``images``: a list of 1 to ``max_images`` images, each 784 (or 28 x 28) numbers in
    [0, 1] or a base64 PNG string, as the model's (K, 784) input.

    Raises:
        InvalidArgumentError: not a list, empty or too long, or an image :func:`image_to_input` or
            :func:`png_to_pixels` refuses (named by its index).
    """
    if not isinstance(images, list) or not images:
        raise InvalidArgumentError("'images' must be a non-empty list of images (each 784 numbers in [0, 1] or a base64 PNG)")
    if len(images) > max_images:
        raise InvalidArgumentError(f"'images' holds {len(images):,} images; this server takes at most {max_images} per request")
    rows = []
    for i, image in enumerate(images):
        try:
            rows.append(image_to_input(png_to_pixels(image) if isinstance(image, str) else image))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"images[{i}]: {exc}") from None
    return torch.cat(rows)


@dataclass(frozen=True)
class Refused:
    """An input gradio could not take in for one request of a batch (a file that was not uploaded, a
    malformed value): that request is answered with ``error``, its batch-mates as usual."""

    error: Exception


def require_answer(logits: torch.Tensor, *, who: str) -> None:
    """Refuse to tell an answer (a row of logits, or rows) that is not finite or beyond
    :data:`~mnist_peft.numerics.MAX_ABS_OUTPUT`: JSON has no NaN, and a logit of 1e30 is no answer.

    Raises:
        NonFiniteError: naming ``who`` ("the base", "the stack 'digit-9@1'") and what to do.
    """
    require_bounded(
        {"logits": logits}, what=f"{who}'s answer for this image", fix="this stack cannot answer it; try other adapters or weights"
    )


def logits_result(logits: torch.Tensor) -> dict[str, Any]:
    """One row of logits (10,) as an answer's ``{"label", "probabilities", "logits"}``."""
    return {"label": int(logits.argmax()), "probabilities": logits.softmax(0).tolist(), "logits": logits.tolist()}


def message(exc: BaseException) -> str:
    """``exc`` as one line (a ``KeyError``'s text without its quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())


def public_message(exc: BaseException, root: Path | None = None) -> str:
    """The one line a web client is told about ``exc``: every error an app handler, the engine or
    the web framework's input checks raise passes here before it leaves the server.

    The toolkit's own errors (:class:`~mnist_peft.errors.MnistPeftError`: a message written for the
    user, naming the problem and the fix) are told as :func:`message` without the server's paths
    (:func:`without_paths`); anything else (a ``TypeError``, a framework's error, a bug) is told
    as :data:`GENERIC_MESSAGE`, never its text, its type or a traceback.
    """
    if not isinstance(exc, MnistPeftError):
        return GENERIC_MESSAGE
    text = without_paths(message(exc), root)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def without_paths(text: str, root: Path | None = None) -> str:
    """``text`` with ``root`` (as given, absolute, resolved) written ``<registry>`` wherever it
    starts a path, and every other absolute path written ``<path>``."""
    if root is not None:
        forms = {str(root), str(root.absolute())}
        with contextlib.suppress(OSError, RuntimeError):
            forms.add(str(root.resolve()))
        for form in sorted(forms, key=len, reverse=True):  # the longest first: an absolute root contains the relative one
            if form not in ("", ".", "/"):
                text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?=/|'|\"|\s|$)", "<registry>", text)
    return _ABSOLUTE_PATH.sub("<path>", text)
