"""Named stacks: a registry entry of kind ``stack`` that records a weighted list of pinned adapter
entries (``name@version``, the sha256 of its weights and config), in the manner of AdapterHub's
adapter setups. The serving engine expands a stack's name into its members; push and pull move its
``stack.json`` like any entry's files.

``stack.json`` (written by :func:`add_stack`, read back by :func:`read_stack_members`)::

    {"format": 1, "base_fingerprint": "<sha256 of the base every member fits>",
     "members": [{"adapter": "digit-9@1", "weight": 0.5, "sha256": "<adapter_model.safetensors sha256>",
                  "config_sha256": "<adapter_config.json sha256>", "adapter_type": "lora"}, ...]}

The file is outside input wherever it is read (a pulled repo, a hand-edited folder): its size is
capped and every field checked (:func:`parse_stack_file`). Torch-free; no serving import (the
engine imports this module, never the other way).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mnist_peft.errors import EntryNotFoundError, IntegrityError, MnistPeftError, RegistryError
from mnist_peft.fileio import read_regular_file

from .entry import ADAPTER_TYPES, SHA256_PATTERN, RegistryEntry
from .names import parse_ref, validate_name

__all__ = [
    "MAX_STACK",
    "MAX_STACK_FILE_BYTES",
    "MAX_WEIGHT",
    "STACK_FILE",
    "STACK_FILES",
    "STACK_FORMAT",
    "StackMember",
    "add_stack",
    "describe_stack_folder",
    "member_entries",
    "parse_stack_file",
    "read_stack_members",
    "refuse_pinned",
    "stacks_pinning",
    "verify_stack",
]

STACK_FILE = "stack.json"
STACK_FORMAT = 1
MAX_STACK = 10
"""Adapters in one stack: the serving engine's bound (``serving.stacks.MAX_STACK``), the same number."""
MAX_WEIGHT = 10.0
"""|weight| of a member: the serving engine's bound (``serving.stacks.MAX_WEIGHT``), the same number."""
MAX_STACK_FILE_BYTES = 64 << 10
"""The most a ``stack.json`` may hold: ten members take about 3 KB; read no further than this."""
STACK_FILES = frozenset({STACK_FILE, "README.md"})
"""The files a stack entry may hold: its ``stack.json`` and a model card."""
_WEIGHTS_NAME, _CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"  # io.adapters' names (that module needs torch)
_MAX_REF_CHARS = 200  # a name of 100 characters, '@', 10 digits: far below; checked before the pattern runs
_TOP_KEYS = frozenset({"format", "base_fingerprint", "members"})
_MEMBER_KEYS = frozenset({"adapter", "weight", "sha256", "config_sha256", "adapter_type"})
_REMAKE = "re-make it with `mnist-peft registry add-stack NAME SPEC`"


@dataclass(frozen=True)
class StackMember:
    """One adapter of a named stack, pinned: the version and the sha256 of the bytes it was made with."""

    ref: str
    """``name@version`` (always pinned)."""
    weight: float
    """Its weight in the stack, finite, in [-10, 10]."""
    weights_sha256: str
    """sha256 of its ``adapter_model.safetensors``."""
    config_sha256: str
    """sha256 of its ``adapter_config.json``."""
    adapter_type: str = "lora"
    """``"lora"`` or ``"dora"`` (a DoRA member is alone in its stack, at weight 1)."""


class _Registry(Protocol):
    """What these functions use of :class:`~mnist_peft.registry.adapter_registry.AdapterRegistry`
    (a protocol: the registry's modules import this one, not the other way)."""

    root: Path

    def get(self, ref: str) -> RegistryEntry: ...
    def read_file(self, entry: RegistryEntry, fname: str) -> bytes: ...
    def verify_entry(self, entry: RegistryEntry) -> None: ...
    def list(self) -> list[RegistryEntry]: ...
    def add_many(self, items: list) -> list[RegistryEntry]: ...


# -- reading (outside input)
def parse_stack_file(raw: bytes, *, where: str) -> tuple[str | None, list[StackMember]]:
    """The base fingerprint and members of a ``stack.json``, every field checked.

    Raises:
        RegistryError: over :data:`MAX_STACK_FILE_BYTES`, not JSON, another format, a missing or
            unknown key, a ref that is not a pinned ``name@version``, a weight that is not a finite
            number in [-10, 10], a sha256 that is not 64 hex digits, a name twice, more than
            :data:`MAX_STACK` members, or a DoRA member beside others or at a weight other than 1.
    """
    if len(raw) > MAX_STACK_FILE_BYTES:
        raise RegistryError(f"{where}: {STACK_FILE} is {len(raw):,} bytes, more than a stack needs ({MAX_STACK_FILE_BYTES:,}); {_REMAKE}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit number, deep nesting
        raise RegistryError(f"{where}: {STACK_FILE} is not JSON ({type(exc).__name__}); {_REMAKE}") from None
    if not isinstance(data, dict) or set(data) != _TOP_KEYS:
        keys = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise RegistryError(f"{where}: {STACK_FILE} must be an object with exactly the keys {sorted(_TOP_KEYS)}, got {keys}; {_REMAKE}")
    if type(data["format"]) is not int or data["format"] != STACK_FORMAT:
        raise RegistryError(
            f"{where}: {STACK_FILE} has format {str(data['format'])[:20]!r}; this mnist-peft reads format {STACK_FORMAT} "
            "(upgrade mnist-peft, or re-make the stack with this one)"
        )
    fingerprint = data["base_fingerprint"]
    if fingerprint is not None and not _is_sha256(fingerprint):
        raise RegistryError(f"{where}: base_fingerprint must be a sha256 (64 lowercase hex digits) or null; {_REMAKE}")
    items = data["members"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STACK:
        count = len(items) if isinstance(items, list) else type(items).__name__
        raise RegistryError(f"{where}: 'members' must be a list of 1 to {MAX_STACK} adapters, got {count}; {_REMAKE}")
    members = [_member(item, f"{where}: member {i + 1}") for i, item in enumerate(items)]
    _check_members(members, where)
    return fingerprint, members


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256_PATTERN.fullmatch(value) is not None


def _member(item: object, where: str) -> StackMember:
    """One member of ``stack.json``'s list, checked (see :func:`parse_stack_file`)."""
    if not isinstance(item, dict) or set(item) != _MEMBER_KEYS:
        got = sorted(map(str, item))[:8] if isinstance(item, dict) else type(item).__name__
        raise RegistryError(f"{where} must be an object with exactly the keys {sorted(_MEMBER_KEYS)}, got {got}; {_REMAKE}")
    ref = item["adapter"]
    if not isinstance(ref, str) or len(ref) > _MAX_REF_CHARS:
        raise RegistryError(f"{where}: 'adapter' must be a registry reference name@version, got {str(ref)[:40]!r}; {_REMAKE}")
    try:
        _, version = parse_ref(ref)
    except MnistPeftError as exc:
        raise RegistryError(f"{where}: {exc}") from None
    if version is None:
        raise RegistryError(f"{where}: {ref!r} is not pinned; a stack names each adapter as name@version; {_REMAKE}")
    weight = _weight(item["weight"], f"{where} ({ref})")
    for key in ("sha256", "config_sha256"):
        if not _is_sha256(item[key]):
            raise RegistryError(f"{where} ({ref}): {key!r} must be a sha256 (64 lowercase hex digits); {_REMAKE}")
    if item["adapter_type"] not in ADAPTER_TYPES:
        raise RegistryError(f"{where} ({ref}): adapter_type must be one of {ADAPTER_TYPES}, got {str(item['adapter_type'])[:40]!r}")
    return StackMember(ref, weight, item["sha256"], item["config_sha256"], item["adapter_type"])


def _weight(value: object, where: str) -> float:
    """A member's weight: an int or float (not a bool, not a string), finite, in [-MAX_WEIGHT, MAX_WEIGHT]."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        weight = float(value)
    except (TypeError, OverflowError):  # OverflowError: an int beyond float's range, such as 10**400
        raise RegistryError(f"{where}: the weight must be a number, got {type(value).__name__}") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise RegistryError(f"{where}: the weight must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight}")
    return weight


def _check_members(members: Sequence[StackMember], where: str) -> None:
    """No adapter named twice; a DoRA member only alone at weight 1 (``serving.stacks.check_servable``'s rule)."""
    names = [parse_ref(m.ref)[0] for m in members]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise RegistryError(f"{where}: {twice} named twice; give each adapter once (its weight scales it)")
    for m in members:
        if m.adapter_type != "lora" and (len(members) > 1 or m.weight != 1.0):
            raise RegistryError(
                f"{where}: {m.ref!r} is a {'DoRA' if m.adapter_type == 'dora' else m.adapter_type} adapter, which is served alone "
                "at weight 1 (its layers rescale each output row by m/||W + s B A||, so it combines with no other adapter and "
                f"scales by no weight): make a stack of {m.ref!r} alone at weight 1, or leave it out"
            )


def read_stack_members(registry: _Registry, entry: RegistryEntry) -> list[StackMember]:
    """The members of stack entry ``entry``, from its ``stack.json`` read through the registry's
    sha256-checked :meth:`~mnist_peft.registry.reads.RegistryReads.read_file`, size-capped and every
    field checked. The members' own entries are not looked up (see :func:`member_entries`).

    Example:
        >>> read_stack_members(reg, reg.get("mix"))
        [StackMember(ref='digit-9@1', weight=0.5, weights_sha256='...', config_sha256='...', adapter_type='lora')]

    Raises:
        RegistryError: ``entry`` is not a stack.
        IntegrityError: the file is missing, resized or altered, or its content is refused
            (:func:`parse_stack_file`), or its base fingerprint is not the one the index records.
    """
    if entry.kind != "stack":
        raise RegistryError(f"registry entry {entry.ref!r} is a {entry.kind}, not a stack; name a stack entry (kind 'stack')")
    path = registry.root / entry.path / STACK_FILE
    recorded = entry.files.get(STACK_FILE, {}).get("size")
    if isinstance(recorded, int) and recorded > MAX_STACK_FILE_BYTES:  # before reading: the index is outside input too
        raise IntegrityError(
            f"stack {entry.ref}: the index records a {STACK_FILE} of {recorded:,} bytes, more than a stack needs; {_REMAKE}", path=path
        )
    raw = registry.read_file(entry, STACK_FILE)
    try:
        fingerprint, members = parse_stack_file(raw, where=f"stack {entry.ref}")
    except RegistryError as exc:
        raise IntegrityError(str(exc), path=path) from None
    if fingerprint != entry.base_fingerprint:
        raise IntegrityError(
            f"stack {entry.ref}: {STACK_FILE} names base {str(fingerprint)[:12]}, the index records {str(entry.base_fingerprint)[:12]}; "
            f"the index or the file was edited: {_REMAKE}",
            path=path,
        )
    return members


def member_entries(registry: _Registry, entry: RegistryEntry) -> list[tuple[StackMember, RegistryEntry]]:
    """Each member of stack ``entry`` with its registry entry, checked to be the adapter the stack
    pinned: present, an adapter, the recorded sha256 of its weights and config, the stack's base.
    The members' files are not read here (:func:`verify_stack` does that).

    Raises:
        IntegrityError: naming the first member that is missing (with the command that gets it) or changed.
    """
    found, path = [], registry.root / entry.path / STACK_FILE
    for member in read_stack_members(registry, entry):
        try:
            adapter = registry.get(member.ref)
        except EntryNotFoundError:
            raise IntegrityError(
                f"stack {entry.ref}: member {member.ref} is not in the registry at {str(registry.root)!r}; {_fetch_hint(registry, entry, member)}",
                path=path,
            ) from None
        problem = _member_problem(member, adapter, entry)
        if problem:
            raise IntegrityError(
                f"stack {entry.ref}: member {member.ref} {problem}; it is not the adapter the stack was made with: {_REMAKE}", path=path
            )
        found.append((member, adapter))
    return found


def _member_problem(member: StackMember, adapter: RegistryEntry, stack: RegistryEntry) -> str | None:
    """What makes ``adapter`` other than the member the stack pinned (None: it is that member)."""
    if adapter.kind != "lora":
        return f"is a {adapter.kind}, not an adapter"
    for fname, pinned in ((_WEIGHTS_NAME, member.weights_sha256), (_CONFIG_NAME, member.config_sha256)):
        recorded = str(adapter.files.get(fname, {}).get("sha256"))
        if recorded != pinned:
            return f"has another {fname} (sha256 {recorded[:12]}, the stack pinned {pinned[:12]})"
    if adapter.base_fingerprint != stack.base_fingerprint:
        return f"fits base {str(adapter.base_fingerprint)[:12]}, the stack base {str(stack.base_fingerprint)[:12]}"
    if (adapter.adapter_type or "lora") != member.adapter_type:
        return f"is a {adapter.adapter_type} adapter, the stack recorded {member.adapter_type}"
    return None


def _fetch_hint(registry: _Registry, entry: RegistryEntry, member: StackMember) -> str:
    """How to get a missing member: from the repo the stack was pulled from, else add it again."""
    name = parse_ref(member.ref)[0]
    repo = (entry.source or {}).get("repo_id")
    if repo:
        return f"pull it: `mnist-peft pull --repo-id {repo} --name {name} --root {registry.root}`"
    return f"add it again (`mnist-peft registry add {name} FOLDER --root {registry.root}`) or pull it from the repo it came from"


def verify_stack(registry: _Registry, entry: RegistryEntry) -> None:
    """What ``verify`` checks of a stack beyond its own files: every member present, unchanged
    (:func:`member_entries`) and itself verified (files, probe).

    Raises:
        IntegrityError: naming the member and the fix.
    """
    for member, adapter in member_entries(registry, entry):
        try:
            registry.verify_entry(adapter)
        except IntegrityError as exc:
            raise IntegrityError(f"stack {entry.ref}: member {member.ref} does not verify: {exc}", path=exc.path) from None


def stacks_pinning(registry: _Registry, refs: Sequence[str]) -> dict[str, list[str]]:
    """The stack entries whose ``stack.json`` pins any of ``refs`` (``name@version``): ``{stack ref:
    [pinned refs]}``. A stack whose file cannot be read is skipped (``verify`` names it)."""
    wanted, found = set(refs), {}
    for e in registry.list():
        if e.kind != "stack":
            continue
        try:
            hits = [m.ref for m in read_stack_members(registry, e) if m.ref in wanted]
        except (IntegrityError, RegistryError):
            continue
        if hits:
            found[e.ref] = hits
    return found


def refuse_pinned(registry: _Registry, ref: str) -> None:
    """Refuse to remove ``ref`` (``name`` or ``name@version``) while a stack entry pins an adapter
    version it names: what ``registry rm`` asks before :meth:`remove` (which reads one name's rows
    only, so that its cost stays flat; this reads the whole index).

    Raises:
        RegistryError: naming the stacks, how to remove them, and ``--force``.
    """
    name, version = parse_ref(ref)
    doomed = [e.ref for e in registry.list() if e.name == name and e.kind == "lora" and version in (None, e.version)]
    users = stacks_pinning(registry, doomed) if doomed else {}
    if users:
        pins = "; ".join(f"{s} pins {', '.join(refs)}" for s, refs in sorted(users.items()))
        first = parse_ref(min(users))[0]
        raise RegistryError(
            f"refusing to remove {ref!r}: stack entries use it ({pins}); remove those stacks first "
            f"(`mnist-peft registry rm {first}`), or pass --force to leave them failing verify"
        )


# -- writing
def describe_stack_folder(folder: Path) -> dict[str, object]:
    """What a registry entry records of a stack folder (``stack.json``, checked; members not looked up:
    a pulled stack may arrive before its members): its kind and base fingerprint.

    Raises:
        RegistryError: the file is refused (:func:`parse_stack_file`), or the folder holds other files.
    """
    path = folder / STACK_FILE
    if path.stat().st_size > MAX_STACK_FILE_BYTES:  # before reading it
        raise RegistryError(f"{str(path)!r} is {path.stat().st_size:,} bytes, more than a stack needs; {_REMAKE}")
    fingerprint, _ = parse_stack_file(read_regular_file(str(path)), where=f"stack folder {str(folder)!r}")
    return {"kind": "stack", "base_fingerprint": fingerprint}


def add_stack(registry: _Registry, name: str, items: Sequence[tuple[str, float]]) -> RegistryEntry:
    """Record ``items`` (``(ref, weight)``; ``ref`` is ``name`` or ``name@version``, an unversioned
    name pinned to its latest version now) as the next version of stack entry ``name``.

    Each member must be an adapter entry (no base, no stack) that verifies; all must fit one base;
    a DoRA member stands alone at weight 1. ``stack.json`` and a model card are written to a
    temporary folder and added through the registry's atomic add: a refused or failed add leaves
    the registry as it was.

    Example:
        >>> reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)]).ref
        'mix@1'

    Raises:
        InvalidNameError: ``name`` or a ref is not a registry name.
        EntryNotFoundError: a member is not in the registry.
        RegistryError: a member is a base or a stack, the members fit different bases, a weight or
            the count is out of bounds, or a DoRA member is not alone at weight 1.
        IntegrityError: a member does not verify.
    """
    validate_name(name)
    where = f"stack {name!r}"
    if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= MAX_STACK:  # before any work: a hostile list may be long
        count = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
        raise RegistryError(f"{where}: a stack holds 1 to {MAX_STACK} adapters, got {count}; name them, e.g. 'digit-9@1:0.5,digit-3'")
    weights = []
    for item in items:  # the cheap checks first: shapes, names, weights, repeats
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str) or len(item[0]) > _MAX_REF_CHARS:
            raise RegistryError(f"{where}: each item is a (name@version, weight) pair, got {str(item)[:60]!r}")
        parse_ref(item[0])
        weights.append(_weight(item[1], f"{where} ({item[0]})"))
    names = [parse_ref(ref)[0] for ref, _ in items]
    if len(set(names)) != len(names):
        raise RegistryError(f"{where}: {sorted({n for n in names if names.count(n) > 1})} named twice; give each adapter once")
    adapters = [_member_entry(registry, ref, where) for ref, _ in items]
    members = [
        StackMember(a.ref, w, str(a.files[_WEIGHTS_NAME]["sha256"]), str(a.files[_CONFIG_NAME]["sha256"]), a.adapter_type or "lora")
        for a, w in zip(adapters, weights, strict=True)
    ]
    fingerprints = {a.base_fingerprint for a in adapters}
    if len(fingerprints) > 1:
        shown = ", ".join(f"{a.ref} fits {str(a.base_fingerprint)[:12]}" for a in adapters)
        raise RegistryError(f"{where}: the members fit different bases ({shown}); a stack's adapters share one base")
    _check_members(members, where)
    (fingerprint,) = fingerprints
    return _add_stack_folder(registry, name, fingerprint, members)


def _member_entry(registry: _Registry, ref: str, where: str) -> RegistryEntry:
    """The verified adapter entry a stack item names (refused: a base, a stack, an adapter without its files)."""
    entry = registry.get(ref)
    if entry.kind == "stack":
        spec = ",".join(f"{m.ref}:{m.weight:g}" for m in read_stack_members(registry, entry))
        raise RegistryError(f"{where}: {entry.ref!r} is a stack, and a stack holds no stacks; name its members instead: {spec!r}")
    if entry.kind != "lora":
        raise RegistryError(f"{where}: {entry.ref!r} is a {entry.kind}, not an adapter; a stack holds adapter entries")
    if not {_WEIGHTS_NAME, _CONFIG_NAME} <= set(entry.files):
        raise RegistryError(f"{where}: {entry.ref!r} lists no {_WEIGHTS_NAME} and {_CONFIG_NAME}; re-add the adapter")
    registry.verify_entry(entry)  # pin only bytes that check out
    return entry


def _add_stack_folder(registry: _Registry, name: str, fingerprint: str | None, members: list[StackMember]) -> RegistryEntry:
    """Write ``stack.json`` (and a card) to a temporary folder outside the registry and add it."""
    from mnist_peft.io.cards import stack_model_card

    document = {
        "format": STACK_FORMAT,
        "base_fingerprint": fingerprint,
        "members": [
            {
                "adapter": m.ref,
                "weight": m.weight,
                "sha256": m.weights_sha256,
                "config_sha256": m.config_sha256,
                "adapter_type": m.adapter_type,
            }
            for m in members
        ],
    }
    with tempfile.TemporaryDirectory(prefix="mnist-peft-stack-") as tmp:
        folder = Path(tmp)
        (folder / STACK_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        card = stack_model_card(name, [(m.ref, m.weight, m.adapter_type) for m in members], base_fingerprint=fingerprint)
        (folder / "README.md").write_text(card)
        return registry.add_many([(name, folder, {"files": sorted(STACK_FILES)})])[0]
