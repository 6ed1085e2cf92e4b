"""The command table: every ``mnist-peft`` subcommand is one :class:`Command` in :data:`COMMANDS`,
added by the :func:`command` decorator next to its handler in a topic module (``cli/model.py``,
``cli/adapters.py``, ...). ``cli/main.py`` builds the parser from the table and runs the handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Command", "COMMANDS", "command"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help texts, the function that adds its arguments, and its handler."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    tensors: bool = True
    """Whether it computes with torch (then denormals are flushed before torch starts its threads);
    the registry and push commands do not, and start without importing torch at all."""


COMMANDS: dict[str, Command] = {}  # in registration order (main.py sets the order --help lists them in)


def command(name: str, *, help: str, description: str, arguments: Callable[[argparse.ArgumentParser], None], tensors: bool = True):
    """Register the decorated ``cmd_*`` handler as subcommand ``name``: adding a command is its
    arguments function and its handler, side by side, and nothing else."""

    def register(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise RuntimeError(f"two commands named {name!r}")
        COMMANDS[name] = Command(name, help, description, arguments, handler, tensors)
        return handler

    return register
