"""The mnist-peft command line: ``main.py`` (parser, dispatch, errors -> exit codes), ``table.py``
(the command table and its ``command`` decorator), ``common.py`` (shared arguments and output), and
one module per topic holding its commands: ``model``, ``adapters``, ``fleet``, ``registry``, ``hub``,
``experiments``, ``app``."""

from .main import COMMANDS, build_parser, command, main

__all__ = ["main", "build_parser", "COMMANDS", "command"]
