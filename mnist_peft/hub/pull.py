"""Pull registry entries from a Hub repo (:func:`pull_from_hub`): a bundle at a revision, or one
version of a per-adapter repo by its tag (``name@N``); everything checked before anything is added.

Every file is downloaded by :func:`download_capped`: the remote index records its size, and a
server that sends more is cut off there, before the excess is read (the sha256 is checked after)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from mnist_peft.errors import HubError, IntegrityError, RegistryError, hub_error
from mnist_peft.fileio import sha256_file
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.names import confine, parse_ref
from mnist_peft.registry.stacks import member_entries

from .common import PullResult, remote_index

__all__ = ["DOWNLOAD_CHUNK", "MAX_PULLED_FILE_BYTES", "download_capped", "pull_from_hub"]

DOWNLOAD_CHUNK = 64 << 10
"""Bytes read at a time: a file larger than its recorded size is refused at most this much past it."""


def pull_from_hub(
    repo_id: str,
    *,
    registry: AdapterRegistry,
    names: Sequence[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> PullResult:
    """Pull every entry (or ``names``) of ``repo_id`` at ``revision`` into the local registry.

    Everything is downloaded (never more than the remote index's recorded size) and checked against
    its sha256 before anything is added, and all entries are added in one index write: a pull that
    fails changes nothing. Entries whose files are already in the registry byte for byte are not
    added again. An entry keeps its remote version number where that number was never used here;
    otherwise it gets the next one, listed in ``renumbered``. A stack entry is pulled like any
    other; one whose members are not all here afterwards is listed in ``incomplete`` with the pull
    that gets them (``verify`` and the serving engine say the same until they come).

    Raises:
        HubError: the Hub cannot be reached, or the repo / revision / a file is missing.
        IntegrityError: a downloaded file does not match the index (tampered or corrupted).
    """
    from huggingface_hub import HfApi

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
            snap = Path(tmp) / "files"
            for n in wanted:  # every name was validated: plain file names, the repo layout's own folders
                entry, folder = remote[n]
                for fname, meta in entry["files"].items():  # type: ignore[union-attr]
                    rel = f"{folder}/{fname}" if folder else fname
                    download_capped(repo_id, sha, rel, confine(snap, rel), size=int(meta["size"]), token=token, label=f"{n}/{fname}")
            items, unchanged = _checked_items(registry, repo_id, remote, wanted, snap, source)
            added = registry.add_many(items)
    except (HubError, IntegrityError, RegistryError):
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, "pull") from exc
    wanted_refs = [f"{name}@{opts['version']}" for name, _, opts in items]
    renumbered = {want: e.ref for want, e in zip(wanted_refs, added, strict=True) if want != e.ref}
    incomplete = {}
    for e in (e for e in added if e.kind == "stack"):  # a stack may come before its members: said, not refused
        try:
            member_entries(registry, e)
        except (IntegrityError, RegistryError) as exc:
            incomplete[e.ref] = str(exc)
    return PullResult(
        repo_id=repo_id, revision=sha, added=[e.ref for e in added], unchanged=unchanged, renumbered=renumbered, incomplete=incomplete
    )


MAX_PULLED_FILE_BYTES = 256 << 20
"""The most one pulled file may hold: the base is 11.2 MB, and an adapter of the highest rank each layer
allows (r = min(in, out)) about 25 MB in float32."""


def download_capped(repo_id: str, revision: str, path_in_repo: str, dest: Path, *, size: int, token: str | None, label: str) -> int:
    """Download ``path_in_repo`` of ``repo_id`` at ``revision`` to ``dest``, reading at most
    ``size + 1`` bytes (plus one :data:`DOWNLOAD_CHUNK`): ``size`` is what the repo's index records,
    and a file that turns out larger is refused there. Returns the bytes read.

    Raises:
        IntegrityError: the server sends more than ``size`` bytes (or says it will).
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    def too_large(what: str) -> IntegrityError:
        return IntegrityError(
            f"pulled file {label} from {repo_id!r} is larger than the {size:,} bytes its index records ({what}): tampered or "
            "corrupted on the server; nothing was added",
            path=dest,
        )

    if size > MAX_PULLED_FILE_BYTES:  # the recorded size is the stranger's word: it is not a cap by itself
        raise IntegrityError(
            f"pulled file {label} from {repo_id!r} is recorded as {size:,} bytes, more than any base or adapter file "
            f"needs ({MAX_PULLED_FILE_BYTES:,}); refusing it before downloading; nothing was added",
            path=dest,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(repo_id, path_in_repo, revision=revision)
    headers = build_hf_headers(token=token)
    read = 0
    with http_stream_backoff(
        "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, retry_on_status_codes=(408, 429)
    ) as response:
        hf_raise_for_status(response)
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and not response.headers.get("Content-Encoding") and int(declared) > size:
            raise too_large(f"the server announced {int(declared):,}; nothing of it was read")
        with open(dest, "xb") as f:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                read += len(chunk)
                if read > size:
                    raise too_large(f"the download was stopped after {read:,} bytes")
                f.write(chunk)
    return read


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
        opts = {"metrics": entry.get("metrics"), "digit": entry.get("digit"), "files": sorted(files), "source": source}
        items.append((n, folder, {**opts, "version": entry["version"]}))  # the remote number, kept where it is free here
    return items, unchanged


def _already_there(registry: AdapterRegistry, name: str, files: dict[str, dict[str, object]]) -> bool:
    if not registry.root.is_dir():  # pulling into a new registry
        return False
    want = {f: m["sha256"] for f, m in files.items()}
    return any(e.name == name and {f: m["sha256"] for f, m in e.files.items()} == want for e in registry.list())
