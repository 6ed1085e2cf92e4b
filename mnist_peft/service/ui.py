"""The Gradio app (``mnist-peft ui``) inside the service: :func:`build_ui` builds it over the service's
own engine (one model, one stack cache for the page and the API), :func:`mount_ui` mounts it on the
API's FastAPI app with the settings ``mnist-peft ui`` serves it with (no share link, no telemetry, no
server-side rendering, no run history, no monitoring page, uploads up to 10 MB, bounded sessions).
"""

from __future__ import annotations

import os
from typing import Any

from mnist_peft.app.blocks import require_gradio
from mnist_peft.app.handlers import UiHandlers
from mnist_peft.app.launch import SESSION_CAPACITY
from mnist_peft.app.page import build_app
from mnist_peft.serving.engine import Predictor

__all__ = ["build_ui", "gradio_available", "mount_ui"]


def gradio_available() -> bool:
    """Whether the ``[ui]`` extra is installed (the service then serves the app at ``/ui``)."""
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


def build_ui(predictor: Predictor, *, max_batch_size: int = 32) -> Any:
    """The app's Blocks over ``predictor`` (the service's engine), not yet mounted.

    Raises:
        MnistPeftError: gradio is not installed.
    """
    require_gradio()
    # As mnist-peft ui: the summary gradio's queue rebuilds for its /monitoring page (off) is not rebuilt.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
    return build_app(UiHandlers(predictor), max_batch_size=max_batch_size)


def mount_ui(api: Any, blocks: Any, *, path: str = "/ui") -> None:
    """Mount ``blocks`` on the FastAPI app ``api`` at ``path``, configured as ``mnist-peft ui`` serves it."""
    gr = require_gradio()
    blocks.state_session_capacity = SESSION_CAPACITY  # read when the mount creates the app's state holder
    gr.mount_gradio_app(
        api,
        blocks,
        path,
        server_name="127.0.0.1",
        footer_links=["api", "settings"],
        run_history=False,
        show_error=False,  # an error escaping the app's gate is told as "Error", never its text
        max_file_size="10mb",
        ssr_mode=False,
        enable_monitoring=False,
        pwa=False,
        mcp_server=False,
    )
