"""The Gradio web app (``mnist-peft ui``): the test images the base gets wrong and the adapters that fix
them; draw a digit, switch adapters on, see what they change (each digit's log-odds).

A Gradio app (what a Hugging Face Space runs) over a registry, read-only: it lists, verifies and
loads entries, and never writes or deletes anything in the registry. ``drawing`` turns a drawing
into an MNIST-like input; ``tabs/`` holds one module per tab (Draw, Test images, Registry) behind
the :class:`~mnist_peft.app.tabs.base.Tab` interface; ``page`` assembles the page from a tab table
and the ``/predict`` endpoint (``api``); ``launch`` serves it; ``load`` load-tests it. Every
prediction goes through the serving engine (:mod:`mnist_peft.serving`) in batched, mixed-adapter
forwards. Importing this package imports no gradio: building or serving the page does (the
``[ui]`` extra).
"""

from __future__ import annotations

from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.requests import image_to_input
from mnist_peft.serving.stacks import Stack, check_stack, format_stack, parse_stack, stack_items

from .api import API_NAME, UNBATCHED_API_NAME
from .blocks import check_serving_options, require_gradio
from .context import AppContext
from .drawing import EditorPayload, drawing_to_ink, preprocess_drawing
from .handlers import UiHandlers
from .launch import RunningApp, launch, serve, spawn_app
from .load import LoadReport, run_load
from .page import DEFAULT_TABS, build_app
from .tabs.base import Page, Tab

__all__ = [
    "API_NAME",
    "UNBATCHED_API_NAME",
    "preprocess_drawing",
    "drawing_to_ink",
    "image_to_input",
    "EditorPayload",
    "parse_stack",
    "check_stack",
    "stack_items",
    "format_stack",
    "Stack",
    "Predictor",
    "AppContext",
    "UiHandlers",
    "Tab",
    "Page",
    "DEFAULT_TABS",
    "build_app",
    "launch",
    "serve",
    "RunningApp",
    "check_serving_options",
    "spawn_app",
    "require_gradio",
    "LoadReport",
    "run_load",
]
