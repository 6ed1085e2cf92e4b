"""``push`` and ``pull``: registry entries to and from a Hugging Face Hub repo (no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .common import UsageError, add_common, add_root, emit, open_registry
from .table import command

__all__ = ["cmd_push", "cmd_pull", "cmd_hub_local"]


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
    "the repo root, each adapter in its own subfolder (PEFT layout), each named stack in its subfolder with the adapter "
    "versions it pins, and index.json with every file's sha256. "
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
    "checked against its sha256 before anything is added (a file larger than the index records is cut off there); a "
    "failed pull changes nothing. Pulled entries record the repo id and commit they came from, and keep their version "
    "numbers where those are free here (else the next one, said in the output).",
    arguments=_hub_arguments(push=False),
    tensors=False,
)
def cmd_pull(args: argparse.Namespace) -> int:
    from mnist_peft.hub.pull import pull_from_hub

    _quiet_hub(args)
    res = pull_from_hub(args.repo_id, registry=open_registry(args), names=args.name, revision=args.revision)
    payload = {
        "repo_id": res.repo_id,
        "revision": res.revision,
        "added": res.added,
        "unchanged": res.unchanged,
        "renumbered": res.renumbered,
        "incomplete_stacks": res.incomplete,
    }
    text = f"pulled {res.repo_id}@{res.revision[:12]}: added {', '.join(res.added) or 'nothing'}"
    if res.unchanged:
        text += f"; already up to date: {', '.join(res.unchanged)}"
    for remote, local in res.renumbered.items():  # versions are never reused: a number used here is not taken again
        text += f"\n{remote} is used here already (versions are never reused), stored as {local}"
    for problem in res.incomplete.values():  # a stack came without (some of) its members: the pull that gets them
        text += f"\nnote: {problem}"
    emit(args, payload, text + f"\nnext: mnist-peft registry list --root {open_registry(args).root}")
    return 0


def _hub_local_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="hub-local", metavar="DIR", help="folder for the Hub's repos and olah's log (default: ./hub-local)")
    p.add_argument("--port", type=int, default=8999, metavar="N", help="port on 127.0.0.1 (default: 8999)")


@command(
    "hub-local",
    help="run a local Hub on 127.0.0.1 to try push and pull without an account",
    description="Start the local Hugging Face Hub the tests use (olah for reads, a small write server in front), on "
    "127.0.0.1 only and without accounts, and keep it running until Ctrl-C (or SIGTERM), which stops both servers. "
    'It needs olah in a venv of its own: `python3 -m venv .olah-venv && .olah-venv/bin/pip install "olah==0.5.4"` '
    "(or MNIST_PEFT_OLAH pointing at its olah-cli). Point push and pull at it with the environment it prints.",
    arguments=_hub_local_arguments,
    tensors=False,
)
def cmd_hub_local(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from mnist_peft.hub.local_hub import HubServer

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be 1 to 65535, got {args.port}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    folder = Path(args.dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    hub = HubServer.start(folder, port=args.port)
    try:
        print(
            f"a local Hub is running at {hub.endpoint} (repos in {folder}); in another shell:\n"
            f"  export HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1\n"
            "  mnist-peft push --repo-id me/mnist-peft\n"
            "  mnist-peft pull --repo-id me/mnist-peft --root pulled\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        while not stop.wait(0.5):  # wakes for the signal handler's event
            pass
    finally:
        hub.stop()
    print("the local Hub stopped", flush=True)
    return 0
