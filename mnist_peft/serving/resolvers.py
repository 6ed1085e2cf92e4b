"""Resolvers: where the engine finds the adapters a spec names, tried in order (as vLLM's
``LoRAResolver`` plugins are): the local registry (:class:`RegistryResolver`), then, only when the
server allows it, the Hub (:class:`HubResolver`).

A resolver answers one reference of a spec (``digit-9@1``, a named stack ``my-mix``, a Hub
reference ``hub:OWNER/REPO@v2``) with the adapter entries it stands for (:class:`Member`: a
registry, an entry, a weight), or ``None`` when the reference is not its kind. A named stack
(a registry entry of kind ``stack``) stands for its pinned members at their recorded weights. A Hub
reference is pulled once through the toolkit's pull path (confined, every file sha256-checked) into
a cache registry of its own, pinned to the commit it read, and served from there afterwards; the
base fingerprint is checked when the adapter loads, as every adapter's is.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mnist_peft.errors import EntryNotFoundError, InvalidArgumentError, RegistryError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry

__all__ = [
    "HUB_PREFIX",
    "HubResolver",
    "Member",
    "RegistryResolver",
    "Resolver",
    "is_hub_ref",
    "parse_hub_ref",
    "resolve_ref",
]

HUB_PREFIX = "hub:"
# hub:OWNER/REPO@vN, hub:OWNER/REPO@<40 hex> or hub:OWNER/REPO/NAME@... (NAME: one entry of a bundle repo)
_HUB_REF = re.compile(
    r"hub:(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:/(?P<name>[A-Za-z0-9][\w.-]{0,99}))?"
    r"@(?P<rev>v[0-9]{1,10}|[0-9a-f]{40})"
)
HUB_REF_RULE = (
    "a Hub reference is hub:OWNER/REPO@vN (a tag) or hub:OWNER/REPO@<40-hex commit>, pinned; "
    "hub:OWNER/REPO/NAME@... names one entry of a bundle repo"
)


@dataclass(frozen=True)
class Member:
    """One adapter of a resolved stack: the registry that holds it, its entry, its weight, and how
    answers name it (``digit-9@1``; ``hub:OWNER/REPO@<commit>/digit-9@1`` for a Hub one)."""

    registry: AdapterRegistry
    entry: RegistryEntry
    weight: float
    label: str
    pinned: str = ""
    """A reference that resolves to this very entry again (``digit-9@1``; ``hub:OWNER/REPO/digit-9@<commit>``):
    what a Ray Serve replica is handed to resolve the stack the ingress resolved. Default: ``entry.ref``."""

    def __post_init__(self) -> None:
        if not self.pinned:
            object.__setattr__(self, "pinned", self.entry.ref)


class Resolver(Protocol):
    """What the engine asks for each reference of a spec, in order: ``resolve(ref)`` -> the members it
    stands for at ``weight``, or ``None`` when ``ref`` is not this resolver's kind (the next one is asked)."""

    def resolve(self, ref: str, weight: float) -> list[Member] | None: ...


def is_hub_ref(ref: str) -> bool:
    return ref.startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None, str]:
    """``"hub:me/digit-9@v2"`` -> ``("me/digit-9", None, "v2")``; ``"hub:me/bundle/digit-9@<sha>"``
    -> ``("me/bundle", "digit-9", "<sha>")``.

    Raises:
        InvalidArgumentError: not of that form (the revision must be pinned: a tag ``vN`` or a commit).
    """
    match = _HUB_REF.fullmatch(ref) if isinstance(ref, str) and len(ref) <= 300 else None
    if match is None:
        raise InvalidArgumentError(f"{str(ref)[:120]!r} is not a Hub reference: {HUB_REF_RULE}")
    return match["repo"], match["name"], match["rev"]


class RegistryResolver:
    """References into a local registry: ``name``, ``name@N``; a named stack (kind ``stack``) is its
    pinned members, each weight multiplied by the spec's."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    def resolve(self, ref: str, weight: float) -> list[Member] | None:
        if is_hub_ref(ref):
            return None
        return expand_entry(self.registry, self.registry.get(ref), weight)


def expand_entry(registry: AdapterRegistry, entry: RegistryEntry, weight: float, *, hub: tuple[str, str] | None = None) -> list[Member]:
    """``entry`` as members: an adapter is itself; a named stack its pinned members (each checked to
    be the bytes it was pinned to); anything else is refused. ``hub``: ``(repo_id, commit)`` of a Hub
    snapshot registry, which the members' labels and pinned references name."""

    def member(adapter: RegistryEntry, w: float) -> Member:
        if hub is None:
            return Member(registry, adapter, w, adapter.ref)
        repo_id, commit = hub
        return Member(registry, adapter, w, f"hub:{repo_id}@{commit}/{adapter.ref}", f"hub:{repo_id}/{adapter.name}@{commit}")

    if entry.kind == "lora":
        return [member(entry, weight)]
    if entry.kind != "stack":
        raise RegistryError(f"registry entry {entry.ref!r} is a {entry.kind}, not an adapter or a stack; pick a lora or stack entry")
    from mnist_peft.registry.stacks import member_entries

    # each member checked to be the adapter the stack pinned (present, its sha256s, the stack's base)
    return [member(adapter, weight * m.weight) for m, adapter in member_entries(registry, entry)]


class HubResolver:
    """Hub references (``hub:OWNER/REPO@vN``, ``@<commit>``, ``hub:OWNER/REPO/NAME@...``), pulled once
    into a cache registry per commit (``<cache_root>/<owner>--<repo>/<commit>``) through
    :func:`~mnist_peft.hub.pull.pull_from_hub` (every file size-capped and sha256-checked) and pinned to
    the commit read: later requests for the reference read no network.

    - The repo's index is read before anything is downloaded: a reference that names no single
      adapter or named stack (a bundle without ``/NAME``, a base) is refused at that point.
    - Pulls of different references run at once; requests for one reference wait for its one pull.
    - A failed pull leaves the cache as it was (a named stack whose members fail is taken out again),
      fails the requests that named it, and is answered from memory for :data:`RETRY_AFTER_S`
      seconds (at most :data:`FAILURES_KEPT` references) before the Hub is asked again.
    - ``token=False`` (the default) reads the Hub without a token, so clients of a server reach only
      public repos, never what the operator's token could read; ``owners`` limits the repos' owners.
    """

    RETRY_AFTER_S = 60.0
    FAILURES_KEPT = 1024

    def __init__(
        self, cache_root: str | os.PathLike[str], *, token: str | bool | None = False, owners: Sequence[str] | None = None
    ) -> None:
        self.cache_root = Path(cache_root)
        self._token = token
        self.owners = frozenset(owners) if owners else None
        self._pinned: dict[str, tuple[AdapterRegistry, str, list[str]]] = {}  # ref -> (snapshot registry, commit, its refs)
        self._failed: dict[str, tuple[float, BaseException]] = {}
        self._pulling: dict[str, threading.Lock] = {}  # one lock per reference being pulled
        self._lock = threading.Lock()  # guards the three dicts; never held across the network

    def __repr__(self) -> str:  # never the token
        return f"HubResolver({str(self.cache_root)!r})"

    def resolve(self, ref: str, weight: float) -> list[Member] | None:
        if not is_hub_ref(ref):
            return None
        repo_id, _, _ = parse_hub_ref(ref)
        if self.owners is not None and repo_id.split("/")[0] not in self.owners:
            raise InvalidArgumentError(f"this server serves Hub adapters of {sorted(self.owners)} only, not of {repo_id.split('/')[0]!r}")
        registry, commit, refs = self._pinned_or_pull(ref)
        members: list[Member] = []
        for local in refs:
            members += expand_entry(registry, registry.get(local), weight, hub=(repo_id, commit))
        return members

    def _pinned_or_pull(self, ref: str) -> tuple[AdapterRegistry, str, list[str]]:
        with self._lock:
            self._raise_if_failed_lately(ref)
            if ref in self._pinned:
                return self._pinned[ref]
            lock = self._pulling.setdefault(ref, threading.Lock())
        with lock:  # a second request for the reference waits here for the first's pull
            with self._lock:
                self._raise_if_failed_lately(ref)
                if ref in self._pinned:
                    return self._pinned[ref]
            try:
                pinned = self._pull(ref)
            except Exception as exc:
                with self._lock:
                    self._failed[ref] = (time.monotonic(), exc)
                    while len(self._failed) > self.FAILURES_KEPT:
                        self._failed.pop(next(iter(self._failed)))
                    self._pulling.pop(ref, None)
                raise
            with self._lock:
                self._pinned[ref] = pinned
                self._pulling.pop(ref, None)
            return pinned

    def _raise_if_failed_lately(self, ref: str) -> None:
        failed = self._failed.get(ref)
        if failed is not None:
            if time.monotonic() - failed[0] < self.RETRY_AFTER_S:
                raise failed[1]
            del self._failed[ref]

    def _pull(self, ref: str) -> tuple[AdapterRegistry, str, list[str]]:
        """Pull ``ref`` into the snapshot registry of the commit its revision is at now."""
        from huggingface_hub import HfApi

        from mnist_peft.errors import HubError
        from mnist_peft.hub.common import head_commit, remote_index

        repo_id, name, rev = parse_hub_ref(ref)
        commit = head_commit(repo_id, rev, token=self._token)
        if not re.fullmatch(r"[0-9a-f]{40}", commit):  # it names a folder below: the Hub's word is checked first
            raise HubError(
                f"the Hub answered {commit[:60]!r} as the commit of {repo_id!r} at {rev}, which is no commit id", repo_id=repo_id
            )
        remote = remote_index(HfApi(token=self._token), repo_id, commit, token=self._token, required=True)
        if name is None:
            if len(remote) != 1:
                listed = sorted(remote)[:10]
                raise InvalidArgumentError(f"{repo_id!r} at {rev} holds {len(remote)} entries {listed}; name one: hub:{repo_id}/NAME@{rev}")
            name = next(iter(remote))
        if name not in remote:
            raise EntryNotFoundError(f"{repo_id!r} at {rev} has no entry {name!r}; it has {sorted(remote)[:10]}", name=name)
        kind = remote[name][0].get("kind")
        if kind not in ("lora", "stack"):
            raise InvalidArgumentError(f"{repo_id}/{name} at {rev} is a {kind}, not an adapter or a named stack: name one of its adapters")
        registry = AdapterRegistry(self.cache_root / repo_id.replace("/", "--") / commit)
        return registry, commit, self._pull_entry(registry, repo_id, commit, name)

    def _pull_entry(self, registry: AdapterRegistry, repo_id: str, commit: str, name: str) -> list[str]:
        """``name`` (and, for a named stack, its members from the same repo) into ``registry``; all or nothing."""
        from mnist_peft.hub.pull import pull_from_hub
        from mnist_peft.registry.stacks import read_stack_members

        result = pull_from_hub(repo_id, registry=registry, names=[name], revision=commit, token=self._token)
        refs = [*result.added, *(registry.get(n).ref for n in result.unchanged)]  # unchanged: this snapshot pulled it before
        stacks = [registry.get(r) for r in refs if registry.get(r).kind == "stack"]
        members = sorted({m.ref.partition("@")[0] for e in stacks for m in read_stack_members(registry, e)} - {name})
        if members:  # a named stack's members come from the same bundle (a bundle push sends them with it)
            try:
                pull_from_hub(repo_id, registry=registry, names=members, revision=commit, token=self._token)
            except Exception:
                for added in result.added:  # the stack alone would be a stack without its members: out again
                    registry.remove(added)
                raise
        return refs


def resolve_ref(resolvers: Sequence[Resolver], ref: str, weight: float) -> list[Member]:
    """The members ``ref`` stands for: the first resolver that knows its kind answers.

    Raises:
        EntryNotFoundError: no resolver takes ``ref`` (a Hub reference on a server that does not allow the Hub).
        And whatever the answering resolver raises (a missing entry, a failed pull, a replaced member).
    """
    for resolver in resolvers:
        members = resolver.resolve(ref, weight)
        if members is not None:
            return members
    if is_hub_ref(ref):
        raise EntryNotFoundError(
            f"{ref[:120]!r} is a Hub reference, and this server does not fetch from the Hub: start it with --allow-hub, "
            "or pull the adapter into the registry (mnist-peft pull) and name it",
            name=ref[:200],
        )
    raise EntryNotFoundError(f"no resolver of this server knows {ref[:120]!r}", name=ref[:200])
