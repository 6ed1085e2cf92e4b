"""Push registry entries to a Hub repo: :func:`push_to_hub` (a bundle: the base at the root,
adapters in subfolders) and :func:`push_adapters_to_hub` (each adapter a repo of its own, every
version a tag). The repo layout is described in :mod:`mnist_peft.hub.common`."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence

from mnist_peft.errors import HubError, IntegrityError, RegistryError, http_status, hub_error
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.registry.names import confine
from mnist_peft.registry.stacks import member_entries

from .common import INDEX_NAME, PushResult, remote_index

__all__ = ["adapter_repo_id", "push_adapters_to_hub", "push_to_hub"]

PUSH_ATTEMPTS = 8  # commits retried on a conflict (another push landed first), re-reading the index each time


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


def _with_stack_members(registry: AdapterRegistry, entries: list[RegistryEntry]) -> list[RegistryEntry]:
    """``entries`` and the adapters their stacks pin (a stack goes up with its members, so a pull gets
    them too). A bundle keeps one version of each name: a member pushed now at another version is refused."""
    chosen = {e.name: e for e in entries}
    for stack in [e for e in entries if e.kind == "stack"]:
        for member, adapter in member_entries(registry, stack):  # a missing or changed member is said here
            there = chosen.setdefault(adapter.name, adapter)
            if there.ref != adapter.ref:
                raise RegistryError(
                    f"stack {stack.ref} pins {member.ref}, but this push sends {there.ref}; a bundle repo holds one version of "
                    f"each name: push the stack with --name {member.ref}, or re-make it on {there.ref} "
                    f"(`mnist-peft registry add-stack {stack.name} SPEC`)"
                )
    return list(chosen.values())


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

    Entries are verified first; the remote ``index.json`` keeps entries not pushed this time. A stack
    entry goes up with the adapter versions it pins (its ``stack.json`` in ``<name>/``, like an
    adapter's files).

    Raises:
        IntegrityError: a local file does not match the registry.
        HubError: the Hub cannot be reached or refuses the push.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    entries = _with_stack_members(registry, _selected(registry, names))
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
                remote = {n: entry for n, (entry, _) in remote_index(api, repo_id, parent, token=token, required=False).items()}
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
    ``repo_id`` as :func:`push_to_hub` puts it (stack entries are no adapter repos: they are left
    out, and refused when named; push them in a bundle). Each adapter goes to :func:`adapter_repo_id`, one
    commit per registry version, oldest first, each tagged ``v<N>``; versions whose tag is there
    already are skipped (a version number never names other bytes). The uploaded
    ``adapter_config.json`` names the base repo, and ``README.md`` is a card the Hub understands.

    Raises:
        RegistryError: no base, several bases, an adapter trained on another base, or a stack named.
        IntegrityError: a local file does not match the registry.
        HubError: the Hub cannot be reached or refuses a commit.
    """
    selected = _selected(registry, names)
    stacks = [e.ref for e in selected if e.kind == "stack"]
    if stacks and names:
        raise RegistryError(f"{stacks} are stack entries, which are no adapter repos; push them in a bundle (without --per-adapter)")
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
                adapter_type=entry.adapter_type or "lora",
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

    remote = remote_index(api, repo_id, f"v{entry.version}", token=token, required=True)
    files = remote[entry.name][0]["files"] if entry.name in remote else {}
    ours = {f: m["sha256"] for f, m in entry.files.items() if f not in (ADAPTER_CONFIG_NAME, MODEL_CARD_NAME)}
    theirs = {f: m["sha256"] for f, m in files.items() if f not in (ADAPTER_CONFIG_NAME, MODEL_CARD_NAME)}  # type: ignore[union-attr]
    if ours != theirs:
        raise RegistryError(
            f"tag v{entry.version} of {repo_id!r} holds other weights than the local {entry.ref}; tags are never moved. "
            "(A pulled entry keeps its remote version number only where that number was free, so a registry that "
            "pulled from elsewhere may number differently): push to another repo id"
        )
