"""The merge-method table: name -> :class:`MergeMethod`, the one place a way of combining adapters is named.

``combine_adapters``, :func:`merge_deltas`, the CLI's ``combine --method`` choices and the merge
study all read it. A method is one of two kinds:

- ``"deltas"``: ``fn(deltas, weights, *, density, majority_sign, ties_mode, generator) -> delta``
  merges one layer's full updates ``delta_t = s_t B_t A_t`` (each (out, in)) into one (out, in);
  ``combine_adapters`` then factors it to rank r by truncated SVD. The task-vector merges.
- ``"factors"``: ``fn(A, B, r) -> (A_k, B_k, relative_error)`` works on one layer's concatenated
  factors A (R, in) and B (out, R), each adapter's ``w_i * scaling_i`` folded into B. ``cat``, ``svd``.

Adding a method is one call, e.g. ``register_merge_method("mean", fn)``; see
``tests/test_merge_method_seam.py`` for a toy one used through ``combine_adapters`` and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mnist_peft.errors import AdapterConfigError
from mnist_peft.numerics import MAX_SEED, MAX_WEIGHT, require_finite_number  # the bounds live below; handed on here
from mnist_peft.numerics import check_seed as _check_seed

from .svd import cat_method, svd_method
from .task_vectors import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

__all__ = [
    "MergeKind",
    "MergeMethod",
    "MERGE_METHODS",
    "register_merge_method",
    "get_merge_method",
    "merge_deltas",
    "method_names",
    "delta_method_names",
    "density_method_names",
    "METHODS",
    "DELTA_METHODS",
    "PEFT_NAMES",
    "MIN_DENSITY",
    "MAX_SEED",
    "MAX_WEIGHT",
    "check_density",
    "check_seed",
    "check_weights",
]

MIN_DENSITY = 1e-4
"""The smallest density accepted: DARE rescales the entries it keeps by ``1/density``, and a density of
1e-300 would scale them to Inf (a layer too small for a density keeps no entry: refused per layer)."""


def check_density(density: object) -> float:
    """``density`` as a float in ``[MIN_DENSITY, 1]``, else :class:`AdapterConfigError` naming the range."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not MIN_DENSITY <= density <= 1:
        raise AdapterConfigError(
            f"density must be in [{MIN_DENSITY:g}, 1] (the share of each delta's entries kept), got {str(density)[:40]}"
        )
    return float(density)


def check_seed(seed: object) -> int:
    """DARE's seed: :func:`mnist_peft.numerics.check_seed` (0 .. 2**64-1, the rule training's seed
    follows too), refused as an :class:`AdapterConfigError`."""
    return _check_seed(seed, error=AdapterConfigError)


def check_weights(weights: Sequence[object]) -> list[float]:
    """Each weight as a finite float within ``+-MAX_WEIGHT`` (the finiteness gate of :mod:`mnist_peft.numerics`;
    the bound a stack weight has too)."""
    fix = f"give each adapter a finite weight within +-{MAX_WEIGHT:g} (--weight)"
    return [require_finite_number(w, name=f"weight {i + 1}", fix=fix, max_abs=MAX_WEIGHT) for i, w in enumerate(weights)]


MergeKind = Literal["deltas", "factors"]


@dataclass(frozen=True)
class MergeMethod:
    """One entry of the table."""

    name: str
    fn: Callable[..., Any]
    """See the module docstring for the signature each ``kind`` calls it with."""
    kind: MergeKind = "deltas"
    needs_density: bool = False
    """Whether it takes ``density`` (and then requires it): the trimming and dropping merges."""
    peft_name: str | None = None
    """peft's ``combination_type`` for the same definition (e.g. ``ties_svd``), accepted as another name."""


MERGE_METHODS: dict[str, MergeMethod] = {}  # in registration order: the order every listing shows


def register_merge_method(
    name: str, fn: Callable[..., Any], *, kind: MergeKind = "deltas", needs_density: bool = False, peft_name: str | None = None
) -> MergeMethod:
    """Add a merge method to the table under ``name`` (and ``peft_name``, if given); returns its entry.

    Raises:
        AdapterConfigError: the name (or peft name) is taken, or ``kind`` is not ``"deltas"`` or ``"factors"``.

    Example:
        >>> register_merge_method("first_only", lambda deltas, weights, **options: weights[0] * deltas[0])
    """
    if kind not in ("deltas", "factors"):
        raise AdapterConfigError(f"a merge method's kind is 'deltas' or 'factors', got {kind!r}")
    taken = set(method_names())
    for new in (name, peft_name):
        if new is not None and new in taken:
            raise AdapterConfigError(f"a merge method named {new!r} is already registered; pick another name")
        taken.add(new)  # type: ignore[arg-type]  # (a peft name equal to the method's own is refused too)
    entry = MergeMethod(name=name, fn=fn, kind=kind, needs_density=needs_density, peft_name=peft_name)
    MERGE_METHODS[name] = entry
    return entry


def _by_peft_name() -> dict[str, str]:
    return {m.peft_name: m.name for m in MERGE_METHODS.values() if m.peft_name}


def method_names() -> tuple[str, ...]:
    """Every accepted name: the methods in registration order, then peft's names for them."""
    return (*MERGE_METHODS, *_by_peft_name())


def delta_method_names() -> tuple[str, ...]:
    """The ``"deltas"`` methods (the task-vector merges), by their own names."""
    return tuple(n for n, m in MERGE_METHODS.items() if m.kind == "deltas")


def density_method_names() -> tuple[str, ...]:
    """The methods that take a density."""
    return tuple(n for n, m in MERGE_METHODS.items() if m.needs_density)


def get_merge_method(name: str) -> MergeMethod:
    """The entry for ``name`` or peft's name for it.

    Raises:
        AdapterConfigError: no such method (the message lists them).
    """
    entry = MERGE_METHODS.get(_by_peft_name().get(name, name))
    if entry is None:
        raise AdapterConfigError(f"unknown combination method {name!r}; use one of {', '.join(method_names())}")
    return entry


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    method: str,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One layer's merged update from the adapters' full updates ``delta_t`` by a ``"deltas"`` method
    (see :mod:`mnist_peft.merging.task_vectors`).

    Raises:
        AdapterConfigError: an unknown method, sign rule or TIES mode, or a density outside [MIN_DENSITY, 1].
    """
    method = _by_peft_name().get(method, method)
    entry = MERGE_METHODS.get(method)
    if entry is None or entry.kind != "deltas":
        raise AdapterConfigError(f"unknown merge method {method!r}; use one of {', '.join(delta_method_names())}")
    density = check_density(density)
    if ties_mode not in ("peft", "mergekit"):
        raise AdapterConfigError(f"ties_mode must be 'peft' or 'mergekit', got {ties_mode!r}")
    return entry.fn(deltas, weights, density=density, majority_sign=majority_sign, ties_mode=ties_mode, generator=generator)


class _NamesView(Sequence[str]):
    """A tuple-like view of the table's names that follows later registrations (``METHODS``, ``DELTA_METHODS``)."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names = names

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) and not isinstance(other, str) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())


class _PeftNamesView(Mapping[str, str]):
    """peft's name -> ours, following later registrations (``PEFT_NAMES``)."""

    def __getitem__(self, name: str) -> str:
        return _by_peft_name()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_by_peft_name())

    def __len__(self) -> int:
        return len(_by_peft_name())

    def __repr__(self) -> str:
        return repr(_by_peft_name())


METHODS: Sequence[str] = _NamesView(method_names)
"""Every accepted name (compatibility view of the table)."""
DELTA_METHODS: Sequence[str] = _NamesView(delta_method_names)
"""The task-vector (``"deltas"``) methods (compatibility view of the table)."""
PEFT_NAMES: Mapping[str, str] = _PeftNamesView()
"""peft's ``combination_type`` names for ours (compatibility view of the table)."""

# The built-in methods, in the order every listing shows them.
register_merge_method("cat", cat_method, kind="factors")
register_merge_method("svd", svd_method, kind="factors")
register_merge_method("task_arithmetic", task_arithmetic)
register_merge_method("ties", ties, needs_density=True, peft_name="ties_svd")
register_merge_method("dare_linear", dare_linear, needs_density=True, peft_name="dare_linear_svd")
register_merge_method("dare_ties", dare_ties, needs_density=True, peft_name="dare_ties_svd")
register_merge_method("magnitude_prune", magnitude_prune, needs_density=True, peft_name="magnitude_prune_svd")
