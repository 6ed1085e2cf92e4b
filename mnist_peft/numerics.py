"""The one finiteness gate: every door where numbers enter or leave the toolkit calls it.

Loading a base or an adapter, ``combine``'s weights and its result, ``merge()``, a fleet worker's
result and every answer of the web app pass their tensors (or plain numbers) through
:func:`require_finite` / :func:`require_finite_number`. One place decides what "finite" means and
how the refusal reads, so a door cannot check less than another.

Finite is not enough for an adapter that is applied to images: values of 1e19 are finite, yet the
outputs they produce overflow. :data:`MAX_ABS_OUTPUT` bounds what a model may answer on a probe
batch (see ``io.probe``); a float32 logit beyond it is useless anyway (softmax saturates at 100).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from mnist_peft.errors import InvalidArgumentError, NonFiniteError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "MAX_ABS_OUTPUT",
    "MAX_CONFIG_BYTES",
    "MAX_SEED",
    "MAX_WEIGHT",
    "PROBE_ROWS",
    "check_seed",
    "first_non_finite",
    "parse_json_config",
    "probe_batch",
    "require_bounded",
    "require_bounded_updates",
    "require_finite",
    "require_finite_number",
]

# Logits larger than this in magnitude mean an adapter (or base) whose outputs are not usable numbers:
# a trained MNIST model's logits stay within +-100; float32 overflows at 3.4e38.
MAX_ABS_OUTPUT = 1e6


def first_non_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or Inf, or ``None``.

    One sum per tensor first (a finite sum proves every value finite and is several times cheaper
    than ``isfinite``); only a non-finite sum (or a mere overflow of large finite values) is settled
    value by value.
    """
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.numel() == 0:
            continue
        with torch.no_grad():
            if math.isfinite(float(t.detach().sum())) or bool(torch.isfinite(t.detach()).all()):
                continue
        return name
    return None


def require_finite(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    what: str,
    fix: str,
    path: str | None = None,
) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor with a NaN or Inf.

    ``what`` says whose tensors these are ("the merged adapter", "base model 'x.safetensors'"),
    ``fix`` what to do about it; the message is ``"<tensor> of <what> holds NaN or Inf values: <fix>"``.
    """
    key = first_non_finite(tensors)
    if key is None:
        return
    raise NonFiniteError(f"tensor {key!r} of {what} holds NaN or Inf values: {fix}", key=key, path=path)


def require_finite_number(value: object, *, name: str, fix: str, max_abs: float | None = None) -> float:
    """``value`` as a float, refusing a non-number, NaN, Inf or (with ``max_abs``) a too-large one.

    Raises :class:`InvalidArgumentError` naming ``name`` (a flag or a field) and ``fix``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__}: {fix}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidArgumentError(f"{name} is too large: {fix}") from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be finite, got {number}: {fix}")
    if max_abs is not None and abs(number) > max_abs:
        raise InvalidArgumentError(f"{name} must be within +-{max_abs:g}, got {number:g}: {fix}")
    return number


# ----------------------------------------------------------------------------- the probe of a low-rank update
PROBE_ROWS = 8
"""Rows of the fixed probe batch each LoRA layer's update is applied to."""


@functools.lru_cache(maxsize=32)
def probe_batch(in_features: int) -> np.ndarray:
    """The fixed probe batch of a layer with ``in_features`` inputs: (PROBE_ROWS, in_features) float64,
    each row of unit RMS (seeded: the same on every machine and run). Read-only (it is shared)."""
    import numpy as np

    x = np.random.default_rng(20221).standard_normal((PROBE_ROWS, in_features))
    x *= math.sqrt(in_features) / np.linalg.norm(x, axis=1, keepdims=True)
    x.setflags(write=False)
    return x


def require_bounded_updates(
    layers: Iterable[tuple[str, np.ndarray, np.ndarray, float]], *, what: str, fix: str, path: str | None = None
) -> None:
    """Refuse an adapter whose update of some layer, on the fixed probe batch, is not finite or exceeds
    :data:`MAX_ABS_OUTPUT` in magnitude (:class:`NonFiniteError` naming the layer).

    ``layers`` holds ``(layer name, A (r, in), B (out, r), scaling)`` with A and B as float64 numpy
    arrays; ``y = scaling * (x A^T) B^T`` is computed in float64 for the unit-RMS probe rows ``x``
    (:func:`probe_batch`), so values a float32 model would turn into Inf are seen as what they are.
    Finite values of 1e19 pass a finiteness check, yet give outputs of 1e38: this catches them, at
    a cost of two skinny products per layer (no dense (out, in) delta is formed). Pairs of the wrong
    shape are skipped: the structure is checked elsewhere.
    """
    import numpy as np

    for name, A, B, scaling in layers:
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or not A.size or not B.size:
            continue
        with np.errstate(all="ignore"):
            y = (probe_batch(A.shape[1]) @ A.T) @ B.T * scaling
            peak = float(np.max(np.abs(y)))
        if not peak <= MAX_ABS_OUTPUT:  # NaN fails this comparison too
            shown = "NaN or Inf" if not math.isfinite(peak) else f"|y| = {peak:.3g}"
            raise NonFiniteError(
                f"layer {name!r} of {what} gives {shown} on the probe batch (unit-RMS inputs; limit {MAX_ABS_OUTPUT:g}): {fix}",
                key=name,
                path=path,
            )


def require_bounded(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    what: str,
    fix: str,
    max_abs: float = MAX_ABS_OUTPUT,
) -> None:
    """:func:`require_finite`, and every value within ``+-max_abs`` (default :data:`MAX_ABS_OUTPUT`):
    what a model's answer must be to be told (a web answer never carries NaN, Inf or 1e30).

    Raises:
        NonFiniteError: ``"tensor <k> of <what> holds NaN or Inf values: <fix>"``, or
            ``"... holds values beyond +-<max_abs> (<peak>): <fix>"``.
    """
    import torch

    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    require_finite(items, what=what, fix=fix)
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            peak = float(t.detach().abs().max())
            if peak > max_abs:
                raise NonFiniteError(f"tensor {name!r} of {what} holds values beyond +-{max_abs:g} ({peak:.3g}): {fix}", key=name)


# ----------------------------------------------------------------------------- bounds on numbers given by a user
MAX_WEIGHT = 1e4
"""The largest weight (in magnitude) an adapter may be given, in a combination (``combine --weight``)
or an active stack (``eval``/``merge --weight``): beyond it a delta is scaled past anything a model
can use (the outputs are checked too). One bound for every door that takes a weight."""
MAX_SEED = 2**64 - 1
"""A seed seeds a ``torch.Generator`` (or ``torch.manual_seed``), which takes an unsigned 64-bit integer."""


def check_seed(seed: object, *, name: str = "seed", error: type[ValueError] = InvalidArgumentError) -> int:
    """``seed`` as an int in ``[0, MAX_SEED]`` (what ``torch.Generator.manual_seed`` takes), else
    ``error`` (a :class:`ValueError` subclass of the caller's layer) naming ``name`` and the range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise error(f"{name} must be an integer from 0 to 2**64-1 ({MAX_SEED}), got {str(seed)[:40]}")
    return seed


# ----------------------------------------------------------------------------- JSON configs read from outside
MAX_CONFIG_BYTES = 1 << 16
"""The largest ``adapter_config.json`` / ``config.json`` read (64 KiB): peft's own configs are about
1 KB. Checked before parsing, so a 150 MB file costs one ``stat``-sized read, not seconds and GBs."""


def parse_json_config(raw: bytes | str, *, path: str, fix: str, max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """The JSON value in ``raw`` (a config file's bytes), refused with one line naming ``path`` and
    ``fix`` when it is larger than ``max_bytes``, not JSON, or nested too deeply for the parser
    (:class:`~mnist_peft.errors.CorruptFileError`; never a ``RecursionError``)."""
    import json

    from mnist_peft.errors import CorruptFileError

    if len(raw) > max_bytes:
        raise CorruptFileError(f"{path!r} is {len(raw):,} bytes, above the {max_bytes:,} a config may have; {fix}", path=path)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path!r} is not valid JSON ({exc}); {fix}", path=path) from None
    except RecursionError:  # the C parser recurses per level: 100,000 '[' exhaust the stack
        raise CorruptFileError(f"{path!r} nests its JSON too deeply to be a config; {fix}", path=path) from None
