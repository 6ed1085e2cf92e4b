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

from torch import nn

from mnist_peft.errors import AmbiguousReferenceError, IntegrityError, InvalidNameError, ModelNotFoundError, RegistryError

from .adapter_registry import AdapterRegistry
from .names import parse_ref

__all__ = ["registry_folder", "resolve_adapter", "resolve_base"]


def registry_folder(ref: str, registry: AdapterRegistry, kind: str) -> Path | None:
    """The verified folder of registry entry ``ref`` of ``kind`` ("base" or "lora"), or None if there is none.

    Raises:
        RegistryError: the entry exists but is of the other kind.
        IntegrityError: a file of the entry is missing or altered.
    """
    try:
        parse_ref(ref)
    except InvalidNameError:
        return None
    if ref not in registry:
        name, version = parse_ref(ref)
        if version is not None and name in registry:
            registry.get(ref)  # raises, naming the versions there are: a missing version is no folder question
        return None
    entry = registry.get(ref)
    if entry.kind != kind:
        raise RegistryError(f"registry entry {entry.ref!r} is a {entry.kind}, not a {kind}; pass a {kind} entry")
    return registry.path(ref)


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
            f"adapter {ref!r} is neither a folder nor an entry of the registry at {str(registry.root)!r} (see `mnist-peft registry list`)",
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

    _refuse_ambiguous(ref, registry)
    if not Path(ref).exists():
        folder = registry_folder(ref, registry, "base")
        if folder is not None:
            model = load_base(folder)
            entry = registry.get(ref)
            if entry.base_fingerprint and base_fingerprint(model) != entry.base_fingerprint:
                raise IntegrityError(f"base {entry.ref!r} does not have the fingerprint the registry recorded", path=folder)
            return model
        if "/" not in ref:  # not a folder, not in the registry, and not owner/name: don't ask the Hub
            raise ModelNotFoundError(
                f"base {ref!r} is neither a folder, nor an entry of the registry at {str(registry.root)!r}, nor a Hub "
                "repo id (owner/name); see `mnist-peft registry list` or train one with `mnist-peft train-base`",
                path=ref,
            )
    return load_base(ref, revision=revision)
