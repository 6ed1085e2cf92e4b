"""The page: a header, one ``gr.Tab`` per entry of a tab table (:data:`DEFAULT_TABS`, or the ``tabs``
given to :func:`build_app`), and the ``/predict`` endpoints. A new tab is an object with a ``title``
and a ``build(page)`` (:class:`~mnist_peft.app.tabs.base.Tab`) added to the table; nothing here changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .api import API_NAME, UNBATCHED_API_NAME, api_function
from .blocks import DEFAULT_MAX_BATCH, check_serving_options, isolating_blocks, public_errors, require_gradio
from .handlers import UiHandlers
from .tabs.base import MODEL_QUEUE, Page, Tab
from .tabs.draw import DrawTab
from .tabs.registry import RegistryTab
from .tabs.test_images import TestImagesTab

__all__ = ["DEFAULT_TABS", "LEAD", "build_app"]

DEFAULT_TABS: tuple[Tab, ...] = (DrawTab(), TestImagesTab(), RegistryTab())
# What a newcomer reads first (when the page has the Test images tab): where adapters visibly fix things.
LEAD = (
    "**Start with Test images**: the test images the base gets wrong, and which adapter fixes each. "
    "**Draw** runs your own digit through up to three adapters; **Registry** lists the entries and "
    "shows what each adapter changes per digit against the base."
)


def build_app(handlers: UiHandlers, *, max_batch_size: int = DEFAULT_MAX_BATCH, tabs: Sequence[Tab] = DEFAULT_TABS) -> Any:
    """The Gradio Blocks app over ``handlers`` (not launched), one tab per entry of ``tabs`` in order.
    See :func:`mnist_peft.app.launch.launch`.

    Every tab builds with the same :class:`~mnist_peft.app.tabs.base.Page` (``page.handlers`` is
    ``handlers``: the engine and the registry, and the built-in tabs' and ``/predict``'s handlers).

    Example:
        >>> app = build_app(UiHandlers(predictor), tabs=[*DEFAULT_TABS, About()])
    """
    gr = require_gradio()
    check_serving_options(max_batch_size=max_batch_size)
    # delete_cache: the images the app renders for the page are temporary files; drop them after an hour.
    with isolating_blocks(gr)(title="mnist-peft: LoRA adapters on MNIST", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# mnist-peft: LoRA adapters on MNIST\nBase `{handlers.predictor.base_ref}` "
            f"(fingerprint `{handlers.predictor.fingerprint[:12]}`) from the registry at `{handlers.registry.root}` (read-only)."
            + (f"\n\n{LEAD}" if any(isinstance(tab, TestImagesTab) for tab in tabs) else "")
        )
        app.public_root = handlers.registry.root  # the gate writes it <registry> in whatever the app tells a client
        page = Page(gr, app, handlers, public_errors(handlers, gr), max_batch_size)
        for tab in tabs:
            with gr.Tab(tab.title):
                tab.build(page)
        page.finish()  # events that join tabs: each page load, and each Verify press, reads the registry again
        gr.api(api_function(handlers, batched=True), api_name=API_NAME, batch=True, max_batch_size=max_batch_size, **MODEL_QUEUE)
        gr.api(api_function(handlers, batched=False), api_name=UNBATCHED_API_NAME, api_visibility="undocumented", **MODEL_QUEUE)
    app.queue(default_concurrency_limit=4, max_size=1024)  # a flood of requests is refused, not held in memory
    return app
