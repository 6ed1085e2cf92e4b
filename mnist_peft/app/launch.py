"""Starting the app: :func:`launch` opens a registry (read-only), loads its base into the serving
engine and :func:`serve` s the page on 127.0.0.1 in a background thread (:class:`RunningApp`);
:func:`spawn_app` runs the real ``mnist-peft ui`` command in a subprocess (what the tests and
``mnist-peft bench`` measure). gradio is imported only when one of them runs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_peft.errors import MnistPeftError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.cache import DEFAULT_CACHE_BYTES
from mnist_peft.serving.engine import Predictor

from .blocks import DEFAULT_MAX_BATCH, check_serving_options, require_gradio
from .handlers import UiHandlers
from .page import DEFAULT_TABS, build_app
from .tabs.base import Tab

__all__ = ["SESSION_CAPACITY", "RunningApp", "launch", "serve", "spawn_app", "spawn_command"]

# Sessions whose state gradio keeps (the oldest go first): each holds a copy of every component's
# config and its last values, ~75 KB fresh and ~100 KB after a /predict (measured). Gradio's default,
# 10,000, lets clients that each open a session (a session id is the client's to choose) hold ~1 GB;
# 1,000 bounds it near 100 MB. A session pushed out only loses the Test images tab's gallery, picked again.
SESSION_CAPACITY = 1000


@dataclass
class RunningApp:
    """A launched app: its URL and how to stop it."""

    app: Any
    url: str
    handlers: UiHandlers

    def close(self) -> None:
        self.app.close(verbose=False)


def launch(
    root: str | os.PathLike[str] | None = None,
    *,
    base: str = "base",
    host: str = "127.0.0.1",
    port: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    data_dir: str | None = None,
    tabs: Sequence[Tab] = DEFAULT_TABS,
) -> RunningApp:
    """Open the registry at ``root`` (read-only), load its ``base`` and :func:`serve` the app
    (its page holds ``tabs``, in order).

    Raises:
        InvalidArgumentError: ``max_batch_size`` < 1 or ``cache_bytes`` < 0 (said before anything loads).
        MnistPeftError: gradio is not installed; the registry or its base is missing or bad.
    """
    require_gradio()
    check_serving_options(max_batch_size=max_batch_size, cache_bytes=cache_bytes)
    registry = AdapterRegistry(root)
    registry.list()  # a missing or invalid registry is an error now, not on the first request
    handlers = UiHandlers(Predictor(registry, base, cache_bytes=cache_bytes, data_dir=data_dir))
    return serve(handlers, host=host, port=port, max_batch_size=max_batch_size, tabs=tabs)


def serve(
    handlers: UiHandlers,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    tabs: Sequence[Tab] = DEFAULT_TABS,
) -> RunningApp:
    """Start the app (:func:`~mnist_peft.app.page.build_app` over ``handlers``, one tab per entry
    of ``tabs``) on ``host:port`` in a background thread (``port=None``:
    gradio picks one from 7860 up); ``.close()`` stops it. No share link, no telemetry, no
    server-side rendering, no run history, no monitoring page: the app calls nothing outside this
    machine (and on 127.0.0.1, the default, nothing outside it can call the app)."""
    # After every event gradio's queue rebuilds a pandas summary of up to 10,000 past events for its
    # /monitoring page (a third of its CPU per request here); the page is off, so is the summary.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
    app = build_app(handlers, max_batch_size=max_batch_size, tabs=tabs)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        share=False,
        ssr_mode=False,
        quiet=True,
        show_error=False,  # an error escaping the gate (the app's process_api) is told as "Error", never its text
        run_history=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        max_file_size="10mb",
        state_session_capacity=SESSION_CAPACITY,  # a drawing upload is ~20 KB; a huge one is refused before it is decoded
        footer_links=["api", "settings"],
    )
    return RunningApp(app, f"http://{host}:{app.server_port}/", handlers)


@contextlib.contextmanager
def spawn_app(
    root: str | os.PathLike[str],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """``mnist-peft ui --root ROOT`` in a subprocess on 127.0.0.1 and a free port; yields its URL
    once it serves, and stops it afterwards (what the tests and ``mnist-peft bench`` measure: the
    real command, in a process of its own). Its output goes to ``log`` (default: a temporary file).

    Raises:
        MnistPeftError: it exited or did not serve within ``timeout`` seconds (with its output's tail).
    """
    with spawn_command("ui", root, args=args, env=env, log=log, timeout=timeout) as url:
        yield url


@contextlib.contextmanager
def spawn_command(
    command: str,
    root: str | os.PathLike[str],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """``mnist-peft COMMAND --root ROOT`` (a server that prints ``serving http://127.0.0.1:PORT/``: ``ui``,
    ``serve``) in a subprocess on 127.0.0.1 and a free port; yields its URL once it serves, and stops it
    (SIGTERM, then SIGKILL after 30 s) afterwards. Its output goes to ``log`` (default: a temporary file).

    Raises:
        MnistPeftError: it exited or did not serve within ``timeout`` seconds (with its output's tail).
    """
    import re
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port (another program could take it first: then the command exits, and we say so)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"mnist-peft-{command}-"))) / "server.log"
        log = Path(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mnist_peft", command, "--root", str(root), "--host", "127.0.0.1", "--port", str(port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})},
            )
        try:
            deadline = time.monotonic() + timeout
            while not (match := re.search(r"serving (http://127\.0\.0\.1:\d+/)", log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise MnistPeftError(f"mnist-peft {command} did not start (exit code {proc.poll()}): {log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield match.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
