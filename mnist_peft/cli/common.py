"""What the command modules share: ``--json``/text output, the argument groups several commands
take (``--root``, ``--base``/``--adapter``/``--weight``, ``--recipe`` and its overrides, ``--data-dir``),
resolving ``--base``/``--adapter`` refs through the registry, ``--out``/``--register`` handling, and
:class:`UsageError` (exit 2). Nothing here imports torch at module level: the torch-free commands
(``registry``, ``push``, ``pull``) import this module too."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "UsageError",
    "warnings_as_lines",
    "show_progress",
    "emit",
    "fmt_ints",
    "open_registry",
    "registry_path",
    "resolve_base",
    "resolve_adapter",
    "check_refs",
    "register_output",
    "out_folder",
    "model_from_args",
    "add_common",
    "add_root",
    "add_model_args",
    "add_overrides",
    "LazyChoices",
    "add_recipe",
    "fraction",
]


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside: each library warning (e.g. ``registry.writes.DigitMismatchWarning``) is printed as one
    ``warning: ...`` line on stderr, without Python's file and source line."""
    import sys
    import warnings

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
        from mnist_peft.errors import redact_secrets

        print("warning: " + redact_secrets(" ".join(str(message).split())), file=sys.stderr)

    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.showwarning = show
        yield


def show_progress(args: argparse.Namespace) -> bool:
    """Whether long work shows progress: a bar on a terminal, a plain line every few seconds when
    output is a pipe or a file (mnist_peft/progress.py); nothing with ``--quiet`` or ``--json``."""
    return not (getattr(args, "quiet", False) or getattr(args, "json", False))


class UsageError(Exception):
    """A bad combination of flags: ``main`` prints it as one ``error:`` line and exits 2, like argparse."""


def emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    """One JSON object with ``--json``, else human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(text)


def fmt_ints(values: Sequence[int]) -> str:
    return " ".join(str(v) for v in values)


def open_registry(args: argparse.Namespace):
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    return AdapterRegistry(getattr(args, "root", None))


def registry_path(arg: str, args: argparse.Namespace, kind: str) -> Path | None:
    from mnist_peft.registry.refs import registry_folder

    return registry_folder(arg, open_registry(args), kind)


def resolve_base(arg: str, args: argparse.Namespace):
    """``--base``: see :func:`mnist_peft.registry.refs.resolve_base`."""
    from mnist_peft.registry.refs import resolve_base as resolve_base_ref

    return resolve_base_ref(arg, open_registry(args))


def resolve_adapter(arg: str, args: argparse.Namespace) -> Path:
    """``--adapter``: see :func:`mnist_peft.registry.refs.resolve_adapter`."""
    from mnist_peft.registry.refs import resolve_adapter as resolve_adapter_ref

    return resolve_adapter_ref(arg, open_registry(args))


def check_refs(args: argparse.Namespace) -> None:
    """Check ``--base``, ``--adapter`` and ``--resume`` with the registry's own resolver before torch is
    imported (``main`` calls it first): a mistyped name, a missing version or a wrong kind is said
    at once, in the same words the resolution would use seconds later, naming the entries there are.
    Nothing is loaded; a Hub repo id is not asked for. Where there is no registry folder at all, the
    command says so itself, after its own flag checks (a usage error, exit 2, comes first)."""
    from mnist_peft.registry.refs import check_base_ref
    from mnist_peft.registry.refs import resolve_adapter as resolve_adapter_ref

    registry = open_registry(args)
    if not registry.root.is_dir():
        return
    base = getattr(args, "base", None)
    if isinstance(base, str):
        check_base_ref(base, registry)
    resume = getattr(args, "resume", None)
    for ref in [*(getattr(args, "adapter", None) or []), *([resume] if resume else [])]:
        resolve_adapter_ref(ref, registry)


def register_output(args: argparse.Namespace, folder: Path, metrics: dict, digit: int | None = None) -> dict | None:
    """``--register NAME``: add the folder just written to the registry as a new version."""
    name = getattr(args, "register", None)
    if not name:
        return None
    entry = open_registry(args).add(name, folder, metrics=metrics, digit=digit)
    return {"name": entry.name, "version": entry.version, "root": str(open_registry(args).root)}


def out_folder(args: argparse.Namespace) -> tuple[Path, object]:
    """``--out`` if given (must be empty unless --force); else a temporary folder (with --register)."""
    import tempfile

    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.force:
            raise UsageError(f"output folder {str(out)!r} is not empty; pass --force to overwrite it")
        return out, None
    if not getattr(args, "register", None):
        raise UsageError("give --out DIR, --register NAME, or both")
    tmp = tempfile.TemporaryDirectory(prefix="mnist-peft-")
    return Path(tmp.name) / "out", tmp


def model_from_args(args: argparse.Namespace):
    """The base, with ``--adapter``/``--weight`` loaded as a stack (and merged with ``--merged``)."""
    from mnist_peft.io.adapters import load_stack

    base = resolve_base(args.base, args)
    adapters = getattr(args, "adapter", None) or []
    if not adapters:
        if getattr(args, "weight", None):
            raise UsageError("--weight needs --adapter")
        return base
    model = load_stack(base, [resolve_adapter(a, args) for a in adapters], args.weight or None, force=args.force)
    if getattr(args, "merged", False):
        model.merge()
    return model


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True, data: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if data:
        p.add_argument(
            "--data-dir",
            metavar="DIR",
            help="MNIST data root (default: $MNIST_PEFT_DATA, else a per-user cache folder)",
        )


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help="adapter registry folder (default: $MNIST_PEFT_ADAPTERS, else ./adapters)")


def add_model_args(p: argparse.ArgumentParser, *, adapter_required: bool = False) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name (e.g. base), or Hub repo id")
    p.add_argument(
        "--adapter",
        action="append",
        required=adapter_required,
        metavar="PATH",
        help="adapter folder or registry name (name or name@version); repeat to stack several",
    )
    add_root(p)
    p.add_argument("--weight", action="append", type=float, metavar="W", help="stack weight of each --adapter, in order (default 1)")
    p.add_argument("--force", action="store_true", help="load adapters even if trained on another base (fingerprint mismatch)")


def add_overrides(p: argparse.ArgumentParser) -> None:
    """What every recipe lets a run override (unset: the recipe's value)."""
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (samples per step)")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--seed", type=int, help="override the recipe's random seed")


class LazyChoices:
    """Choices looked up only when argparse checks a value or prints help, so that building the
    parser (every run) imports nothing heavy: the recipes and merge methods live beside torch."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


def _recipe_names(kind: str) -> list[str]:
    from mnist_peft.training.recipes import recipe_names

    return recipe_names(kind)  # type: ignore[arg-type]


def add_recipe(p: argparse.ArgumentParser, kind: str, *, default: str) -> None:
    """``--recipe``: the choices are the registered recipes of ``kind`` (:mod:`mnist_peft.training.recipes`)."""
    p.add_argument(
        "--recipe",
        choices=LazyChoices(lambda: _recipe_names(kind)),  # type: ignore[arg-type]
        metavar="NAME",  # argparse would list the choices in the usage line, importing them on every run
        default=default,
        help=f"a registered {kind} recipe: %(choices)s (default: %(default)s; `mnist-peft info` describes them)",
    )


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.4") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]; give a fraction such as 0.4 (40%)")
    return value
