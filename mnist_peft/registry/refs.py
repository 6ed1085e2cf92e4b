"""One way to name a base or an adapter: the resolution the CLI, the demo and the app all use.

A reference is, in this order of checks:

- a registry entry, ``digit-9`` (latest version) or ``digit-9@2``: its files' sha256 (and, for a
  base, its fingerprint) are checked before it is used;
- a folder (``./digit-9``, ``out/base``);
- for a base only, a Hub repo id (``owner/name``).

A bare name that is both a folder in the working directory and a registry entry is refused as
ambiguous rather than silently resolved to either (write ``./name`` or ``name@N``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mnist_peft.errors import AmbiguousReferenceError, IntegrityError, InvalidNameError, ModelNotFoundError, RegistryError

from .adapter_registry import AdapterRegistry
from .names import parse_ref, shown, validate_name

if TYPE_CHECKING:  # torch is not imported here: the CLI checks names with this module before it imports torch
    from torch import nn

__all__ = ["check_base_ref", "registry_folder", "resolve_adapter", "resolve_base"]


def registry_folder(ref: str, registry: AdapterRegistry, kind: str) -> Path | None:
    """The verified folder of registry entry ``ref`` of ``kind`` ("base" or "lora"), or None if there is none.

    Raises:
        InvalidNameError: ``ref`` is a registry name with an invalid version (``digit-9@²``).
        RegistryError: the entry exists but is of the other kind.
        IntegrityError: a file of the entry is missing or altered.
    """
    try:
        validate_name(ref.partition("@")[0])
    except InvalidNameError:
        return None  # not a registry name (a path, a Hub id)
    name, version = parse_ref(ref)  # a registry name: a bad version is said as such, not taken for a folder
    if ref not in registry:
        if version is not None and name in registry:
            registry.get(ref)  # raises, naming the versions there are: a missing version is no folder question
        return None
    entry = registry.get(ref)
    if entry.kind == "stack" and kind == "lora":
        raise RegistryError(_stack_is_no_folder(registry, entry))
    if entry.kind != kind:
        raise RegistryError(f"registry entry {entry.ref!r} is a {entry.kind}, not a {kind}; pass a {kind} entry")
    return registry.path(ref)


def _stack_is_no_folder(registry: AdapterRegistry, entry) -> str:
    """What to say when a stack entry is passed where one adapter folder is loaded: serve it by name,
    or pass its members (with their weights) one by one."""
    from .stacks import read_stack_members

    try:
        members = read_stack_members(registry, entry)
    except (IntegrityError, RegistryError) as exc:
        return f"registry entry {entry.ref!r} is a stack entry, not an adapter, and it does not read: {exc}"
    flags = " ".join(f"--adapter {m.ref} --weight {m.weight:g}" for m in members)
    return (
        f"registry entry {entry.ref!r} is a stack entry (a weighted list of adapters), not one adapter folder: serve it by name "
        f"(mnist-peft serve, adapter spec {entry.name!r}), or pass each member: {flags}"
    )


def _names_hint(ref: str, registry: AdapterRegistry) -> str:
    """The registry's names (a few, the closest first named) for a reference that is none of them."""
    try:
        return registry.names_hint(ref.partition("@")[0])
    except RegistryError:  # no registry there: nothing to list
        return "see `mnist-peft registry list`"


def _refuse_ambiguous(ref: str, registry: AdapterRegistry) -> None:
    if "/" in ref or not Path(ref).exists():
        return
    try:
        in_registry = ref in registry
    except (InvalidNameError, RegistryError):
        return
    if in_registry:
        raise AmbiguousReferenceError(
            f"{ref!r} is both a folder here and an entry of the registry at {str(registry.root)!r}; "
            f"write ./{ref} for the folder, or {ref}@N for a version of the entry",
            ref=ref,
        )


def resolve_adapter(ref: str, registry: AdapterRegistry) -> Path:
    """The adapter folder ``ref`` names (a registry entry, every file's sha256 checked, or a folder).

    Raises:
        AmbiguousReferenceError, ModelNotFoundError, RegistryError, IntegrityError.
    """
    _refuse_ambiguous(ref, registry)
    if Path(ref).exists():
        return Path(ref)
    folder = registry_folder(ref, registry, "lora")
    if folder is None:
        raise ModelNotFoundError(
            f"adapter {shown(ref)} is neither a folder nor an entry of the registry at {str(registry.root)!r}; {_names_hint(ref, registry)}",
            path=ref,
        )
    return folder


def resolve_base(ref: str, registry: AdapterRegistry, *, revision: str | None = None) -> nn.Module:
    """The base model ``ref`` names, loaded (a registry entry, checked; a folder; or a Hub repo id,
    at ``revision`` if given).

    Raises:
        AmbiguousReferenceError, ModelNotFoundError, IntegrityError, and the load errors of
        :func:`mnist_peft.model.mlp.load_base`.
    """
    from mnist_peft.model.mlp import base_fingerprint, load_base

    folder = check_base_ref(ref, registry)
    if folder is None:  # a folder or a Hub repo id
        return load_base(ref, revision=revision)
    model = load_base(folder)
    entry = registry.get(ref)
    if entry.base_fingerprint and base_fingerprint(model) != entry.base_fingerprint:
        raise IntegrityError(f"base {entry.ref!r} does not have the fingerprint the registry recorded", path=folder)
    return model


def check_base_ref(ref: str, registry: AdapterRegistry) -> Path | None:
    """The name checks of :func:`resolve_base`, without loading anything (torch-free): the verified
    folder of registry entry ``ref``, or None for a folder or a Hub repo id (loaded as given).

    The CLI calls it before it imports torch, so that a mistyped name is said at once, in the words
    :func:`resolve_base` would use seconds later.

    Raises:
        AmbiguousReferenceError, ModelNotFoundError, InvalidNameError, RegistryError, IntegrityError.
    """
    _refuse_ambiguous(ref, registry)
    if Path(ref).exists():
        return None
    folder = registry_folder(ref, registry, "base")
    if folder is None and "/" not in ref:  # not a folder, not in the registry, and not owner/name: don't ask the Hub
        raise ModelNotFoundError(
            f"base {shown(ref)} is neither a folder, nor an entry of the registry at {str(registry.root)!r}, nor a Hub "
            f"repo id (owner/name); {_names_hint(ref, registry)}, or train one with `mnist-peft train-base`",
            path=ref,
        )
    return folder
