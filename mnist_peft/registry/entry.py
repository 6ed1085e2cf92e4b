"""A registry entry (:class:`RegistryEntry`) and :func:`entry_from_dict`, the one check of an entry
read from outside (a local index, a Hub repo's index)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from mnist_peft.errors import InvalidNameError, RegistryError
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.config import LoraConfig

from .names import MAX_VERSION, validate_file_name, validate_name

__all__ = ["ADAPTER_TYPES", "KINDS", "RegistryEntry", "entry_from_dict"]

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
KINDS = ("base", "lora", "stack")
"""``base`` (a base model), ``lora`` (an adapter, of the types :data:`ADAPTER_TYPES`), ``stack`` (a named
stack: ``stack.json``, a weighted list of pinned adapter entries, see :mod:`~mnist_peft.registry.stacks`)."""
ADAPTER_TYPES = (LoraConfig.adapter_type, DoraConfig.adapter_type)
"""The adapter types an adapter entry (kind ``lora``) may record, ``("lora", "dora")``: its config's
``adapter_type`` (``dora``: ``use_dora: true``, peft's DoRA). An entry written before the field existed
is a LoRA one. (Plain-Python configs: the registry stays torch-free.)"""


@dataclass
class RegistryEntry:
    """One version of a name: what the index records for it (its folder is always ``<name>/v<version>``)."""

    name: str
    version: int
    kind: str  # "base" | "lora" | "stack"
    path: str  # relative to the root, e.g. "digit-9/v1"
    files: dict[str, dict[str, object]]  # file name -> {"sha256": str, "size": int}
    base_fingerprint: str | None = None
    digit: int | None = None
    r: int | None = None
    lora_alpha: float | None = None
    created: str = ""
    metrics: dict[str, object] = field(default_factory=dict)
    source: dict[str, str] | None = None  # where a pulled entry came from: {"repo_id", "revision"}
    adapter_type: str | None = None
    """An adapter's type, read from its config when it was added: ``"lora"`` or ``"dora"`` (None for a base or a stack)."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_files(files: object, where: str) -> dict[str, dict[str, object]]:
    """An entry's ``files`` map (outside input): plain names, each with a sha256 and a size."""
    if not isinstance(files, dict) or not files:
        raise RegistryError(f"{where}: 'files' must be a non-empty object of file name -> {{sha256, size}}")
    for fname, meta in files.items():
        validate_file_name(fname)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not SHA256_PATTERN.fullmatch(meta["sha256"]):
            raise RegistryError(f"{where}: file {fname!r} lacks a valid sha256")
        size = meta.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 50:
            raise RegistryError(f"{where}: file {fname!r} has an invalid size {size!r}")
    return files


def entry_from_dict(data: object, *, where: str, path: str | None = None) -> RegistryEntry:
    """A :class:`RegistryEntry` from index content (outside input), every field checked.

    ``path``: the folder the entry must name (the registry's ``<name>/v<version>``); ``None`` takes
    the derived one, whatever the data says (a remote index's paths mean the repo's layout).

    Raises:
        RegistryError: a field is missing, of the wrong type, or names a path it must not.
    """
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: an entry must be a JSON object, got {type(data).__name__}")
    name = data.get("name")
    try:
        validate_name(name)  # type: ignore[arg-type]
    except InvalidNameError as exc:
        raise RegistryError(f"{where}: {exc}") from exc
    where = f"{where} entry {name!r}"
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise RegistryError(f"{where}: version must be an integer from 1 to {MAX_VERSION:,}, got {str(version)[:40]!r}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise RegistryError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    files = _check_files(data.get("files"), where)
    expected = f"{name}/v{version}"
    if path is not None and data.get("path") != path:
        raise RegistryError(f"{where}: path {data.get('path')!r} is not {path!r}; the index was edited or is corrupt: restore it")
    digit, r, alpha = data.get("digit"), data.get("r"), data.get("lora_alpha")
    if digit is not None and (isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9):
        raise RegistryError(f"{where}: digit must be 0..9 or null, got {digit!r}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise RegistryError(f"{where}: r must be a positive integer or null, got {r!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise RegistryError(f"{where}: lora_alpha must be a number or null, got {alpha!r}")
    fingerprint = data.get("base_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not SHA256_PATTERN.fullmatch(fingerprint)):
        raise RegistryError(f"{where}: base_fingerprint must be a sha256 hex string or null")
    metrics, created, source = data.get("metrics") or {}, data.get("created") or "", data.get("source")
    if not isinstance(metrics, dict) or not isinstance(created, str):
        raise RegistryError(f"{where}: metrics must be an object and created a string")
    if source is not None and (
        not isinstance(source, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in source.items())
    ):
        raise RegistryError(f"{where}: source must be an object of strings or null")
    adapter_type = _adapter_type(data.get("adapter_type"), kind, where)
    return RegistryEntry(
        name=name,
        version=version,
        kind=kind,
        path=expected,
        files=files,
        base_fingerprint=fingerprint,  # type: ignore[arg-type]
        digit=digit,
        r=r,
        lora_alpha=alpha,
        created=created,
        metrics=metrics,
        source=source,
        adapter_type=adapter_type,
    )


def _adapter_type(value: object, kind: str, where: str) -> str | None:
    """An entry's ``adapter_type``: one of :data:`ADAPTER_TYPES` for an adapter (missing: ``"lora"``, an
    entry written before the field), null for a base or a stack (its members record theirs)."""
    if kind in ("base", "stack"):
        if value is not None:
            raise RegistryError(f"{where}: a {kind} has no adapter_type, got {str(value)[:40]!r}")
        return None
    if value is None:
        return "lora"
    if value not in ADAPTER_TYPES:
        raise RegistryError(f"{where}: adapter_type must be one of {ADAPTER_TYPES}, got {str(value)[:40]!r}")
    return value  # type: ignore[return-value]
