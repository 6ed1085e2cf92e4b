"""``ui``: the Gradio web app over the registry."""

from __future__ import annotations

import argparse
import sys
import time

from .common import UsageError, add_common, add_root
from .table import command

__all__ = ["cmd_ui"]


def _ui_arguments(p: argparse.ArgumentParser) -> None:
    add_root(p)
    p.add_argument("--base", default="base", metavar="REF", help="the base model: registry name, folder or Hub repo id (default: base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default: the first free one from 7860)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="requests the queue batches into one forward (default 32)")
    p.add_argument("--cache-mb", type=float, default=64.0, metavar="MB", help="memory budget of the loaded adapter stacks (default 64)")
    add_common(p, json_flag=False)


@command(
    "ui",
    help="the web app: draw a digit, switch adapters on, watch the probabilities move",
    description="Start a Gradio app over the registry (read-only): draw a digit and compare the base's probabilities "
    "with those of a weighted stack of adapters; browse the test images the base gets wrong and the adapters that "
    "fix them; the registry's entries, verify status and adapter x digit heat map. Requests from all users are "
    "batched into one mixed-adapter forward; the /predict endpoint serves gradio_client. Needs the ui extra "
    "(pip install -e '.[ui]'). Ctrl-C stops it.",
    arguments=_ui_arguments,
)
def cmd_ui(args: argparse.Namespace) -> int:
    import math

    from mnist_peft.app.blocks import require_gradio
    from mnist_peft.app.launch import launch

    require_gradio()  # before loading anything (main checked --base by name only): a missing extra is said first
    if args.port is not None and not 0 < args.port < 65536:  # every option is checked before the registry and base load
        raise UsageError(f"--port {args.port} is not a port number (1..65535)")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size {args.max_batch_size} is not a batch size: give an integer >= 1 (default 32)")
    if not (math.isfinite(args.cache_mb) and args.cache_mb >= 0):
        raise UsageError(f"--cache-mb {args.cache_mb} is not a memory budget: give a finite number of MB >= 0 (default 64)")
    running = launch(
        args.root,
        base=args.base,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        data_dir=args.data_dir,
    )
    registry = running.handlers.registry.root
    print(f"mnist-peft ui: serving {running.url} (registry {registry}, read-only; Ctrl-C stops it)", flush=True)
    try:
        while running.app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        running.close()
    return 0
