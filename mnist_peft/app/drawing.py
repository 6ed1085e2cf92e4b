"""Drawing preprocessing: a drawing from the web page becomes an MNIST-like input the way MNIST itself
was made (:func:`preprocess_drawing`): the ink's bounding box, scaled so its longer side is 20 px
(aspect ratio kept, anti-aliased), pasted into 28 x 28 with its centre of mass at the centre,
8-bit, normalised as in training. :class:`EditorPayload` is the sketchpad's value as the page sends
it, decoded one request at a time with its size checked from the image header first. No gradio here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import normalize
from mnist_peft.serving.requests import SIDE

__all__ = [
    "SIDE",
    "BOX",
    "CENTRE",
    "INK_THRESHOLD",
    "MAX_DRAWING_SIDE",
    "MAX_LAYERS",
    "drawing_to_ink",
    "preprocess_drawing",
    "EditorPayload",
]

BOX = 20  # MNIST's digits (in SIDE x SIDE images) have their longer side scaled to 20 px ...
CENTRE = 14.0  # ... and its centre of mass at pixel (14, 14) (measured on the test set: 13.99, 14.01)
INK_THRESHOLD = 0.1  # ink below this (anti-aliasing fringe, paper grain) does not count for the bounding box
MAX_DRAWING_SIDE = 2048  # a larger image from the web is refused before any work is spent on it
MAX_LAYERS = 4  # sketchpad layers in one drawing (the page makes one; more is a hand-made request)


def drawing_to_ink(image: object) -> torch.Tensor:
    """Ink intensity (H, W) in [0, 1] of a drawing: 1 where the pen went, 0 on the paper.

    Accepts what Gradio's sketchpad sends (a dict with ``composite``, else ``background`` and
    ``layers``), a numpy array, a PIL image or a tensor: (H, W) gray or (H, W, 1|3|4), uint8 in
    0..255 or float in [0, 1]. Ink is dark strokes on a light or transparent background: each
    pixel's ink is ``alpha * (1 - gray)``. An image whose border is mostly ink is read as light
    strokes on a dark background (MNIST's own polarity) and inverted.

    Raises:
        InvalidArgumentError: no image, a shape or dtype that is not an image, non-finite values,
            floats outside [0, 1], or a side above 2048 pixels.
    """
    if isinstance(image, dict):
        composite = image.get("composite")
        if composite is None:
            parts = [p for p in [image.get("background"), *(image.get("layers") or [])] if p is not None]
            if not parts:
                raise InvalidArgumentError("the drawing is empty: draw a digit on the canvas, then press Predict")
            inks = [drawing_to_ink(p) for p in parts]
            if len({tuple(i.shape) for i in inks}) != 1:
                raise InvalidArgumentError("the drawing's layers differ in size; send one composite image")
            return torch.stack(inks).amax(0)
        image = composite
    if image is None:
        raise InvalidArgumentError("the drawing is empty: draw a digit on the canvas, then press Predict")
    if hasattr(image, "mode") and hasattr(image, "size") and not isinstance(image, torch.Tensor):  # a PIL image
        image = image.convert("RGBA")
    try:
        t = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"the drawing is not an image ({type(image).__name__}): send an (H, W) or (H, W, C) array") from exc
    if t.dim() == 2:
        t = t[..., None]
    if t.dim() != 3 or t.shape[2] not in (1, 3, 4) or t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidArgumentError(f"the drawing has shape {tuple(t.shape)}; send (H, W) gray or (H, W, 3|4) RGB(A)")
    if max(t.shape[0], t.shape[1]) > MAX_DRAWING_SIDE:
        raise InvalidArgumentError(f"the drawing is {t.shape[1]} x {t.shape[0]} pixels; the limit is {MAX_DRAWING_SIDE} per side")
    if t.dtype == torch.uint8:
        t = t.to(torch.float32) / 255.0
    elif t.dtype == torch.bool or t.is_floating_point():
        t = t.to(torch.float32)
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InvalidArgumentError("a float drawing must hold finite values in [0, 1] (or send uint8 in 0..255)")
    else:
        raise InvalidArgumentError(f"the drawing's dtype {t.dtype} is not an image's; send uint8 (0..255) or float (0..1)")
    channels = t.shape[2]
    if channels == 1:
        gray, alpha = t[..., 0], torch.ones_like(t[..., 0])
    else:
        rgb = t[..., :3]
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R 601 luma, as PIL's "L"
        alpha = t[..., 3] if channels == 4 else torch.ones_like(gray)
    ink = alpha * (1 - gray)
    border = torch.cat([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    if float(border.median()) > 0.5:  # light strokes on a dark ground (an MNIST image, a negative): invert
        ink = alpha * gray
    return ink.clamp_(0, 1)


def preprocess_drawing(image: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A drawing as MNIST was made: ``(image (28, 28) in [0, 1], model input (1, 784) normalised)``.

    The ink's bounding box (pixels above :data:`INK_THRESHOLD`) is scaled so its longer side is 20
    pixels, keeping the aspect ratio (anti-aliased bilinear), and pasted into a 28 x 28 field so
    its centre of mass lands on pixel (14, 14). Like MNIST the result is 8-bit: ``image`` holds
    multiples of 1/255, and the model input is :func:`mnist_peft.model.data.normalize` of those bytes,
    so the image the app shows is exactly what the model sees. (An MLP is not shift-invariant: a
    digit drawn off-centre or at another size is misread without this.)

    Example:
        >>> image, x = preprocess_drawing(sketchpad_value)
        >>> model(x).argmax(1)

    Raises:
        InvalidArgumentError: the drawing is empty (no ink) or not an image (see :func:`drawing_to_ink`).
    """
    ink = drawing_to_ink(image)
    mask = ink > INK_THRESHOLD
    if not bool(mask.any()):
        raise InvalidArgumentError("the drawing is empty: draw a digit on the canvas (dark strokes), then press Predict")
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    crop = ink[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].clamp_(0, 1)
    total = small.sum()
    if float(total) <= 0:  # a speck that vanished when scaled: nothing to centre
        raise InvalidArgumentError("the drawing is empty: draw a digit on the canvas (dark strokes), then press Predict")
    cy = float((small.sum(1) * torch.arange(size[0])).sum() / total)
    cx = float((small.sum(0) * torch.arange(size[1])).sum() / total)
    top, left = round(CENTRE - cy), round(CENTRE - cx)
    field = torch.zeros(SIDE, SIDE)
    # Paste with clipping: a digit whose mass sits far to one side may lose a pixel row at the edge, as in MNIST.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size[0], SIDE), min(left + size[1], SIDE)
    field[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    pixels = (field * 255).round_().to(torch.uint8)  # (28, 28), MNIST's 8 bits
    return pixels.to(torch.float32) / 255.0, normalize(pixels[None])


@dataclass
class EditorPayload:
    """A sketchpad value as the page sends it, before anything is decoded (the Draw event runs with
    ``preprocess=False``, so a bad drawing fails its own request, never its batch): the image files
    gradio's queue checked to be uploads (``{"background", "layers", "composite"}``, each ``None``
    or a file reference with a ``path``), or the id of the images the page sent ahead as blobs
    (``blobs``: gradio's ``EditorDataBlobs`` for that id, taken from the component).
    """

    value: object
    blobs: Any = None

    def decode(self) -> dict[str, Any] | None:
        """The drawing's images as RGBA arrays (the composite alone when there is one, as
        :func:`drawing_to_ink` would use it), each image's size read from its header and refused
        above 2048 pixels per side before any pixel is decoded.

        Raises:
            InvalidArgumentError: not a sketchpad value, more than :data:`MAX_LAYERS` layers, a file
                that is not an image, or an image too large.
        """
        value = self.value
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidArgumentError(
                f"the drawing must be a sketchpad value {{'background', 'layers', 'composite'}}, got {type(value).__name__}"
            )
        if value.get("id") is not None:  # the images came ahead as blobs (gradio's own preprocess reads them so)
            parts = {k: getattr(self.blobs, k, None) for k in ("background", "layers", "composite")}
        else:
            parts = {k: value.get(k) for k in ("background", "layers", "composite")}
        layers = parts["layers"] or []
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise InvalidArgumentError(f"the drawing must have a list of at most {MAX_LAYERS} layers; send one composite image")
        if parts["composite"] is not None:
            return {"background": None, "layers": [], "composite": _read_image(parts["composite"])}
        return {
            "background": None if parts["background"] is None else _read_image(parts["background"]),
            "layers": [_read_image(layer) for layer in layers if layer is not None],
            "composite": None,
        }


def _read_image(source: object) -> np.ndarray:
    """An uploaded image (bytes, or a file reference ``{"path": ...}`` gradio checked) as an RGBA
    array; its size is read from the header and refused above :data:`MAX_DRAWING_SIDE` per side
    before any pixel is decoded (a small PNG can declare 12000 x 12000 pixels: 576 MB in RGBA)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        opened: Any = io.BytesIO(source)
    elif isinstance(source, dict) and isinstance(source.get("path"), str):
        opened = source["path"]
    else:
        raise InvalidArgumentError(f"the drawing's image must be an uploaded file, got {type(source).__name__}")
    try:
        image = Image.open(opened)  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError("the drawing is not an image file (send a PNG, as the sketchpad does)") from exc
    with image:
        width, height = image.size
        if max(width, height) > MAX_DRAWING_SIDE:
            raise InvalidArgumentError(
                f"the drawing is {width} x {height} pixels; the limit is {MAX_DRAWING_SIDE} per side (refused before decoding it)"
            )
        try:
            return np.array(image.convert("RGBA"))  # a writable copy (torch warns on a read-only array)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged image data
            raise InvalidArgumentError("the drawing's image data is damaged; draw it again") from exc
