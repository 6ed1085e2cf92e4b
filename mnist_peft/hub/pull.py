"""Pull registry entries from a Hub repo (:func:`pull_from_hub`): a bundle at a revision, or one
version of a per-adapter repo by its tag (``name@N``); everything checked before anything is added."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mnist_peft.errors import HubError, IntegrityError, RegistryError, hub_error
from mnist_peft.fileio import sha256_file
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.names import confine, parse_ref

from .common import PullResult, remote_index

__all__ = ["pull_from_hub"]


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

    refs = [parse_ref(n) for n in names] if names else []
    pinned = [(n, v) for n, v in refs if v is not None]
    if pinned:  # name@N: the tag v<N> of a per-adapter repo
        if len(refs) != 1 or revision is not None:
            raise RegistryError(
                "name@N pulls the tag vN of a per-adapter repo: give exactly one --name and no --revision "
                "(a bundle repo keeps one version of each entry: pull an older one with --revision <commit>)"
            )
        revision = f"v{pinned[0][1]}"
    try:
        api = HfApi(token=token)
        if pinned:
            _require_tag(api, repo_id, *pinned[0])
        sha = api.repo_info(repo_id, revision=revision or "main").sha or (revision or "main")
        remote = remote_index(api, repo_id, sha, token=token, required=True)
        for n, v in pinned:
            if n in remote and remote[n][0].get("version") != v:
                raise RegistryError(
                    f"tag {revision!r} of {repo_id!r} holds {n}@{remote[n][0].get('version')}, not {n}@{v}; the repo's tags "
                    "do not follow its registry versions, so nothing was pulled"
                )
        wanted = [n for n, _ in refs] if names else sorted(remote)
        unknown = [n for n in wanted if n not in remote]
        if unknown:
            raise HubError(f"{repo_id!r} has no entries {unknown}; it has {sorted(remote)}", repo_id=repo_id)
        source = {"repo_id": repo_id, "revision": sha, **({"tag": revision} if pinned else {})}
        with tempfile.TemporaryDirectory() as tmp:
            # Every name below was validated: plain file names, the repo layout's own folders.
            patterns = [f"{remote[n][1]}/{f}" if remote[n][1] else f for n in wanted for f in remote[n][0]["files"]]  # type: ignore[union-attr]
            snap = Path(
                snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token, local_dir=os.path.join(tmp, "files"))
            )
            items, unchanged = _checked_items(registry, repo_id, remote, wanted, snap, source)
            added = registry.add_many(items)
    except (HubError, IntegrityError, RegistryError):
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, "pull") from exc
    return PullResult(repo_id=repo_id, revision=sha, added=[e.ref for e in added], unchanged=unchanged)


def _require_tag(api, repo_id: str, name: str, version: int) -> None:
    if f"v{version}" not in {t.name for t in api.list_repo_refs(repo_id).tags}:
        raise HubError(
            f"{repo_id!r} has no tag 'v{version}', so no {name}@{version}: versions are tags only in per-adapter "
            "repos (push --per-adapter); a bundle repo keeps one version of each entry: pull an older one with --revision <commit>",
            repo_id=repo_id,
        )


def _checked_items(
    registry: AdapterRegistry,
    repo_id: str,
    remote: dict[str, tuple[dict[str, object], str]],
    wanted: list[str],
    snap: Path,
    source: dict[str, str],
) -> tuple[list, list[str]]:
    """``add_many`` items for the downloaded entries, every file checked against the index's
    sha256 first; entries already in the registry byte for byte are listed as unchanged."""
    items, unchanged = [], []
    for n in wanted:
        entry, repo_path = remote[n]
        folder = confine(snap, repo_path) if repo_path else snap
        files: dict[str, dict[str, object]] = entry["files"]  # type: ignore[assignment]
        for fname, meta in files.items():
            p = confine(folder, fname)
            if not p.is_file() or sha256_file(p) != meta["sha256"]:
                raise IntegrityError(
                    f"pulled file {n}/{fname} from {repo_id!r} does not match the sha256 in its index (tampered or "
                    "corrupted on the server); nothing was added",
                    path=p,
                )
        if _already_there(registry, n, files):
            unchanged.append(n)
            continue
        items.append((n, folder, {"metrics": entry.get("metrics"), "digit": entry.get("digit"), "files": sorted(files), "source": source}))
    return items, unchanged


def _already_there(registry: AdapterRegistry, name: str, files: dict[str, dict[str, object]]) -> bool:
    if not registry.root.is_dir():  # pulling into a new registry
        return False
    want = {f: m["sha256"] for f, m in files.items()}
    return any(e.name == name and {f: m["sha256"] for f, m in e.files.items()} == want for e in registry.list())
