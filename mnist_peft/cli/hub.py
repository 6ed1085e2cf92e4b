"""``push`` and ``pull``: registry entries to and from a Hugging Face Hub repo (no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .common import UsageError, add_common, add_root, emit, open_registry
from .table import command

__all__ = ["cmd_push", "cmd_pull"]


def _quiet_hub(args: argparse.Namespace) -> None:
    from huggingface_hub.utils import disable_progress_bars

    from mnist_peft.fileio import progress_enabled  # torch-free: push and pull start without torch

    if not progress_enabled(getattr(args, "quiet", False)):
        disable_progress_bars()


def _hub_arguments(push: bool) -> Callable[[argparse.ArgumentParser], None]:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo-id", required=True, metavar="ID", help="Hub repository, e.g. your-name/mnist-peft")
        name_help = (
            "entry to push (name, or name@version for an older one); repeat; default: the latest of all"
            if push
            else "entry to pull; repeat; default all. NAME@N pulls tag vN of a per-adapter repo (a bundle repo keeps one "
            "version of each entry: pull an older one with --revision)"
        )
        p.add_argument("--name", action="append", metavar="NAME", help=name_help)
        p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
        if push:
            p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
            p.add_argument(
                "--per-adapter",
                action="store_true",
                help="also publish each adapter as its own repo ID-NAME, Hub-native: the adapter at the root, a card with "
                "base_model: ID and base_model_relation: adapter, every registry version as a tag vN (the base goes to ID)",
            )
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_root(p)
        add_common(p, data=False)

    return arguments


@command(
    "push",
    help="push registry entries to a Hugging Face Hub repo",
    description="Push the latest version of every registry entry (or --name ones) to a Hub repo in one commit: the base at "
    "the repo root, each adapter in its own subfolder (PEFT layout), and index.json with every file's sha256. "
    "The commit names the head it was built on; if another push lands first, the index is re-read, re-merged "
    "and committed again, so concurrent pushers lose nothing. Uses HF_TOKEN / `hf auth login`; HF_ENDPOINT "
    "selects another Hub.",
    arguments=_hub_arguments(push=True),
    tensors=False,
)
def cmd_push(args: argparse.Namespace) -> int:
    from mnist_peft.hub.push import push_adapters_to_hub, push_to_hub

    _quiet_hub(args)
    if args.per_adapter:
        if args.revision:
            raise UsageError("--per-adapter pushes to each repo's main branch and tags versions; drop --revision")
        results = push_adapters_to_hub(args.repo_id, registry=open_registry(args), names=args.name, private=args.private)
        payload = {"repos": [{"repo_id": r.repo_id, "commit": r.commit, "pushed": r.pushed} for r in results]}
        lines = [f"{r.repo_id}: {', '.join(r.pushed) or 'up to date'}" for r in results]
        lines.append(f"next: mnist-peft pull --repo-id {results[-1].repo_id} --name NAME@VERSION --root OTHER_DIR")
        emit(args, payload, "\n".join(lines))
        return 0
    res = push_to_hub(args.repo_id, registry=open_registry(args), names=args.name, revision=args.revision, private=args.private)
    payload = {"repo_id": res.repo_id, "commit": res.commit, "pushed": res.pushed}
    emit(
        args,
        payload,
        f"pushed {', '.join(res.pushed)} to {res.repo_id} (commit {res.commit[:12]})\n"
        f"next: mnist-peft pull --repo-id {res.repo_id} --root OTHER_DIR",
    )
    return 0


@command(
    "pull",
    help="pull entries from a Hub repo into the registry",
    description="Pull every entry (or --name ones) of a Hub repo at --revision into the local registry. The repo's index.json "
    "is validated as untrusted input (plain file names, the repo layout's own folders, types) and every file is "
    "checked against its sha256 before anything is added; a failed pull changes nothing. Pulled entries record the "
    "repo id and commit they came from.",
    arguments=_hub_arguments(push=False),
    tensors=False,
)
def cmd_pull(args: argparse.Namespace) -> int:
    from mnist_peft.hub.pull import pull_from_hub

    _quiet_hub(args)
    res = pull_from_hub(args.repo_id, registry=open_registry(args), names=args.name, revision=args.revision)
    payload = {"repo_id": res.repo_id, "revision": res.revision, "added": res.added, "unchanged": res.unchanged}
    text = f"pulled {res.repo_id}@{res.revision[:12]}: added {', '.join(res.added) or 'nothing'}"
    if res.unchanged:
        text += f"; already up to date: {', '.join(res.unchanged)}"
    emit(args, payload, text + f"\nnext: mnist-peft registry list --root {open_registry(args).root}")
    return 0
