"""Push registry entries to, and pull them from, a Hugging Face Hub repository.

Repo layout, so that stock tools read it::

    config.json, model.safetensors   the base model (``MnistMLP.from_pretrained(repo_id)``)
    README.md                        the base's model card (YAML metadata, test metrics)
    index.json                       the registry entries in this repo, with sha256 of every file
    digit-9/adapter_config.json ...  one adapter per subfolder, PEFT layout
                                     (``PeftModel.from_pretrained(base, repo_id, subfolder="digit-9")``)

Authentication is ``huggingface_hub``'s own (``HF_TOKEN`` or ``hf auth login``); the token is never
printed or stored in the registry. ``HF_ENDPOINT`` points the client at another Hub.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError, IntegrityError, RegistryError
from .fileio import sha256_file
from .registry import AdapterRegistry, RegistryEntry

__all__ = ["push_to_hub", "pull_from_hub", "PushResult", "PullResult"]

INDEX_NAME = "index.json"


@dataclass
class PushResult:
    repo_id: str
    commit: str
    pushed: list[str]


@dataclass
class PullResult:
    repo_id: str
    revision: str
    added: list[str]
    unchanged: list[str]


def _hub_error(exc: Exception, repo_id: str, action: str) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{action} failed: repository {repo_id!r} not found at {constants.ENDPOINT}; check the repo id (and HF_TOKEN for private repos)", repo_id=repo_id)
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{action} failed: revision not found in {repo_id!r}; check --revision", repo_id=repo_id)
    detail = " ".join(str(exc).split())[:300]
    return HubError(f"{action} failed for {repo_id!r} at {constants.ENDPOINT}: {detail}; check the network, HF_ENDPOINT and HF_TOKEN", repo_id=repo_id)


def _repo_path(entry: RegistryEntry) -> str:
    """Where an entry lives in the repo: the base at the root, adapters in ``<name>/``."""
    return "" if entry.kind == "base" else entry.name


def _selected(registry: AdapterRegistry, names: Sequence[str] | None) -> list[RegistryEntry]:
    if names:
        entries = [registry.get(n) for n in names]
    else:
        latest: dict[str, RegistryEntry] = {}
        for e in registry.list():
            latest[e.name] = e  # list() is sorted by version: the last one wins
        entries = list(latest.values())
    bases = [e for e in entries if e.kind == "base"]
    if len(bases) > 1:
        raise RegistryError(f"a repo holds one base at its root; got {[e.ref for e in bases]}: push them to separate repos")
    if not entries:
        raise RegistryError(f"nothing to push: the registry at {str(registry.root)!r} is empty")
    return entries


def push_to_hub(
    repo_id: str,
    *,
    registry: AdapterRegistry,
    names: Sequence[str] | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> PushResult:
    """Push the latest version of every entry (or ``names``) in one commit.

    Entries are verified first; the remote ``index.json`` keeps entries not pushed this time.

    Raises:
        IntegrityError: a local file does not match the registry.
        HubError: the Hub cannot be reached or refuses the push.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    entries = _selected(registry, names)
    for e in entries:
        registry.verify_entry(e)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        remote: dict[str, dict[str, object]] = {}
        siblings = api.repo_info(repo_id, revision=revision or "main").siblings or []
        if any(s.rfilename == INDEX_NAME for s in siblings):  # keep the entries not pushed this time
            with tempfile.TemporaryDirectory() as tmp:
                idx = hf_hub_download(repo_id, INDEX_NAME, revision=revision, token=token, local_dir=tmp)
                remote = {str(e["name"]): e for e in json.loads(Path(idx).read_text())["entries"]}
        ops = []
        for e in entries:
            prefix = _repo_path(e)
            for fname in e.files:
                ops.append(CommitOperationAdd(f"{prefix}/{fname}" if prefix else fname, str(registry.root / e.path / fname)))
            remote[e.name] = {**e.to_dict(), "path": prefix}
        if sum(e.get("kind") == "base" for e in remote.values()) > 1:
            raise RegistryError("the repo would hold two bases; push each base to its own repo")
        index = {"format": 1, "entries": sorted(remote.values(), key=lambda e: str(e["name"]))}
        ops.append(CommitOperationAdd(INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
        refs = ", ".join(e.ref for e in entries)
        info = api.create_commit(
            repo_id, ops, commit_message=commit_message or f"mnist-peft push: {refs}", revision=revision,
            commit_description=f"Pushed {len(entries)} registry entries: {refs}.",
        )  # fmt: skip
    except (RegistryError, IntegrityError):
        raise
    except Exception as exc:  # network, HTTP and Hub errors all become one HubError
        raise _hub_error(exc, repo_id, "push") from exc
    return PushResult(repo_id=repo_id, commit=info.oid, pushed=[e.ref for e in entries])


def pull_from_hub(
    repo_id: str,
    *,
    registry: AdapterRegistry,
    names: Sequence[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> PullResult:
    """Pull every entry (or ``names``) of ``repo_id`` at ``revision`` into the local registry.

    Everything is downloaded and checked against the remote index's sha256 before anything is
    added, and all entries are added in one index write: a pull that fails changes nothing.
    Entries whose files are already in the registry byte for byte are not added again.

    Raises:
        HubError: the Hub cannot be reached, or the repo / revision / a file is missing.
        IntegrityError: a downloaded file does not match the index (tampered or corrupted).
    """
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi(token=token).repo_info(repo_id, revision=revision or "main").sha or (revision or "main")
        with tempfile.TemporaryDirectory() as tmp:
            idx_dir = snapshot_download(repo_id, revision=sha, allow_patterns=[INDEX_NAME], token=token, local_dir=os.path.join(tmp, "idx"))
            index_file = Path(idx_dir) / INDEX_NAME
            if not index_file.is_file():
                raise HubError(f"{repo_id!r} has no {INDEX_NAME} at this revision: it was not pushed by mnist-peft", repo_id=repo_id)
            remote = {str(e["name"]): e for e in json.loads(index_file.read_text())["entries"]}
            wanted = list(names) if names else sorted(remote)
            unknown = [n for n in wanted if n not in remote]
            if unknown:
                raise HubError(f"{repo_id!r} has no entries {unknown}; it has {sorted(remote)}", repo_id=repo_id)
            patterns = [f"{remote[n]['path']}/{f}" if remote[n]["path"] else f for n in wanted for f in remote[n]["files"]]  # type: ignore[union-attr]
            snap = Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token, local_dir=os.path.join(tmp, "files")))
            items, unchanged = [], []
            for n in wanted:
                e = remote[n]
                folder = snap / str(e["path"]) if e["path"] else snap
                files: dict[str, dict[str, object]] = e["files"]  # type: ignore[assignment]
                for fname, meta in files.items():
                    p = folder / fname
                    if not p.is_file() or sha256_file(p) != meta["sha256"]:
                        raise IntegrityError(
                            f"pulled file {n}/{fname} from {repo_id!r} does not match the sha256 in its index (tampered or "
                            "corrupted on the server); nothing was added", path=p,
                        )  # fmt: skip
                if _already_there(registry, n, files):
                    unchanged.append(n)
                    continue
                items.append((n, folder, {"metrics": e.get("metrics"), "digit": e.get("digit"), "files": sorted(files)}))
            added = registry.add_many(items)
    except (HubError, IntegrityError, RegistryError):
        raise
    except Exception as exc:
        raise _hub_error(exc, repo_id, "pull") from exc
    return PullResult(repo_id=repo_id, revision=sha, added=[e.ref for e in added], unchanged=unchanged)


def _already_there(registry: AdapterRegistry, name: str, files: dict[str, dict[str, object]]) -> bool:
    want = {f: m["sha256"] for f, m in files.items()}
    return any(e.name == name and {f: m["sha256"] for f, m in e.files.items()} == want for e in registry.list())
