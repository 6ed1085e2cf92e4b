"""Push registry entries to, and pull them from, a Hugging Face Hub repository.

Repo layout, so that stock tools read it::

    config.json, model.safetensors   the base model (``MnistMLP.from_pretrained(repo_id)``)
    README.md                        the base's model card (YAML metadata, test metrics)
    index.json                       the registry entries in this repo, with sha256 of every file
    digit-9/adapter_config.json ...  one adapter per subfolder, PEFT layout
                                     (``PeftModel.from_pretrained(base, repo_id, subfolder="digit-9")``)

With ``per_adapter`` (``mnist-peft push --per-adapter``) each adapter is also published as a repo
of its own, ``<repo_id>-<name>``, the way the Hub itself lists adapters: the adapter at the root,
``base_model_name_or_path`` = the base's repo id, a card with ``base_model``, ``base_model_relation:
adapter``, ``library_name: peft``, ``pipeline_tag`` and ``model-index`` eval results, and every
registry version as a git tag (``v1``, ``v2``, ...): ``PeftModel.from_pretrained(base, adapter_repo,
revision="v2")``, ``mnist-peft pull --repo-id <adapter repo> --name digit-9@2``.

Authentication is ``huggingface_hub``'s own (``HF_TOKEN`` or ``hf auth login``); the token is never
printed or stored in the registry. ``HF_ENDPOINT`` points the client at another Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mnist_peft.errors import HubError, IntegrityError, RegistryError, http_status, hub_error
from mnist_peft.fileio import sha256_file
from mnist_peft.registry.adapter_registry import AdapterRegistry, RegistryEntry, confine, entry_from_dict, parse_ref

__all__ = ["push_to_hub", "push_adapters_to_hub", "adapter_repo_id", "pull_from_hub", "head_commit", "PushResult", "PullResult"]

INDEX_NAME = "index.json"
PUSH_ATTEMPTS = 8  # commits retried on a conflict (another push landed first), re-reading the index each time
MAX_REMOTE_INDEX_BYTES = 64 << 20


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
    from huggingface_hub import CommitOperationAdd, HfApi

    entries = _selected(registry, names)
    for e in entries:
        registry.verify_entry(e)  # also refuses symlinks and paths outside the root
    api = HfApi(token=token)
    ops = []
    for e in entries:
        prefix, folder = _repo_path(e), registry.folder(e)
        for fname in e.files:
            ops.append(CommitOperationAdd(f"{prefix}/{fname}" if prefix else fname, str(confine(folder, fname))))
    refs = ", ".join(e.ref for e in entries)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)

        def operations(parent: str | None) -> list:
            # The remote index at the head the commit is made on: entries not pushed now are kept.
            remote: dict[str, dict[str, object]] = {}
            if parent is not None:
                remote = {n: entry for n, (entry, _) in _remote_index(api, repo_id, parent, token=token, required=False).items()}
            for e in entries:
                remote[e.name] = {**e.to_dict(), "path": _repo_path(e)}
            if sum(entry.get("kind") == "base" for entry in remote.values()) > 1:
                raise RegistryError("the repo would hold two bases; push each base to its own repo")
            index = {"format": 1, "entries": sorted(remote.values(), key=lambda entry: str(entry["name"]))}
            return [*ops, CommitOperationAdd(INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())]

        info = _commit_on_head(
            api,
            repo_id,
            operations,
            revision=revision,
            commit_message=commit_message or f"mnist-peft push: {refs}",
            commit_description=f"Pushed {len(entries)} registry entries: {refs}.",
        )
    except (RegistryError, IntegrityError, HubError):
        raise
    except Exception as exc:  # network, HTTP and Hub errors become one HubError of their kind
        raise hub_error(exc, repo_id, "push") from exc
    return PushResult(repo_id=repo_id, commit=info.oid, pushed=[e.ref for e in entries])


def _commit_on_head(api, repo_id: str, operations: Callable[[str | None], list], *, revision: str | None = None, **commit_args):
    """One commit made on the branch head it was built from: ``operations(head)`` gives its files,
    and the head is named as the parent, so a concurrent push makes the commit fail (HTTP 409/412)
    instead of overwriting; then the head is read again and the commit rebuilt, with backoff, up
    to ``PUSH_ATTEMPTS`` times."""
    for attempt in range(PUSH_ATTEMPTS):
        parent = api.repo_info(repo_id, revision=revision or "main").sha
        try:
            return api.create_commit(repo_id, operations(parent), revision=revision, parent_commit=parent, **commit_args)
        except Exception as exc:
            if http_status(exc) not in (409, 412) or attempt == PUSH_ATTEMPTS - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))  # back off, then re-read and rebuild
    raise AssertionError("unreachable: the last attempt returns or raises")


def head_commit(repo_id: str, revision: str = "main", *, token: str | None = None) -> str:
    """The commit ``revision`` of Hub repo ``repo_id`` is at now (40 hex digits).

    Raises:
        HubError: the Hub cannot be reached, or the repo or revision does not exist.
    """
    from huggingface_hub import HfApi

    try:
        sha = HfApi(token=token).repo_info(repo_id, revision=revision).sha
    except Exception as exc:
        raise hub_error(exc, repo_id, f"reading the commit of {revision!r}") from exc
    if not sha:
        raise HubError(
            f"the Hub did not say which commit {revision!r} of {repo_id!r} is; pass a folder or a registry base instead", repo_id=repo_id
        )
    return sha


def adapter_repo_id(repo_id: str, name: str) -> str:
    """The repo an adapter is published to by a per-adapter push: ``<repo_id>-<name>``."""
    return f"{repo_id}-{name}"


def push_adapters_to_hub(
    repo_id: str,
    *,
    registry: AdapterRegistry,
    names: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> list[PushResult]:
    """Publish the base to ``repo_id`` and each adapter (every version) to a repo of its own.

    The base (the registry's one base; every adapter must have been trained on it) goes to
    ``repo_id`` as :func:`push_to_hub` puts it. Each adapter goes to :func:`adapter_repo_id`, one
    commit per registry version, oldest first, each tagged ``v<N>``; versions whose tag is there
    already are skipped (a version number never names other bytes). The uploaded
    ``adapter_config.json`` names the base repo, and ``README.md`` is a card the Hub understands.

    Raises:
        RegistryError: no base, several bases, or an adapter trained on another base.
        IntegrityError: a local file does not match the registry.
        HubError: the Hub cannot be reached or refuses a commit.
    """
    selected = _selected(registry, names)
    bases = [e for e in registry.list() if e.kind == "base"]
    latest_bases = {e.name: e for e in bases}
    if len(latest_bases) != 1:
        raise RegistryError(
            f"a per-adapter push needs exactly one base in the registry (the repo {repo_id!r} the adapters point to); "
            f"found {sorted(latest_bases) or 'none'}: add the base with `mnist-peft registry add base FOLDER`"
        )
    base = next(iter(latest_bases.values()))
    adapters = sorted({e.name for e in selected if e.kind == "lora"})
    versions = {n: [e for e in registry.list() if e.name == n] for n in adapters}
    for entry in (e for vs in versions.values() for e in vs):
        if entry.base_fingerprint and base.base_fingerprint and entry.base_fingerprint != base.base_fingerprint:
            raise RegistryError(f"{entry.ref} was trained on another base than {base.ref}; push it with its own base to another repo")
        registry.verify_entry(entry)
    results = [push_to_hub(repo_id, registry=registry, names=[base.ref], private=private, token=token)]
    for name in adapters:
        results.append(_push_adapter_repo(adapter_repo_id(repo_id, name), repo_id, registry, versions[name], private, token))
    return results


def _push_adapter_repo(
    repo_id: str, base_repo_id: str, registry: AdapterRegistry, versions: list[RegistryEntry], private: bool | None, token: str | None
) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi

    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, MODEL_CARD_NAME
    from mnist_peft.io.cards import card_body, hub_adapter_card

    api = HfApi(token=token)
    pushed, commit = [], ""
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        tags = {ref.name for ref in api.list_repo_refs(repo_id).tags}
        for entry in versions:
            if f"v{entry.version}" in tags:
                _check_published(api, repo_id, entry, token)
                continue
            folder = registry.folder(entry)
            contents: dict[str, bytes] = {}
            for fname in entry.files:
                contents[fname] = confine(folder, fname).read_bytes()
            if ADAPTER_CONFIG_NAME in contents:
                config = json.loads(contents[ADAPTER_CONFIG_NAME])
                config["base_model_name_or_path"] = base_repo_id
                contents[ADAPTER_CONFIG_NAME] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            old_card = contents.get(MODEL_CARD_NAME, b"").decode("utf-8", "replace")
            contents[MODEL_CARD_NAME] = hub_adapter_card(
                repo_id=repo_id,
                base_repo_id=base_repo_id,
                name=entry.name,
                version=entry.version,
                digit=entry.digit,
                metrics=entry.metrics,
                body=card_body(old_card),
            ).encode()
            files = {f: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for f, b in contents.items()}
            index = {"format": 1, "layout": "adapter", "base": base_repo_id, "entries": [{**entry.to_dict(), "files": files, "path": ""}]}
            ops = [CommitOperationAdd(f, b) for f, b in sorted(contents.items())]
            ops.append(CommitOperationAdd(INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
            commit = _commit_on_head(api, repo_id, lambda parent, ops=ops: ops, commit_message=f"mnist-peft push: {entry.ref}").oid
            api.create_tag(repo_id, tag=f"v{entry.version}", revision=commit, tag_message=f"{entry.ref}")
            pushed.append(entry.ref)
    except (RegistryError, IntegrityError, HubError):
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, "push") from exc
    return PushResult(repo_id=repo_id, commit=commit, pushed=pushed)


def _check_published(api, repo_id: str, entry: RegistryEntry, token: str | None) -> None:
    """A version whose tag exists is skipped only if the tag holds its bytes (the weights; the config
    and card are rewritten on push): a tag is never moved, and other bytes are never called vN."""
    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, MODEL_CARD_NAME

    remote = _remote_index(api, repo_id, f"v{entry.version}", token=token, required=True)
    files = remote[entry.name][0]["files"] if entry.name in remote else {}
    ours = {f: m["sha256"] for f, m in entry.files.items() if f not in (ADAPTER_CONFIG_NAME, MODEL_CARD_NAME)}
    theirs = {f: m["sha256"] for f, m in files.items() if f not in (ADAPTER_CONFIG_NAME, MODEL_CARD_NAME)}  # type: ignore[union-attr]
    if ours != theirs:
        raise RegistryError(
            f"tag v{entry.version} of {repo_id!r} holds other weights than the local {entry.ref}; tags are never moved. "
            "(A pulled entry gets the next local version number, so a registry that pulled from elsewhere numbers "
            "differently): push to another repo id"
        )


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
        remote = _remote_index(api, repo_id, sha, token=token, required=True)
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


def _remote_index(api, repo_id: str, revision: str, *, token: str | None, required: bool) -> dict[str, tuple[dict[str, object], str]]:
    """The repo's ``index.json`` at ``revision``, validated: ``{name: (entry, path in the repo)}``.

    A remote index is a stranger's input: every entry is checked like a local one (names, file
    names, types, sha256), and its path must be the repo layout's own (``""`` for the base, the
    entry's name for an adapter) before any file is downloaded or written.

    Raises:
        HubError: ``required`` and the repo has no index.
        RegistryError: the index is malformed or names a path it must not.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    where = f"the index of {repo_id!r}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = hf_hub_download(repo_id, INDEX_NAME, revision=revision, token=token, local_dir=tmp)
        except RemoteEntryNotFoundError:
            if required:
                raise HubError(
                    f"{repo_id!r} has no {INDEX_NAME} at this revision: it was not pushed by mnist-peft", repo_id=repo_id
                ) from None
            return {}
        raw = Path(path).read_bytes()
    if len(raw) > MAX_REMOTE_INDEX_BYTES:
        raise RegistryError(f"{where} is {len(raw):,} bytes, more than an index of adapters needs; refusing it")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # bad JSON, huge numbers, deep nesting
        raise RegistryError(f"{where} is not a usable JSON index ({type(exc).__name__}); nothing was written") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise RegistryError(f"{where} has no 'entries' list; nothing was written")
    one_adapter = data.get("layout") == "adapter"  # a per-adapter repo: one adapter, at the root
    if one_adapter and len(data["entries"]) != 1:
        raise RegistryError(f"{where} says it holds one adapter but lists {len(data['entries'])} entries; nothing was written")
    out: dict[str, tuple[dict[str, object], str]] = {}
    for item in data["entries"]:
        entry = entry_from_dict(item, where=where)
        if one_adapter and entry.kind != "lora":
            raise RegistryError(f"{where} says it holds one adapter, but {entry.name!r} is a {entry.kind}; nothing was written")
        layout = "" if entry.kind == "base" or one_adapter else entry.name
        if item.get("path") != layout:
            raise RegistryError(
                f"{where}: entry {entry.name!r} has path {item.get('path')!r}, not the repo layout's {layout!r}; nothing was written"
            )
        if entry.name in out:
            raise RegistryError(f"{where} lists {entry.name!r} twice; nothing was written")
        out[entry.name] = ({**item, "files": entry.files, "digit": entry.digit, "metrics": entry.metrics}, layout)
    return out


def _already_there(registry: AdapterRegistry, name: str, files: dict[str, dict[str, object]]) -> bool:
    if not registry.root.is_dir():  # pulling into a new registry
        return False
    want = {f: m["sha256"] for f, m in files.items()}
    return any(e.name == name and {f: m["sha256"] for f, m in e.files.items()} == want for e in registry.list())
