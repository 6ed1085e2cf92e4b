"""The ``mnist-peft`` command: a thin table of subcommands over the library.

``main(argv) -> int`` is callable from tests. Library errors become one ``error: ...`` line on
stderr and exit code 1; usage errors exit 2 (argparse); ``train-adapters --allow-partial`` exits 3
when some jobs failed. This module is the one place that maps errors to exit codes. A command that
computes with torch has its ``--base``/``--adapter``/``--resume`` names checked before torch is
imported (:func:`~mnist_peft.cli.common.check_refs`): a mistyped name costs no import.

The commands live in topic modules, each registering its own with the ``command`` decorator
(:mod:`mnist_peft.cli.table`): ``model`` (info, train-base, eval, compare), ``adapters``
(train-adapter, merge, combine), ``fleet`` (train-adapters), ``registry``, ``hub`` (push, pull),
``experiments`` (merge-study, svd, headroom, demo, bench), ``science`` (forgetting-study), ``app`` (ui) and ``serve`` (serve). A new command is an
arguments function and a ``@command`` handler in one of them; a new topic module is one more name
in the import below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from mnist_peft import __version__
from mnist_peft.errors import MnistPeftError, redact_secrets

# Importing a topic module registers its commands in COMMANDS.
from . import adapters, app, experiments, fleet, hub, model, registry, science, serve  # noqa: F401
from .common import UsageError, check_refs, warnings_as_lines
from .table import COMMANDS, Command, command

__all__ = ["main", "build_parser", "COMMANDS", "Command", "command"]

# The order `mnist-peft --help` has always listed the commands in (roughly the order of a first
# session); commands not named here follow in the order their modules register them.
_LISTED_FIRST = (
    "info",
    "train-base",
    "eval",
    "train-adapter",
    "train-adapters",
    "merge",
    "combine",
    "merge-study",
    "registry",
    "push",
    "pull",
    "svd",
    "headroom",
    "demo",
    "compare",
    "bench",
    "ui",
    "serve",
)


def _listed(commands: dict[str, Command]) -> Iterable[Command]:
    rank = {name: i for i, name in enumerate(_LISTED_FIRST)}
    return sorted(commands.values(), key=lambda c: rank.get(c.name, len(rank)))  # stable: the rest keep their order


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _line(f"{message} (see `{self.prog} --help`)"))


def _line(message: str) -> str:
    """An ``error:`` line as the CLI prints it: one line, never a token (a server may echo one)."""
    return "error: " + redact_secrets(" ".join(message.split())) + "\n"


def _debug_traceback(exc: BaseException) -> int:
    """``MNIST_PEFT_DEBUG=1``: the whole traceback (chained causes included), tokens redacted; exit 1."""
    import traceback

    sys.stderr.write(redact_secrets("".join(traceback.format_exception(exc))))
    return 1


def _flush_denormals() -> None:
    """Import torch and flush subnormal floats to zero, before torch starts its worker threads."""
    import torch

    # Late in training, Adam's moments and small gradients become subnormal floats, which x86 CPUs
    # handle ~4x slower (the seed recipe: 82 s -> 23 s). Flushing them to zero changes no result a
    # test set can see. It must happen before PyTorch starts its worker threads, which copy the
    # setting when they are created: hence in main, before the handler, and not inside fit().
    torch.set_flush_denormal(True)


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-peft`` parser: one subcommand per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="mnist-peft",
        description="Train, store, merge and share LoRA adapters for an MNIST MLP, on PEFT conventions.",
        epilog="Run `mnist-peft COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"mnist-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in _listed(COMMANDS):
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        c.arguments(p)
        p.set_defaults(handler=c.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every line printed below goes through redact_secrets: a Hub server's error may echo a token.
    try:
        with warnings_as_lines():  # a library warning is one `warning: ...` line, like an error
            if COMMANDS[args.command].tensors:
                check_refs(args)  # a mistyped --base/--adapter is said now, not after torch's import (seconds)
                _flush_denormals()
            return args.handler(args)
    except UsageError as exc:
        parser.exit(2, _line(str(exc)))
    except BrokenPipeError:  # e.g. `mnist-peft registry list | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MnistPeftError, ValueError, OSError) as exc:
        if os.environ.get("MNIST_PEFT_DEBUG"):
            return _debug_traceback(exc)
        sys.stderr.write(_line(str(exc)))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(_line("interrupted"))
        return 130
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if os.environ.get("MNIST_PEFT_DEBUG"):
            return _debug_traceback(exc)
        sys.stderr.write(
            _line(f"unexpected {type(exc).__name__}: {exc} (a bug: rerun with MNIST_PEFT_DEBUG=1 for the traceback and report it)")
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
