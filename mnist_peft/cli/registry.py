"""``registry``: list, show, verify, add, remove and export entries of the local adapter registry (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from .common import UsageError, add_common, add_root, emit, open_registry
from .table import command

__all__ = ["cmd_registry"]


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "verify", "rm", "add", "export"], help="what to do")
    p.add_argument("name", nargs="?", metavar="NAME", help="entry name or name@version (show, rm, add); the output file (export)")
    p.add_argument("path", nargs="?", metavar="PATH", help="folder to add (add)")
    add_root(p)
    add_common(p, data=False)


@command(
    "registry",
    help="list, show, verify, add or remove registry entries",
    description="The local adapter registry (default ./adapters): versioned bases and adapters with sha256 of every "
    "file and the base fingerprint, indexed in index.db (SQLite). 'verify' checks every file and exits 1 if any entry "
    "is bad. 'export [FILE]' writes the index as index.json, the exchange format (default: <root>/index.json).",
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
        entry = reg.get(args.name)
        versions = [e.version for e in reg.list() if e.name == entry.name]
        payload = {**entry.to_dict(), "versions": versions, "folder": str(reg.root / entry.path)}
        emit(args, payload, json.dumps(payload, indent=2, sort_keys=True))
        return 0
    if args.action == "add":
        if not args.path:
            raise UsageError("registry add needs NAME and PATH (a base or adapter folder)")
        entry = reg.add(args.name, args.path)
        emit(args, entry.to_dict(), f"added {entry.ref} ({entry.adapter_type or entry.kind}) to {reg.root}")
        return 0
    gone = reg.remove(args.name)  # rm
    emit(args, {"removed": [e.ref for e in gone]}, f"removed {', '.join(e.ref for e in gone)}")
    return 0
