"""A local adapter registry: versioned entries with fingerprints and integrity checks.

Layout (``adapters/`` by default; ``--root`` or ``$MNIST_PEFT_ADAPTERS``)::

    index.json            every entry: name, version, kind, digit, r, lora_alpha, base_fingerprint,
                          files {name: {sha256, size}}, created, metrics, path
    base/v1/              a base model folder (config.json, model.safetensors, README.md)
    digit-9/v1/           an adapter folder in PEFT layout
    digit-9/v2/           a newer version; v1 is kept

Writes are atomic (files are staged in a temporary folder inside the root and renamed into place;
``index.json`` is replaced with a temp file + fsync + rename) and serialised with a file lock, so
concurrent writers lose nothing and a writer killed mid-way leaves the previous index intact.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from .errors import EntryNotFoundError, IntegrityError, InvalidNameError, RegistryError
from .fileio import atomic_write_json, current_umask, sha256_file

__all__ = ["AdapterRegistry", "RegistryEntry", "parse_ref", "default_root", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
INDEX_NAME = "index.json"
LOCK_NAME = ".index.lock"
ENV_ROOT = "MNIST_PEFT_ADAPTERS"
INDEX_FORMAT = 1


def default_root() -> Path:
    """``$MNIST_PEFT_ADAPTERS``, else ``./adapters``."""
    return Path(os.environ.get(ENV_ROOT) or "adapters")


def validate_name(name: str) -> str:
    """A registry name: ``[a-z0-9][a-z0-9._-]*``, no path separators, not ``.``/``..``-like."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name or len(name) > 100:
        raise InvalidNameError(
            f"invalid registry name {name!r}: use lowercase letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (e.g. 'digit-9'), at most 100 characters",
            name=str(name),
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"digit-9"`` -> ("digit-9", None) (latest); ``"digit-9@2"`` -> ("digit-9", 2)."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidNameError(f"invalid version in {ref!r}: write name@N with N >= 1, e.g. 'digit-9@2'", name=ref)
    return name, int(version)


@dataclass
class RegistryEntry:
    name: str
    version: int
    kind: str  # "base" | "lora"
    path: str  # relative to the root, e.g. "digit-9/v1"
    files: dict[str, dict[str, object]]  # file name -> {"sha256": str, "size": int}
    base_fingerprint: str | None = None
    digit: int | None = None
    r: int | None = None
    lora_alpha: float | None = None
    created: str = ""
    metrics: dict[str, object] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _describe_folder(folder: Path) -> dict[str, object]:
    """kind, fingerprint, digit, r, lora_alpha read from a base or adapter folder."""
    from .adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter

    if (folder / ADAPTER_CONFIG_NAME).is_file() and (folder / ADAPTER_WEIGHTS_NAME).is_file():
        files = read_adapter(folder)
        digit = files.metadata.get("digit")
        return {
            "kind": "lora",
            "base_fingerprint": files.base_fingerprint,
            "digit": int(digit) if digit is not None and digit.isdigit() else None,
            "r": files.config.r,
            "lora_alpha": files.config.lora_alpha,
        }
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        from .model import base_fingerprint, load_base

        return {"kind": "base", "base_fingerprint": base_fingerprint(load_base(folder))}
    raise RegistryError(
        f"{str(folder)!r} is neither an adapter folder (adapter_config.json + adapter_model.safetensors) nor a base "
        "model folder (config.json + model.safetensors)"
    )


class AdapterRegistry:
    """Versioned adapters and bases in a folder, with an ``index.json``.

    Example:
        >>> reg = AdapterRegistry("adapters")
        >>> entry = reg.add("digit-9", "out/digit-9", metrics={"accuracy": 0.987})
        >>> reg.path("digit-9")        # verified folder of the latest version
        PosixPath('adapters/digit-9/v1')
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    # -- index
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK_NAME), timeout=60)

    def _read_index(self) -> list[RegistryEntry]:
        if not self.index_path.exists():
            return []
        try:
            data = json.loads(self.index_path.read_text())
            return [RegistryEntry(**e) for e in data["entries"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RegistryError(f"registry index {str(self.index_path)!r} is unreadable ({exc}); restore it from version control") from exc

    def _write_index(self, entries: list[RegistryEntry]) -> None:
        entries = sorted(entries, key=lambda e: (e.name, e.version))
        atomic_write_json(self.index_path, {"format": INDEX_FORMAT, "entries": [e.to_dict() for e in entries]})

    # -- queries
    def list(self) -> list[RegistryEntry]:
        return sorted(self._read_index(), key=lambda e: (e.name, e.version))

    def get(self, ref: str) -> RegistryEntry:
        """The entry for ``name`` (latest version) or ``name@version``."""
        name, version = parse_ref(ref)
        versions = [e for e in self._read_index() if e.name == name]
        if not versions:
            known = sorted({e.name for e in self._read_index()})
            raise EntryNotFoundError(f"no registry entry {name!r} in {str(self.root)!r}; entries: {known or 'none'} (see `mnist-peft registry list`)", name=name)
        if version is None:
            return max(versions, key=lambda e: e.version)
        for e in versions:
            if e.version == version:
                return e
        raise EntryNotFoundError(f"{name!r} has no version {version}; versions: {sorted(e.version for e in versions)}", name=ref)

    def __contains__(self, ref: str) -> bool:
        try:
            self.get(ref)
        except (EntryNotFoundError, InvalidNameError):
            return False
        return True

    def path(self, ref: str, *, verify: bool = True) -> Path:
        """The folder of an entry, after checking every file's size and sha256."""
        entry = self.get(ref)
        if verify:
            self.verify_entry(entry)
        return self.root / entry.path

    # -- integrity
    def verify_entry(self, entry: RegistryEntry) -> None:
        """Raise :class:`IntegrityError` naming the first missing, resized or altered file."""
        folder = self.root / entry.path
        for fname, info in entry.files.items():
            p = folder / fname
            if not p.is_file():
                raise IntegrityError(f"{entry.ref}: file {str(p)!r} is missing; re-add or pull the entry again", path=p)
            if p.stat().st_size != info["size"]:
                raise IntegrityError(f"{entry.ref}: file {str(p)!r} has {p.stat().st_size} bytes, the index says {info['size']} (truncated?)", path=p)
            if sha256_file(p) != info["sha256"]:
                raise IntegrityError(f"{entry.ref}: file {str(p)!r} does not match its recorded sha256 (corrupted or edited)", path=p)

    def verify(self) -> list[tuple[str, str]]:
        """Check every entry; returns ``(ref, problem)`` for each bad one (empty when all are good)."""
        problems = []
        for entry in self.list():
            try:
                self.verify_entry(entry)
            except IntegrityError as exc:
                problems.append((entry.ref, str(exc)))
        return problems

    # -- writes
    def add(
        self,
        name: str,
        folder: str | os.PathLike[str],
        *,
        metrics: dict[str, object] | None = None,
        digit: int | None = None,
        files: list[str] | None = None,
    ) -> RegistryEntry:
        """Copy a base or adapter folder in as the next version of ``name`` (never overwriting one).

        Args:
            files: copy only these file names (default: every file at the folder's top level).
        """
        return self.add_many([(name, folder, {"metrics": metrics, "digit": digit, "files": files})])[0]

    def add_many(self, items: list[tuple[str, str | os.PathLike[str], dict[str, object]]]) -> list[RegistryEntry]:
        """Add several folders under one lock and one index write: all of them or none.

        Each item is ``(name, folder, options)`` with the options of :meth:`add`.
        """
        prepared = []
        for name, folder, opts in items:
            validate_name(name)
            src = Path(folder)
            if not src.is_dir():
                raise RegistryError(f"cannot add {str(src)!r}: not a folder; pass a base or adapter folder")
            info = _describe_folder(src)
            if opts.get("digit") is not None:
                info["digit"] = opts["digit"]
            names = opts.get("files") or sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
            missing = [f for f in names if not (src / f).is_file()]
            if missing:
                raise RegistryError(f"cannot add {str(src)!r}: missing {missing}")
            prepared.append((name, src, info, names, dict(opts.get("metrics") or {})))
        added: list[RegistryEntry] = []
        moved: list[Path] = []
        with self._lock():
            entries = self._read_index()
            try:
                for name, src, info, names, metrics in prepared:
                    version = 1 + max((e.version for e in [*entries, *added] if e.name == name), default=0)
                    rel = f"{name}/v{version}"
                    dest = self.root / rel
                    if dest.exists():  # left by a writer killed after the rename, before its index write
                        shutil.rmtree(dest)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
                    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
                    try:
                        files = {}
                        for fname in names:
                            shutil.copyfile(src / fname, staging / fname)
                            with open(staging / fname, "rb") as f:
                                os.fsync(f.fileno())
                            files[fname] = {"sha256": sha256_file(staging / fname), "size": (staging / fname).stat().st_size}
                        os.replace(staging, dest)
                    except BaseException:
                        shutil.rmtree(staging, ignore_errors=True)
                        raise
                    moved.append(dest)
                    added.append(RegistryEntry(
                        name=name, version=version, kind=str(info["kind"]), path=rel, files=files,
                        base_fingerprint=info.get("base_fingerprint"), digit=info.get("digit"), r=info.get("r"),
                        lora_alpha=info.get("lora_alpha"), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        metrics=metrics,
                    ))  # fmt: skip
                self._write_index([*entries, *added])
            except BaseException:
                for dest in moved:  # nothing of a failed batch stays behind
                    shutil.rmtree(dest, ignore_errors=True)
                raise
        return added

    def remove(self, ref: str) -> list[RegistryEntry]:
        """Remove ``name@version``, or every version of ``name``; returns what was removed."""
        name, version = parse_ref(ref)
        with self._lock():
            entries = self._read_index()
            gone = [e for e in entries if e.name == name and (version is None or e.version == version)]
            if not gone:
                self.get(ref)  # raises the not-found error with the known names
            self._write_index([e for e in entries if e not in gone])  # index first: a crash leaves only orphan files
            for e in gone:
                shutil.rmtree(self.root / e.path, ignore_errors=True)
            parent = self.root / name
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        return gone
