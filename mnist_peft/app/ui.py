"""The web app (``mnist-peft ui``): draw a digit, switch adapters on, watch the probabilities move.

A Gradio app (what a Hugging Face Space runs) over a registry, read-only: it lists, verifies and
loads entries, and never writes or deletes anything in the registry. Three tabs:

- **Draw**: a sketchpad. The drawing becomes an MNIST-like input the way MNIST itself was made
  (:func:`preprocess_drawing`): the ink's bounding box, scaled so its longer side is 20 px
  (aspect ratio kept, anti-aliased), pasted into 28 x 28 with its centre of mass at the centre,
  8-bit, normalised as in training. The base's probabilities and those of the chosen adapter
  stack (registry entries, ``name@version``, a weight each) are shown side by side.
- **Test images**: a digit's test images the base gets wrong, and which registry adapters fix each.
- **Registry**: entries, versions, metrics, fingerprints and ``verify`` status; the adapter x
  digit heat map of test error rates, measured on the app's base.

Serving: every prediction, from the page or from ``gradio_client`` (the ``/predict`` endpoint),
goes through Gradio's queue with ``batch=True``; :class:`Predictor` turns a batch into **one
mixed-adapter forward** (:func:`mnist_peft.serving.forward.mixed_forward`): each distinct weighted stack
becomes one adapter, the exact ``cat`` combination of its members
(:func:`mnist_peft.merging.combine.combine_adapters`), kept in an LRU cache with a byte budget. Every
request of a batch is checked on its own (the Draw event decodes the page's drawings itself, one
request at a time): a bad one gets its error, never its batch-mates.

The pure parts (preprocessing, stack specs, :class:`Predictor`, the handlers of :class:`UiHandlers`)
need no gradio; :func:`build_app` and :func:`launch` import it (the ``[ui]`` extra).

Example:
    >>> from gradio_client import Client
    >>> Client("http://127.0.0.1:7860/").predict(pixels, "digit-9@1:1.0", api_name="/predict")
    {'base': {'label': 9, 'probabilities': [...]}, 'stack': {'label': 9, ...}}
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mnist_peft.errors import InvalidArgumentError, MnistPeftError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD, load_mnist, normalize
from mnist_peft.registry.adapter_registry import AdapterRegistry, RegistryEntry, parse_ref
from mnist_peft.serving.forward import mixed_forward
from mnist_peft.tuners.lora.layer import LoraModel

__all__ = [
    "API_NAME",
    "preprocess_drawing",
    "drawing_to_ink",
    "image_to_input",
    "parse_stack",
    "check_stack",
    "stack_items",
    "format_stack",
    "Stack",
    "Predictor",
    "UiHandlers",
    "build_app",
    "launch",
    "serve",
    "check_serving_options",
    "spawn_app",
    "require_gradio",
    "LoadReport",
    "run_load",
]

API_NAME = "predict"  # the endpoint gradio_client calls: Client(url).predict(pixels, spec, api_name="/predict")
UNBATCHED_API_NAME = "predict_unbatched"  # the same, one request at a time (undocumented; the load test's control)
SIDE = 28  # MNIST images are 28 x 28 ...
BOX = 20  # ... with the digit's longer side scaled to 20 px ...
CENTRE = 14.0  # ... and its centre of mass at pixel (14, 14) (measured on the test set: 13.99, 14.01)
INK_THRESHOLD = 0.1  # ink below this (anti-aliasing fringe, paper grain) does not count for the bounding box
MAX_DRAWING_SIDE = 2048  # a larger image from the web is refused before any work is spent on it
MAX_LAYERS = 4  # sketchpad layers in one drawing (the page makes one; more is a hand-made request)
MAX_STACK = 10  # adapters in one stack
MAX_WEIGHT = 10.0  # |stack weight|; far beyond any useful value, small enough to stay finite
DEFAULT_CACHE_BYTES = 64 << 20  # ~600 rank-4 adapters of this MLP (109 KB each)
DEFAULT_MAX_BATCH = 32
ENTRY_CACHE_SIZE = 64  # registry entries kept read and checked (~109 KB each): a new weight of a known adapter reads no file
SLOTS = 3  # adapter pickers on the Draw tab
WEIGHT_RANGE = (-2.0, 2.0)  # a picker's weight slider; a value outside it is a hand-made request, refused
DISPLAY_SCALE = 8  # the 28 x 28 input is shown 8x, each pixel an 8 x 8 block (exactly recoverable: every 8th pixel)
NONE_CHOICE = "(none)"
ELEM = {  # element ids the browser test (and anyone scripting the page) relies on
    "sketchpad": "sketchpad",
    "predict": "predict-button",
    "preprocessed": "preprocessed",
    "prediction": "prediction",
    "probabilities": "probabilities",
    "base_label": "base-probabilities",
    "stack_label": "stack-probabilities",
}


# ----------------------------------------------------------------------------- preprocessing
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


# ----------------------------------------------------------------------------- adapter stacks
def parse_stack(spec: str | None) -> list[tuple[str, float]]:
    """``"digit-9@1:1.0, digit-3:0.5"`` -> ``[("digit-9@1", 1.0), ("digit-3", 0.5)]``.

    Registry references only (``name`` or ``name@version``; never a folder: the spec comes from
    the web). A missing weight is 1. ``""``, ``"none"`` or ``"base"`` is the empty stack.

    Raises:
        InvalidArgumentError: a malformed reference or weight, a repeated adapter, a weight that is
            not finite or beyond +-10, or more than 10 adapters.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        raise InvalidArgumentError(f"the adapter spec must be a string such as 'digit-9@1:1.0,digit-3:0.5', got {type(spec).__name__}")
    if spec.strip().lower() in ("", "none", "base"):
        return []
    items: list[tuple[str, object]] = []
    for part in spec.split(","):
        ref, sep, weight_text = part.strip().partition(":")
        items.append((ref.strip(), weight_text.strip() if sep else 1.0))
    return check_stack(items, where=f"adapter spec {spec[:200]!r}: ")


def check_stack(items: Sequence[tuple[object, object]], *, where: str = "") -> list[tuple[str, float]]:
    """``(ref, weight)`` pairs checked as :func:`parse_stack` checks them; weights become floats.

    Raises:
        InvalidArgumentError: see :func:`parse_stack`.
    """
    if len(items) > MAX_STACK:  # before any work: a hostile list may be long
        raise InvalidArgumentError(f"{where}a stack holds at most {MAX_STACK} adapters; got {len(items)}")
    checked: list[tuple[str, float]] = []
    for ref, weight in items:
        if not isinstance(ref, str):
            raise InvalidArgumentError(f"{where}{str(ref)[:40]!r} is not a registry name (a string such as 'digit-9@1')")
        try:
            parse_ref(ref)
        except MnistPeftError as exc:
            raise InvalidArgumentError(f"{where}{exc}") from None
        try:
            if isinstance(weight, bool) or not isinstance(weight, (int, float, str)):
                raise TypeError(weight)
            value = float(weight)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range, such as 10**400
            raise InvalidArgumentError(f"{where}the weight {str(weight)[:40]!r} of {ref!r} is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
            raise InvalidArgumentError(
                f"{where}the weight of {ref!r} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {value}"
            )
        checked.append((ref, value))
    names = [parse_ref(r)[0] for r, _ in checked]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"{where}an adapter is named twice; give each once (its weight scales it)")
    return checked


def stack_items(spec: object) -> list[tuple[str, float]]:
    """A stack spec from outside as checked ``(ref, weight)`` pairs: a string (:func:`parse_stack`),
    ``None``, or a list of ``[ref, weight]`` pairs (:func:`check_stack`). Anything else is refused.

    Raises:
        InvalidArgumentError: any other type, an item that is not a pair, or what the parsers refuse.
    """
    if spec is None or isinstance(spec, str):
        return parse_stack(spec)
    hint = "the adapter spec must be a string such as 'digit-9@1:1.0,digit-3:0.5' or a list of [name, weight] pairs"
    if not isinstance(spec, (list, tuple)):
        raise InvalidArgumentError(f"{hint}, got {type(spec).__name__}")
    if len(spec) > MAX_STACK:
        raise InvalidArgumentError(f"a stack holds at most {MAX_STACK} adapters; got {len(spec)}")
    for item in spec:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidArgumentError(f"{hint}; {str(item)[:40]!r} is not a [name, weight] pair")
    return check_stack(spec)


def format_stack(items: Sequence[tuple[str, float]]) -> str:
    """The inverse of :func:`parse_stack`: ``"digit-9@1:1,digit-3@1:0.5"`` (``"none"`` when empty)."""
    return ",".join(f"{ref}:{weight:g}" for ref, weight in items) or "none"


@dataclass(frozen=True)
class Stack:
    """A weighted stack resolved against the registry: every entry's exact version and weights file.

    ``key`` is everything the combined adapter depends on (entry refs, the sha256 of each entry's
    weights file and of its ``adapter_config.json``, the weights), so a cached adapter can never
    stand for other bytes.
    """

    items: tuple[tuple[str, float], ...]
    """``(name@version, weight)`` per adapter, in the order given."""
    key: tuple[tuple[str, str, str, float], ...]
    """``(name@version, weights sha256, config sha256, weight)`` per adapter."""
    entries: tuple[RegistryEntry, ...] = field(default=(), compare=False, repr=False)
    """The registry entries, as the index described them when the stack was resolved."""

    @property
    def label(self) -> str:
        return " + ".join(f"{w:g} x {ref}" if w != 1 else ref for ref, w in self.items)

    def to_list(self) -> list[dict[str, object]]:
        return [{"adapter": ref, "weight": w} for ref, w in self.items]


# ----------------------------------------------------------------------------- the model server
@dataclass
class _Cached:
    name: str  # the adapter's name inside the model
    nbytes: int


@dataclass
class CacheInfo:
    """The LRU cache of combined stacks: what it holds and what it has done; and the small LRU of
    registry entries read from disk and checked (``entry_*``), which the stacks are combined from."""

    entries: int
    nbytes: int
    budget: int
    hits: int
    misses: int
    evictions: int
    entry_files: int = 0
    entry_hits: int = 0
    entry_misses: int = 0


class Predictor:
    """The app's model: a base and an LRU cache of adapter stacks, answering batches in one forward.

    Each distinct stack is loaded once as one adapter, the exact ``cat`` combination of its members
    with their weights folded in, and kept while the cache's byte budget allows (least recently
    used first out, removed with ``delete_adapter``; a batch's own stacks stay while it runs, so a
    batch may exceed the budget until it ends). The members come from a second, small LRU of
    registry entries read and checked (up to :data:`ENTRY_CACHE_SIZE`, keyed on ``name@version``
    and the sha256 of both adapter files), so a new weight or mix of known adapters reads no file.
    One lock serialises the model: a mixed forward owns its state while it runs. Only registry
    entries are loaded (each adapter file read once and checked against its recorded sha256, the
    base fingerprint compared); nothing is ever written.

    Example:
        >>> p = Predictor(AdapterRegistry("adapters"))
        >>> stack = p.resolve("digit-9@1:1.0")
        >>> p.predict_batch(x, [None, stack])   # (2, 10) logits in one forward
    """

    def __init__(
        self, registry: AdapterRegistry, base: str = "base", *, cache_bytes: int = DEFAULT_CACHE_BYTES, data_dir: str | None = None
    ) -> None:
        from mnist_peft.registry.refs import resolve_base

        if cache_bytes < 0:
            raise InvalidArgumentError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.registry = registry
        self.data_dir = data_dir
        self.base_ref = base
        self.model = LoraModel(resolve_base(base, registry)).eval()
        self.fingerprint = self.model.base_fingerprint()  # once: the app never edits its base
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, _Cached] = OrderedDict()
        self._files: OrderedDict[tuple[str, str, str], Any] = OrderedDict()  # (ref, weights sha, config sha) -> AdapterFiles
        self._lock = threading.RLock()
        self._counter = 0
        self._hits = self._misses = self._evictions = 0
        self._entry_hits = self._entry_misses = 0
        self._test_logits: torch.Tensor | None = None

    # -- stacks
    def resolve(self, spec: object) -> Stack | None:
        """The stack a spec names, against the registry now (``None`` for the empty stack): an
        unversioned name is its latest version at this call, so a version registered while the app
        runs is used from the next request on.

        Raises:
            InvalidArgumentError: a malformed spec (see :func:`stack_items`).
            EntryNotFoundError, RegistryError: an entry that is not there, or not an adapter.
        """
        from mnist_peft.errors import RegistryError

        items = stack_items(spec)
        if not items:
            return None
        resolved, key, entries = [], [], []
        for ref, weight in items:
            entry = self.registry.get(ref)
            if entry.kind != "lora":
                raise RegistryError(f"registry entry {entry.ref!r} is a {entry.kind}, not an adapter; pick a lora entry")
            resolved.append((entry.ref, float(weight)))
            key.append((*_entry_key(entry), float(weight)))
            entries.append(entry)
        return Stack(tuple(resolved), tuple(key), tuple(entries))

    def _entry_files(self, entry: RegistryEntry) -> Any:
        """``entry``'s adapter (``AdapterFiles``), from the entry LRU or read now: each of its two
        files read once and checked against the sha256 the index records (the bytes parsed are the
        bytes checked), then its base fingerprint against the app's. Under the lock."""
        key = _entry_key(entry)
        files = self._files.get(key)
        if files is not None:
            self._files.move_to_end(key)
            self._entry_hits += 1
            return files
        from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, adapter_from_bytes, check_fingerprint

        self._entry_misses += 1
        config, weights = (self.registry.read_file(entry, fname) for fname in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))
        files = adapter_from_bytes(config, weights, folder=self.registry.folder(entry))
        check_fingerprint(files, self.fingerprint)
        self._files[key] = files
        while len(self._files) > ENTRY_CACHE_SIZE:
            self._files.popitem(last=False)
        return files

    def _load(self, stack: Stack) -> str:
        """The model's adapter for ``stack``, loaded (and cached) if needed. Under the lock."""
        cached = self._cache.get(stack.key)
        if cached is not None:
            self._cache.move_to_end(stack.key)
            self._hits += 1
            return cached.name
        from mnist_peft.merging.combine import combine_adapters

        self._misses += 1
        entries = stack.entries or tuple(self.registry.get(ref) for ref, _ in stack.items)
        files = [self._entry_files(entry) for entry in entries]
        combined = combine_adapters(files, [w for _, w in stack.items], method="cat")  # exact: sum_i w_i s_i B_i A_i
        self._counter += 1
        name = f"stack-{self._counter}"
        self.model.add_adapter(name, combined.config, state_dict=combined.state_dict, source=stack.label)
        for p in self.model.parameters():
            p.requires_grad_(False)
        nbytes = sum(t.numel() * t.element_size() for t in combined.state_dict.values())
        self._cache[stack.key] = _Cached(name, nbytes)
        return name

    def _evict(self, keep: frozenset[tuple] | set[tuple] = frozenset()) -> None:
        """Drop least recently used stacks (not those in ``keep``) until the budget holds."""
        total = sum(c.nbytes for c in self._cache.values())
        for key in list(self._cache):
            if total <= self.cache_bytes:
                break
            if key in keep:
                continue
            cached = self._cache.pop(key)
            self.model.delete_adapter(cached.name)
            total -= cached.nbytes
            self._evictions += 1

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(
                entries=len(self._cache),
                nbytes=sum(c.nbytes for c in self._cache.values()),
                budget=self.cache_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entry_files=len(self._files),
                entry_hits=self._entry_hits,
                entry_misses=self._entry_misses,
            )

    def cached(self) -> list[tuple[tuple, str]]:
        """The cached stacks, least recently used first: ``(Stack.key, adapter name in the model)``."""
        with self._lock:
            return [(key, c.name) for key, c in self._cache.items()]

    def resize_cache(self, cache_bytes: int) -> None:
        """Change the cache's byte budget; least recently used stacks go until it holds."""
        if cache_bytes < 0:
            raise InvalidArgumentError(f"cache_bytes must be >= 0, got {cache_bytes}")
        with self._lock:
            self.cache_bytes = cache_bytes
            self._evict()

    # -- forward
    def predict_batch(self, x: torch.Tensor, stacks: Sequence[Stack | None]) -> torch.Tensor:
        """Logits (N, 10) of ``x`` (N, 784, normalised), row i through ``stacks[i]`` (``None``: the base),
        in one mixed-adapter forward.

        Raises:
            AdapterStateError: ``stacks`` does not match ``x``'s rows.
            IntegrityError, FingerprintMismatchError, and the adapter load errors: a stack's files.
        """
        with self._lock:
            needed = {s.key for s in stacks if s is not None}
            self._evict(keep=needed)  # room first, keeping what this batch uses
            try:
                names = [None if s is None else self._load(s) for s in stacks]
                return mixed_forward(self.model, x, names)
            finally:
                self._evict()

    def test_logits(self) -> torch.Tensor:
        """The base's logits on the 10,000 MNIST test images (computed once)."""
        with self._lock:
            if self._test_logits is None:
                x = load_mnist(train=False, data_dir=self.data_dir).x
                self._test_logits = torch.cat(
                    [mixed_forward(self.model, x[i : i + 2000], [None] * len(x[i : i + 2000])) for i in range(0, len(x), 2000)]
                )
            return self._test_logits

    def predict_pairs(
        self, xs: Sequence[torch.Tensor], stacks: Sequence[Stack | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | Exception]:
        """Per request ``i``, the logits (10,) of ``xs[i]`` (1, 784) through the base and through
        ``stacks[i]`` (the base again for ``None``), all in one mixed forward.

        A request whose stack cannot be loaded (a file altered since it was listed, another base's
        adapter) gets that error in its place; the others of the batch still get their answer.
        """
        rows, row_stacks, where = [], [], []
        for x, stack in zip(xs, stacks, strict=True):
            where.append((len(rows), len(rows) if stack is None else len(rows) + 1))
            rows.append(x)
            row_stacks.append(None)
            if stack is not None:
                rows.append(x)
                row_stacks.append(stack)
        if not rows:
            return []
        try:
            logits = self.predict_batch(torch.cat(rows), row_stacks)
        except Exception as exc:  # a stack's files are outside input too: whatever they raise fails their requests only
            if len(xs) == 1:
                return [exc]
            return [self.predict_pairs([x], [s])[0] for x, s in zip(xs, stacks, strict=True)]  # find the bad one(s)
        return [(logits[b], logits[s]) for b, s in where]

    def answer(self, images: Sequence[object], specs: Sequence[str | None]) -> list[dict[str, Any]]:
        """What ``/predict`` returns: per request, the base's and the stack's label, probabilities
        and logits (``"stack": None`` for an empty spec).

        Requests are checked one by one; a bad one (any image or spec from outside: wrong types,
        huge numbers, unknown entries) gets ``{"error": "..."}`` and does not fail the others of its
        batch, which all run in one forward. Messages name registry files relative to the registry.
        """
        if len(images) != len(specs):
            raise InvalidArgumentError(f"got {len(images)} images and {len(specs)} adapter specs; give one spec per image")
        answers: list[dict[str, Any]] = [{} for _ in images]
        good: list[tuple[int, torch.Tensor, Stack | None]] = []
        resolved: dict[str, Stack | None] = {}  # one registry lookup per distinct spec in the batch
        for i, (image, spec) in enumerate(zip(images, specs, strict=True)):
            try:
                if isinstance(image, Refused):
                    raise image.error
                if isinstance(spec, Refused):
                    raise spec.error
                x = image_to_input(image)
                key = spec if isinstance(spec, str) or spec is None else repr(spec)
                if key not in resolved:
                    resolved[key] = self.resolve(spec)
                good.append((i, x, resolved[key]))
            except Exception as exc:  # whatever a hostile request raises is its own answer, not its batch's
                answers[i] = {"error": self.public_message(exc)}
        outcomes = self.predict_pairs([x for _, x, _ in good], [s for _, _, s in good])
        for (i, _, stack), outcome in zip(good, outcomes, strict=True):
            if isinstance(outcome, Exception):
                answers[i] = {"error": self.public_message(outcome)}
                continue
            base, with_stack = outcome
            answers[i] = {
                "base": _result(base),
                "stack": None if stack is None else {**_result(with_stack), "adapters": stack.to_list()},
            }
        return answers

    def public_message(self, exc: BaseException) -> str:
        """``exc`` as one line for a web client: the registry's folder written ``<registry>``
        (a browser has no use for the server's paths)."""
        return _public_message(exc, self.registry.root)


def _entry_key(entry: RegistryEntry) -> tuple[str, str, str]:
    """What an entry's adapter depends on: ``name@version`` and the sha256 the index records for
    its weights and its config (an entry the index lists without them cannot load, and says so)."""
    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    return tuple(  # type: ignore[return-value]
        [entry.ref, *(str(entry.files.get(fname, {}).get("sha256", "")) for fname in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME))]
    )


@dataclass(frozen=True)
class Refused:
    """An input gradio could not take in for one request of a batch (a file that was not uploaded, a
    malformed value): that request is answered with ``error``, its batch-mates as usual."""

    error: Exception


def _result(logits: torch.Tensor) -> dict[str, Any]:
    return {"label": int(logits.argmax()), "probabilities": logits.softmax(0).tolist(), "logits": logits.tolist()}


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())


def _public_message(exc: BaseException, root: Path) -> str:
    """:func:`_message` with ``root`` (as given, absolute, resolved) replaced by ``<registry>``
    wherever it starts a path."""
    import re

    text = _message(exc)
    forms = {str(root), str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        forms.add(str(root.resolve()))
    for form in sorted(forms, key=len, reverse=True):  # the longest first: an absolute root contains the relative one
        if form not in ("", ".", "/"):
            text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?=/|'|\"|\s|$)", "<registry>", text)
    return text


# ----------------------------------------------------------------------------- page handlers
@dataclass
class DrawResult:
    """What the Draw tab shows for one drawing."""

    image: Any  # the (28, 28) uint8 input, shown 8x (224, 224); None when there is no prediction
    base: dict[str, float] | None  # gr.Label value: digit -> probability
    stack: dict[str, float] | None
    message: str  # the predicted digits, or what went wrong and what to do
    table: list[list[object]] | None  # digit, base p, stack p (4 significant digits), base logit, stack logit (4 places)


@dataclass
class UiHandlers:
    """The app's handlers as plain functions of plain values (what the page's events call).

    Batched handlers take one list per input and return one list per output, as Gradio's
    ``batch=True`` requires.
    """

    predictor: Predictor
    _heatmap: dict[tuple, tuple[Any, list[list[object]]]] = field(default_factory=dict, repr=False)

    @property
    def registry(self) -> AdapterRegistry:
        return self.predictor.registry

    def adapter_choices(self) -> list[str]:
        """Every adapter entry as ``name@version`` (all versions), for the pickers."""
        return [e.ref for e in self.registry.list() if e.kind == "lora"]

    # -- Draw
    def draw(self, drawings: Sequence[object], *slots: Sequence[object]) -> tuple[list, ...]:
        """Batched: drawings and ``SLOTS`` (adapter, weight) pairs of lists -> five lists of outputs
        (the 28 x 28 image, the base's and the stack's probabilities, the message, the table).

        A drawing is an image or sketchpad value (see :func:`drawing_to_ink`) or an
        :class:`EditorPayload` (the page's value before decoding, decoded here one request at a
        time); an adapter is a ``name@version`` (any registry entry: the pickers' choices may be
        older than the registry) or ``"(none)"``, a weight a number in [-2, 2]. Each request is
        checked on its own: a bad one gets its message and the others of its batch their answers.
        """
        results: list[DrawResult] = []
        good: list[tuple[int, torch.Tensor, torch.Tensor, Stack | None]] = []
        for i, drawing in enumerate(drawings):
            results.append(DrawResult(None, None, None, "", None))
            try:
                for value in (drawing, *(slot[i] for slot in slots)):
                    if isinstance(value, Refused):
                        raise value.error
                image, x = preprocess_drawing(drawing.decode() if isinstance(drawing, EditorPayload) else drawing)
                items = []
                for s in range(SLOTS):
                    ref, weight = slots[2 * s][i], slots[2 * s + 1][i]
                    if ref is not None and ref != "" and ref != NONE_CHOICE:
                        items.append((ref, _slider_weight(weight, s + 1)))
                good.append((i, image, x, self.predictor.resolve(items)))
            except Exception as exc:  # whatever a hostile request raises is its own answer, not its batch's
                results[i].message = self.predictor.public_message(exc)
        outcomes = self.predictor.predict_pairs([x for _, _, x, _ in good], [s for *_, s in good])
        for (i, image, _, stack), outcome in zip(good, outcomes, strict=True):
            if isinstance(outcome, Exception):
                results[i].message = self.predictor.public_message(outcome)
                continue
            base, with_stack = outcome
            pb, ps = base.softmax(0), with_stack.softmax(0)
            name = "no adapter" if stack is None else stack.label
            results[i] = DrawResult(
                image=_enlarge((image * 255).round().to(torch.uint8)).numpy(),
                base={str(d): float(pb[d]) for d in range(10)},
                stack={str(d): float(ps[d]) for d in range(10)},
                message=f"base: {int(base.argmax())} · {name}: {int(with_stack.argmax())}",
                table=[
                    [d, _significant(pb[d]), _significant(ps[d]), round(float(base[d]), 4), round(float(with_stack[d]), 4)]
                    for d in range(10)
                ],
            )
        return (
            [r.image for r in results],
            [r.base for r in results],
            [r.stack for r in results],
            [r.message for r in results],
            [r.table for r in results],
        )

    def api(self, images: list[list[float]], adapters: list[str]) -> tuple[list[dict[str, Any]]]:
        """Batched ``/predict``: see :meth:`Predictor.answer`."""
        return (self.predictor.answer(images, adapters),)

    # -- Test images
    def wrong_images(self, digit: object) -> tuple[list[tuple[Any, str]], list[list[object]], list[int]]:
        """The test images of ``digit`` the base gets wrong: gallery items, a table (test index, base
        says, p of the true digit, the adapters that fix it), and the test indices in order."""
        d = _digit(digit)
        test = load_mnist(train=False, data_dir=self.predictor.data_dir)
        logits = self.predictor.test_logits()
        wrong = ((test.y == d) & (logits.argmax(1) != d)).nonzero()[:, 0].tolist()
        fixes = self._fixes(wrong, d)
        gallery, table = [], []
        for idx in wrong:
            said = int(logits[idx].argmax())
            fixed_by = [ref for ref, ok in fixes.get(idx, []) if ok]
            gallery.append((_test_image(test.x[idx]), f"#{idx}: base says {said}"))
            table.append([idx, said, round(float(logits[idx].softmax(0)[d]), 4), ", ".join(fixed_by) or "none"])
        return gallery, table, wrong

    def image_detail(self, digit: object, index: int) -> list[list[object]]:
        """One test image: what each registry adapter predicts for it, p of the true digit, fixed or not."""
        d = _digit(digit)
        rows = []
        for ref, said, p, ok in self._per_adapter([index], d).get(index, []):
            rows.append([ref, said, round(p, 4), "fixes it" if ok else "-"])
        return rows

    def _fixes(self, indices: list[int], digit: int) -> dict[int, list[tuple[str, bool]]]:
        return {i: [(ref, ok) for ref, _, _, ok in v] for i, v in self._per_adapter(indices, digit).items()}

    def _usable(self, entries: Sequence[RegistryEntry]) -> list[RegistryEntry]:
        """The adapter entries of ``entries`` that fit the app's base and verify (a bad file leaves
        its entry out of the test-image and heat-map tabs; the registry tab says what is wrong)."""
        fits = [e for e in entries if e.kind == "lora" and e.base_fingerprint in (None, self.predictor.fingerprint)]
        return [e for e in fits if _verify_status(self.registry, e) == "ok"]

    def _per_adapter(self, indices: list[int], digit: int) -> dict[int, list[tuple[str, int, float, bool]]]:
        """Each of ``indices`` through each usable adapter entry: one mixed forward."""
        if not indices:
            return {}
        test = load_mnist(train=False, data_dir=self.predictor.data_dir)
        entries = self._usable(self.registry.list())
        stacks = [self.predictor.resolve([(e.ref, 1.0)]) for e in entries]
        x = test.x[indices]
        logits = self.predictor.predict_batch(x.repeat(len(stacks), 1), [s for s in stacks for _ in indices])
        out: dict[int, list[tuple[str, int, float, bool]]] = {i: [] for i in indices}
        for a, entry in enumerate(entries):
            for k, idx in enumerate(indices):
                row = logits[a * len(indices) + k]
                said = int(row.argmax())
                out[idx].append((entry.ref, said, float(row.softmax(0)[digit]), said == digit))
        return out

    # -- Registry
    def registry_table(self) -> list[list[object]]:
        """One row per entry: ref, kind, digit, r, lora_alpha, fingerprint, fits the base, accuracy, created, verify."""
        rows = []
        for e in self.registry.list():
            status = _verify_status(self.registry, e)
            accuracy = e.metrics.get("accuracy") if isinstance(e.metrics, dict) else None
            fits = "-" if e.kind == "base" else ("yes" if e.base_fingerprint in (None, self.predictor.fingerprint) else "no")
            rows.append(
                [
                    e.ref,
                    e.kind,
                    "" if e.digit is None else e.digit,
                    "" if e.r is None else e.r,
                    "" if e.lora_alpha is None else e.lora_alpha,
                    (e.base_fingerprint or "")[:12],
                    fits,
                    "" if accuracy is None else accuracy,
                    e.created,
                    status,
                ]
            )
        return rows

    def heatmap(self) -> tuple[Any, list[list[object]]]:
        """The adapter x digit heat map of test error rates on the app's base: the latest version of
        each adapter entry that has a digit (left out if it does not verify or fits another base).
        Returns the picture (an RGB array, ``None`` without adapters) and the table of rates; cached
        while those entries stay the same."""
        latest: dict[str, RegistryEntry] = {}
        for e in self.registry.list():
            if e.kind == "lora" and e.digit is not None:
                latest[e.name] = e  # list() is sorted by version: the last one wins
        entries = sorted(self._usable(list(latest.values())), key=lambda e: (e.digit, e.name))
        stacks = [self.predictor.resolve([(e.ref, 1.0)]) for e in entries]
        key = tuple(s.key for s in stacks if s is not None)
        if key in self._heatmap:
            return self._heatmap[key]
        test = load_mnist(train=False, data_dir=self.predictor.data_dir)
        counts = torch.bincount(test.y, minlength=10).to(torch.float64)
        matrix, table = [], []
        for entry, stack in zip(entries, stacks, strict=True):
            chunks = [test.x[i : i + 2500] for i in range(0, len(test.y), 2500)]
            pred = torch.cat([self.predictor.predict_batch(chunk, [stack] * len(chunk)).argmax(1) for chunk in chunks])
            wrong = torch.bincount(test.y[pred != test.y], minlength=10).to(torch.float64)
            rates = (wrong / counts).tolist()
            matrix.append(rates)
            table.append([entry.ref, *(round(r, 4) for r in rates)])
        picture = None
        if matrix:
            from PIL import Image

            from mnist_peft.experiments.plots import plot_heatmap

            with tempfile.TemporaryDirectory(prefix="mnist-peft-ui-") as tmp:
                path = plot_heatmap(
                    matrix,
                    Path(tmp) / "heatmap.png",
                    row_labels=[e.ref for e in entries],
                    col_labels=[str(d) for d in range(10)],
                    title="Test error rate per digit (columns) for each adapter (rows)",
                )
                with Image.open(path) as image:
                    picture = np.asarray(image.convert("RGB"))
        self._heatmap[key] = (picture, table)
        return self._heatmap[key]


def _slider_weight(value: object, slot: int) -> float:
    """A picker's weight from the page (``None``: the slider's default, 1)."""
    if value is None:
        return 1.0
    low, high = WEIGHT_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails the range test
        raise InvalidArgumentError(f"weight {slot} must be a number in [{low:g}, {high:g}] (the slider's range), got {str(value)[:20]!r}")
    return float(value)


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


def _digit(value: object) -> int:
    try:
        d = int(str(value))
    except ValueError:
        raise InvalidArgumentError(f"digit must be 0..9, got {str(value)[:20]!r}") from None
    if not 0 <= d <= 9:
        raise InvalidArgumentError(f"digit must be 0..9, got {d}")
    return d


def _significant(p: torch.Tensor) -> float:
    """A probability to 4 significant digits: a small one (1.234e-08) moves visibly when an adapter is switched on."""
    return float(f"{float(p):.4g}")


def _enlarge(pixels: torch.Tensor) -> torch.Tensor:
    """(28, 28) -> (224, 224), each pixel an 8 x 8 block: ``big[::8, ::8]`` is the input again."""
    return pixels.repeat_interleave(DISPLAY_SCALE, 0).repeat_interleave(DISPLAY_SCALE, 1)


def _test_image(x: torch.Tensor) -> Any:
    """A normalised test row (784,) back to its (28, 28) uint8 image (exact: the bytes round-trip)."""
    return (x.reshape(SIDE, SIDE) * MNIST_STD + MNIST_MEAN).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def _verify_status(registry: AdapterRegistry, entry: RegistryEntry) -> str:
    from mnist_peft.errors import IntegrityError

    try:
        registry.verify_entry(entry)
    except IntegrityError as exc:
        return "BAD: " + _public_message(exc, registry.root)
    return "ok"


# ----------------------------------------------------------------------------- the Gradio app
def require_gradio() -> Any:
    """Import gradio (the ``[ui]`` extra) with its network features off, or say how to install it.

    Raises:
        MnistPeftError: gradio is not installed.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check (both call out)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as exc:
        raise MnistPeftError(f"the web app needs gradio ({exc}); install the ui extra: pip install -e '.[ui]'") from exc
    return gr


def check_serving_options(*, max_batch_size: int = DEFAULT_MAX_BATCH, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
    """Refuse a batch size below 1 or a negative cache budget (before a registry or a base is loaded).

    Raises:
        InvalidArgumentError: naming the bad value.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InvalidArgumentError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise InvalidArgumentError(f"cache_bytes must be an integer >= 0, got {cache_bytes!r}")


def build_app(handlers: UiHandlers, *, max_batch_size: int = DEFAULT_MAX_BATCH) -> Any:
    """The Gradio Blocks app over ``handlers`` (not launched). See :func:`launch`."""
    gr = require_gradio()
    check_serving_options(max_batch_size=max_batch_size)
    choices = [NONE_CHOICE, *handlers.adapter_choices()]
    model_queue = {"concurrency_limit": 1, "concurrency_id": "model"}  # one batch at a time: the model has one state
    public = _public_errors(handlers, gr)
    # delete_cache: the images the app renders for the page are temporary files; drop them after an hour.
    with _isolating_blocks(gr)(title="mnist-peft: LoRA adapters on MNIST", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# mnist-peft: LoRA adapters on MNIST\nBase `{handlers.predictor.base_ref}` "
            f"(fingerprint `{handlers.predictor.fingerprint[:12]}`) from the registry at `{handlers.registry.root}` (read-only)."
        )
        with gr.Tab("Draw"):
            with gr.Row():
                with gr.Column(scale=2):
                    sketch = gr.Sketchpad(
                        label="Draw a digit (pick the brush, then draw)",
                        elem_id=ELEM["sketchpad"],
                        canvas_size=(400, 400),
                        type="numpy",
                        image_mode="RGBA",
                        brush=gr.Brush(default_size=28, colors=["#000000"], color_mode="fixed"),
                    )
                    pickers = []
                    for s in range(1, SLOTS + 1):
                        with gr.Row():
                            pickers.append(
                                gr.Dropdown(choices, value=NONE_CHOICE, label=f"adapter {s} (name@version)", elem_id=f"adapter-{s}")
                            )
                            pickers.append(gr.Slider(*WEIGHT_RANGE, value=1.0, step=0.05, label=f"weight {s}", elem_id=f"weight-{s}"))
                    button = gr.Button("Predict", variant="primary", elem_id=ELEM["predict"])
                with gr.Column(scale=3):
                    message = gr.Markdown("Draw a digit, then press Predict.", label="prediction", elem_id=ELEM["prediction"])
                    preprocessed = gr.Image(
                        label="what the model sees: the 28 x 28 input, shown 8x", elem_id=ELEM["preprocessed"], format="png", height=240
                    )
                    with gr.Row():
                        base_label = gr.Label(label="base", num_top_classes=10, elem_id=ELEM["base_label"])
                        stack_label = gr.Label(label="with the adapters", num_top_classes=10, elem_id=ELEM["stack_label"])
                    table = gr.Dataframe(
                        headers=["digit", "p base", "p adapters", "logit base", "logit adapters"],
                        label="probabilities and logits",
                        elem_id=ELEM["probabilities"],
                        interactive=False,
                    )
            # preprocess=False: gradio would decode every drawing of a batch, and check every slider
            # and dropdown value, in one loop that fails the whole batch on one bad request (and
            # decodes before any size check); draw() decodes and checks each request on its own.
            button.click(
                _draw_function(handlers, sketch),
                [sketch, *pickers],
                [preprocessed, base_label, stack_label, message, table],
                batch=True,
                max_batch_size=max_batch_size,
                api_name="draw",
                preprocess=False,
                **model_queue,
            )
        with gr.Tab("Test images"):
            indices = gr.State([])
            digit = gr.Dropdown([str(d) for d in range(10)], value="9", label="digit", elem_id="test-digit")
            gallery = gr.Gallery(label="test images the base gets wrong", columns=8, height=240, format="png", elem_id="wrong-gallery")
            wrong_table = gr.Dataframe(
                headers=["test index", "base says", "p(true digit)", "fixed by"],
                label="the base's mistakes, and the adapters that fix each",
                interactive=False,
                elem_id="wrong-table",
            )
            detail = gr.Dataframe(
                headers=["adapter", "says", "p(true digit)", "fixed?"],
                label="the selected image, per adapter",
                interactive=False,
                elem_id="detail",
            )
            digit.change(public(handlers.wrong_images), [digit], [gallery, wrong_table, indices], api_name="wrong_images", **model_queue)

            def select(d, idx, evt):  # annotated below: gradio reads real types, and this module's are strings
                if not isinstance(evt.index, int) or not 0 <= evt.index < len(idx):
                    raise InvalidArgumentError("pick an image of the gallery shown")
                return handlers.image_detail(d, idx[evt.index])

            select.__annotations__ = {"d": str, "idx": list, "evt": gr.SelectData, "return": list}
            gallery.select(public(select), [digit, indices], [detail], api_visibility="private", **model_queue)
        with gr.Tab("Registry"):
            registry_table = gr.Dataframe(
                headers=["entry", "kind", "digit", "r", "lora_alpha", "fingerprint", "fits base", "accuracy", "created", "verify"],
                label="entries (every version), checked against their sha256 when shown",
                interactive=False,
                elem_id="registry-table",
            )
            verify = gr.Button("Verify again", elem_id="verify-button")
            heat_button = gr.Button("Compute the adapter x digit heat map (a few seconds)", elem_id="heatmap-button")
            heat_image = gr.Image(label="adapter x digit test error rate", format="png", elem_id="heatmap")
            heat_table = gr.Dataframe(
                headers=["adapter", *[str(d) for d in range(10)]],
                label="test error rate per digit",
                interactive=False,
                elem_id="heatmap-table",
            )
            verify.click(public(handlers.registry_table), None, [registry_table], api_name="registry")
            heat_button.click(public(lambda: handlers.heatmap()), None, [heat_image, heat_table], api_name="heatmap", **model_queue)
        dropdowns = pickers[0::2]

        def refresh_pickers() -> list[Any]:
            """The pickers' choices, read from the registry now: a version registered while the app runs can be picked."""
            return [gr.Dropdown(choices=[NONE_CHOICE, *handlers.adapter_choices()]) for _ in dropdowns]

        # Each page load, and each Verify press, reads the registry again for the pickers.
        verify.click(public(refresh_pickers), None, dropdowns, api_visibility="private")
        app.load(public(refresh_pickers), None, dropdowns, api_visibility="private")
        app.load(public(handlers.registry_table), None, [registry_table], api_visibility="private")
        app.load(public(handlers.wrong_images), [digit], [gallery, wrong_table, indices], api_visibility="private", **model_queue)
        gr.api(_api_function(handlers, batched=True), api_name=API_NAME, batch=True, max_batch_size=max_batch_size, **model_queue)
        gr.api(_api_function(handlers, batched=False), api_name=UNBATCHED_API_NAME, api_visibility="undocumented", **model_queue)
    app.queue(default_concurrency_limit=4, max_size=1024)  # a flood of requests is refused, not held in memory
    return app


_ISOLATING_BLOCKS: Any = None


def _isolating_blocks(gr: Any) -> Any:
    """``gr.Blocks`` whose batched events take each request's inputs in on their own.

    Gradio checks a batch's inputs in one loop before the function runs (files uploaded, values
    well-formed): one hostile request (a file path it never uploaded, a malformed sketchpad value)
    fails its whole batch. Here such a request's inputs become :class:`Refused` and the batched
    handlers answer it with the error, and its batch-mates as usual. (A request that sends fewer
    values than the event has inputs still fails its batch: gradio's queue zips a batch's values
    before any of this runs.)
    """
    global _ISOLATING_BLOCKS
    if _ISOLATING_BLOCKS is None:

        class IsolatingBlocks(gr.Blocks):
            async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):  # type: ignore[no-untyped-def]
                try:
                    return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
                except Exception as exc:
                    if not block_fn.batch:
                        raise
                    return [Refused(exc)] * len(block_fn.inputs)

        _ISOLATING_BLOCKS = IsolatingBlocks
    return _ISOLATING_BLOCKS


def _public_errors(handlers: UiHandlers, gr: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a page handler so its library errors reach the browser as ``gr.Error`` with the
    registry's folder written ``<registry>`` (see :meth:`Predictor.public_message`)."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # gradio reads the wrapped signature (its parameters, gr.SelectData)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except MnistPeftError as exc:
                raise gr.Error(handlers.predictor.public_message(exc)) from None

        return wrapper

    return wrap


def _draw_function(handlers: UiHandlers, sketch: Any) -> Callable[..., tuple[list, ...]]:
    """The Draw tab's batched event with named parameters (its API page shows them). The drawings
    arrive as the page sent them (``preprocess=False``) and go to :meth:`UiHandlers.draw` as
    :class:`EditorPayload`; the images the page sent ahead as blobs are taken out of the
    component's store here, for every request (as gradio's own preprocess does), decoded or not."""

    def draw(drawing, adapter_1, weight_1, adapter_2, weight_2, adapter_3, weight_3):
        payloads = []
        for value in drawing:
            blob_id = value.get("id") if isinstance(value, dict) else None
            blobs = sketch.blob_storage.pop(blob_id, None) if isinstance(blob_id, str) else None
            payloads.append(value if isinstance(value, Refused) else EditorPayload(value, blobs))
        return handlers.draw(payloads, adapter_1, weight_1, adapter_2, weight_2, adapter_3, weight_3)

    assert SLOTS == 3, "draw() names three adapter slots"
    return draw


def _api_function(handlers: UiHandlers, *, batched: bool) -> Callable[..., Any]:
    """``/predict`` as gradio sees it: its API page and ``gradio_client`` show one request's types
    (an image, a spec, a dict back), whether the queue hands the function a batch or not."""
    if batched:

        def predict(image, adapters):
            return handlers.api(image, adapters)

    else:

        def predict(image, adapters):
            return handlers.predictor.answer([image], [adapters])[0]

    predict.__doc__ = (
        "Classify one MNIST-style image through the base and through a weighted stack of registry adapters. "
        "image: 28 x 28 numbers in [0, 1] (ink 1.0 on black 0.0, centred as MNIST's are); adapters: e.g. "
        "'digit-9@1:1.0,digit-3:0.5' ('' or 'none': the base alone). Returns {'base': {'label', 'probabilities', 'logits'}, "
        "'stack': {..., 'adapters'} or None}, or {'error': message} for a bad request."
    )
    predict.__annotations__ = {"image": list[list[float]], "adapters": str, "return": dict[str, Any]}
    return predict


@dataclass
class RunningApp:
    """A launched app: its URL and how to stop it."""

    app: Any
    url: str
    handlers: UiHandlers

    def close(self) -> None:
        self.app.close(verbose=False)


def launch(
    root: str | os.PathLike[str] | None = None,
    *,
    base: str = "base",
    host: str = "127.0.0.1",
    port: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    data_dir: str | None = None,
) -> RunningApp:
    """Open the registry at ``root`` (read-only), load its ``base`` and :func:`serve` the app.

    Raises:
        InvalidArgumentError: ``max_batch_size`` < 1 or ``cache_bytes`` < 0 (said before anything loads).
        MnistPeftError: gradio is not installed; the registry or its base is missing or bad.
    """
    require_gradio()
    check_serving_options(max_batch_size=max_batch_size, cache_bytes=cache_bytes)
    registry = AdapterRegistry(root)
    registry.list()  # a missing or invalid registry is an error now, not on the first request
    handlers = UiHandlers(Predictor(registry, base, cache_bytes=cache_bytes, data_dir=data_dir))
    return serve(handlers, host=host, port=port, max_batch_size=max_batch_size)


def serve(handlers: UiHandlers, *, host: str = "127.0.0.1", port: int | None = None, max_batch_size: int = DEFAULT_MAX_BATCH) -> RunningApp:
    """Start the app over ``handlers`` on ``host:port`` in a background thread (``port=None``:
    gradio picks one from 7860 up); ``.close()`` stops it. No share link, no telemetry, no
    server-side rendering, no run history, no monitoring page: the app calls nothing outside this
    machine (and on 127.0.0.1, the default, nothing outside it can call the app)."""
    # After every event gradio's queue rebuilds a pandas summary of up to 10,000 past events for its
    # /monitoring page (a third of its CPU per request here); the page is off, so is the summary.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
    app = build_app(handlers, max_batch_size=max_batch_size)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        share=False,
        ssr_mode=False,
        quiet=True,
        show_error=True,
        run_history=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        max_file_size="10mb",  # a drawing upload is ~20 KB; a huge one is refused before it is decoded
        footer_links=["api", "settings"],
    )
    return RunningApp(app, f"http://{host}:{app.server_port}/", handlers)


@contextlib.contextmanager
def spawn_app(
    root: str | os.PathLike[str],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """``mnist-peft ui --root ROOT`` in a subprocess on 127.0.0.1 and a free port; yields its URL
    once it serves, and stops it afterwards (what the tests and ``mnist-peft bench`` measure: the
    real command, in a process of its own). Its output goes to ``log`` (default: a temporary file).

    Raises:
        MnistPeftError: it exited or did not serve within ``timeout`` seconds (with its output's tail).
    """
    import re
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port (another program could take it before the app does: then it exits, and we say so)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mnist-peft-ui-"))) / "server.log"
        log = Path(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mnist_peft", "ui", "--root", str(root), "--host", "127.0.0.1", "--port", str(port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})},
            )
        try:
            deadline = time.monotonic() + timeout
            while not (match := re.search(r"serving (http://127\.0\.0\.1:\d+/)", log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise MnistPeftError(f"mnist-peft ui did not start (exit code {proc.poll()}): {log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield match.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------------------- load testing
@dataclass
class LoadReport:
    """Latency and throughput of one load run."""

    requests: int
    clients: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def throughput(self) -> float:
        """Requests per second over the whole run."""
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """Latency (s) at quantile ``q`` in [0, 1] (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 2),
            "p50_ms": round(self.percentile(0.5) * 1e3, 1),
            "p99_ms": round(self.percentile(0.99) * 1e3, 1),
            "mean_ms": round(statistics.fmean(self.latencies) * 1e3, 1),
        }


def run_load(
    url: str,
    requests: Sequence[tuple[object, str]],
    *,
    clients: int = 20,
    api_name: str = "/" + API_NAME,
    timeout: float = 60.0,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Send ``requests`` (``(pixels, spec)`` pairs) to ``url`` from ``clients`` concurrent
    ``gradio_client`` clients (one thread each, request ``i`` from client ``i % clients``); returns
    the answers in request order and the timing. Bounded: every request waits at most ``timeout``
    seconds, and the run ends when each client has sent its share.

    Raises:
        TimeoutError: a request got no answer in ``timeout`` seconds.
    """
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    # gradio_client makes an httpx client per call, and each loads the CA bundle (~20 ms of CPU, twice a
    # request) even for plain http, where there is no TLS to verify: skipped there, kept for https.
    options = {"verbose": False, "download_files": False, "analytics_enabled": False, "ssl_verify": not url.startswith("http://")}
    answers: list[dict[str, Any]] = [{} for _ in requests]
    latencies: list[float] = [0.0] * len(requests)
    connections: list[Any] = []

    def work(c: int) -> None:
        for i in range(c, len(requests), clients):
            pixels, spec = requests[i]
            start = time.perf_counter()
            answers[i] = connections[c].submit(pixels, spec, api_name=api_name).result(timeout=timeout)
            latencies[i] = time.perf_counter() - start

    try:
        with ThreadPoolExecutor(clients) as pool:  # every client is made (or fails) before any is used
            made = [pool.submit(Client, url, **options) for _ in range(clients)]
        for future in made:  # keep each one made, so that the finally closes it even when another failed
            if future.exception() is None:
                connections.append(future.result())
        for future in made:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(work, c) for c in range(clients)]:
                future.result()
        seconds = time.perf_counter() - start
    finally:
        with ThreadPoolExecutor(clients) as pool:  # each close waits up to 1 s for its heartbeat thread: in parallel
            list(pool.map(lambda connection: connection.close(), connections))
    return answers, LoadReport(len(requests), clients, seconds, latencies)
