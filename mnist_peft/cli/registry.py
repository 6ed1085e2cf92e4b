"""``registry``: list, show, verify, add, add-stack, remove and export entries of the local adapter registry
(no torch, but for ``add-stack``, which parses its spec with the serving engine's parser)."""

from __future__ import annotations

import argparse
import json
import sys

from .common import UsageError, add_common, add_root, emit, open_registry
from .table import command

__all__ = ["cmd_registry"]


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "verify", "rm", "add", "add-stack", "export"], help="what to do")
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="entry name or name@version (show, rm); the new entry's name (add, add-stack); the output file (export)",
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH|SPEC",
        help="folder to add (add); the stack (add-stack): comma-separated registry adapters, each name or name@version "
        "with an optional :weight (default 1), e.g. 'digit-9@1:0.5,digit-3'; an unversioned name is pinned to its latest version now",
    )
    p.add_argument("--force", action="store_true", help="rm: remove an adapter even if a stack entry pins it (the stack then fails verify)")
    add_root(p)
    add_common(p, data=False)


@command(
    "registry",
    help="list, show, verify, add or remove registry entries, or record a named stack",
    description="The local adapter registry (default ./adapters): versioned bases, adapters and named stacks with sha256 of "
    "every file and the base fingerprint, indexed in index.db (SQLite). 'verify' checks every file (and every stack's "
    "members) and exits 1 if any entry is bad. 'add-stack NAME SPEC' records a weighted stack of adapter entries, each "
    "pinned to its version and sha256, as the next version of entry NAME (kind 'stack', a stack.json): the serving engine "
    "answers the spec NAME with it, and push/pull move it like any entry; at most 10 adapters, weights in [-10, 10], all "
    "on one base, a DoRA adapter only alone at weight 1. 'rm' refuses an adapter a stack pins (--force to remove it anyway). "
    "'export [FILE]' writes the index as index.json, the exchange format (default: <root>/index.json).",
    arguments=_registry_arguments,
    tensors=False,
)
def cmd_registry(args: argparse.Namespace) -> int:
    reg = open_registry(args)
    if args.action == "list":
        entries = reg.list()
        payload = {"root": str(reg.root), "entries": [e.to_dict() for e in entries]}
        rows = [f"{'entry':<20} {'kind':<5} {'type':<5} {'digit':>5} {'r':>3} {'alpha':>5} {'fingerprint':<14} {'created'}"]
        for e in entries:
            fp = (e.base_fingerprint or "-")[:12]
            rows.append(
                f"{e.ref:<20} {e.kind:<5} {e.adapter_type or '-':<5} {'-' if e.digit is None else e.digit:>5} {e.r or '-':>3} "
                f"{'-' if e.lora_alpha is None else format(e.lora_alpha, 'g'):>5} {fp:<14} {e.created}"
            )
        rows.append(f"{len(entries)} entries in {reg.root}")
        emit(args, payload, "\n".join(rows))
        return 0
    if args.action == "verify":
        problems = reg.verify()
        payload = {
            "root": str(reg.root),
            "entries": len(reg.list()),
            "ok": not problems,
            "problems": [{"entry": r, "problem": p} for r, p in problems],
        }
        text = "\n".join(f"BAD {r}: {p}" for r, p in problems) or f"all {len(reg.list())} entries verified"
        emit(args, payload, text)
        if problems and not args.json:
            print(f"error: {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}; re-add or pull them", file=sys.stderr)
        return 1 if problems else 0
    if args.action == "export":
        target = reg.export_index(args.name)  # NAME is the output file here (default <root>/index.json)
        emit(args, {"index": str(target), "entries": len(reg.list())}, f"wrote {target}")
        return 0
    if not args.name:
        raise UsageError(f"registry {args.action} needs a NAME (or NAME@VERSION)")
    if args.action == "show":
        return _show(args, reg)
    if args.action == "add":
        if not args.path:
            raise UsageError("registry add needs NAME and PATH (a base, adapter or stack folder)")
        entry = reg.add(args.name, args.path)
        emit(args, entry.to_dict(), f"added {entry.ref} ({entry.adapter_type or entry.kind}) to {reg.root}")
        return 0
    if args.action == "add-stack":
        return _add_stack(args, reg)
    if not args.force:
        from mnist_peft.registry.stacks import refuse_pinned

        refuse_pinned(reg, args.name)  # an adapter a stack pins stays, unless --force
    gone = reg.remove(args.name)  # rm
    emit(args, {"removed": [e.ref for e in gone]}, f"removed {', '.join(e.ref for e in gone)}")
    return 0


def _show(args: argparse.Namespace, reg) -> int:
    """``registry show NAME``: the entry, its versions and folder; a stack's members (or what is wrong with them)."""
    from mnist_peft.errors import IntegrityError

    entry = reg.get(args.name)
    versions = [e.version for e in reg.list() if e.name == entry.name]
    payload = {**entry.to_dict(), "versions": versions, "folder": str(reg.root / entry.path)}
    if entry.kind == "stack":
        try:
            payload["members"] = _members(reg, entry)
        except IntegrityError as exc:  # show what is there, and what is wrong with it
            payload["problem"] = str(exc)
    emit(args, payload, json.dumps(payload, indent=2, sort_keys=True))
    return 0


def _members(reg, entry) -> list[dict[str, object]]:
    from mnist_peft.registry.stacks import read_stack_members

    return [{"adapter": m.ref, "weight": m.weight, "adapter_type": m.adapter_type} for m in read_stack_members(reg, entry)]


def _add_stack(args: argparse.Namespace, reg) -> int:
    """``registry add-stack NAME SPEC``: the spec parsed by the engine's own parser (one grammar for
    a spec wherever it is written), the stack checked and recorded by the registry."""
    from mnist_peft.serving.stacks import parse_stack

    if not args.path:
        raise UsageError("registry add-stack needs NAME and SPEC, e.g. registry add-stack mix 'digit-9@1:0.5,digit-3'")
    entry = reg.add_stack(args.name, parse_stack(args.path))  # an empty spec ('none') is refused there: a stack holds 1 to 10
    members = _members(reg, entry)
    label = " + ".join(f"{m['weight']:g} x {m['adapter']}" for m in members)
    emit(args, {**entry.to_dict(), "members": members}, f"added stack {entry.ref} = {label} to {reg.root}")
    return 0
