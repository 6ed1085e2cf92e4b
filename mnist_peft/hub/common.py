"""What push and pull share: the repo layout, the remote ``index.json`` (read as a stranger's input),
the results, and the commit a repo is at.

Repo layout, so that stock tools read it::

    config.json, model.safetensors   the base model (``MnistMLP.from_pretrained(repo_id)``)
    README.md                        the base's model card (YAML metadata, test metrics)
    index.json                       the registry entries in this repo, with sha256 of every file
    digit-9/adapter_config.json ...  one adapter per subfolder, PEFT layout
                                     (``PeftModel.from_pretrained(base, repo_id, subfolder="digit-9")``)
    mix/stack.json, mix/README.md    a named stack (registry kind ``stack``), in its subfolder like an adapter

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

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mnist_peft.errors import HubError, RegistryError, hub_error
from mnist_peft.registry.entry import entry_from_dict

__all__ = ["INDEX_NAME", "MAX_REMOTE_INDEX_BYTES", "PullResult", "PushResult", "head_commit", "remote_index"]

INDEX_NAME = "index.json"
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
    renumbered: dict[str, str] = field(default_factory=dict)
    """Remote ``name@N`` -> local ``name@M`` for entries whose number was used here already (else the
    remote number is kept)."""
    incomplete: dict[str, str] = field(default_factory=dict)
    """Stack entries added whose members are not all here (missing or other bytes) -> what is wrong and
    the command that fixes it (the pull succeeds: the members may come later)."""


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


def remote_index(api, repo_id: str, revision: str, *, token: str | None, required: bool) -> dict[str, tuple[dict[str, object], str]]:
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
