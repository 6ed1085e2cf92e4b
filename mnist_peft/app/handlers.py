"""The built-in tabs' handlers bound to one :class:`~mnist_peft.app.context.AppContext`: what the page's
events call (through this object, so a test can hold or count a tab's batches) and what the tests
call directly. Each handler's body lives in its tab's module; a new tab brings its own handlers and
does not change this class. No gradio here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .context import AppContext
from .tabs import draw as draw_tab
from .tabs import registry as registry_tab
from .tabs import test_images as test_images_tab

__all__ = ["UiHandlers"]


@dataclass
class UiHandlers(AppContext):
    """The app's handlers as plain functions of plain values (what the page's events call).

    Batched handlers take one list per input and return one list per output, as Gradio's
    ``batch=True`` requires.

    Example:
        >>> handlers = UiHandlers(Predictor(AdapterRegistry("adapters")))
        >>> gallery, table, indices = handlers.wrong_images("9")
    """

    # -- Draw
    def draw(self, drawings: Sequence[object], *slots: Sequence[object]) -> tuple[list, ...]:
        """Batched: see :func:`mnist_peft.app.tabs.draw.draw`."""
        return draw_tab.draw(self, drawings, *slots)

    def api(self, images: list[list[float]], adapters: list[str]) -> tuple[list[dict[str, Any]]]:
        """Batched ``/predict``: see :meth:`~mnist_peft.serving.engine.Predictor.answer`."""
        return (self.predictor.answer(images, adapters),)

    # -- Test images
    def wrong_images(self, digit: object) -> tuple[list[tuple[Any, str]], list[list[object]], list[int]]:
        """See :func:`mnist_peft.app.tabs.test_images.wrong_images`."""
        return test_images_tab.wrong_images(self, digit)

    def image_detail(self, digit: object, index: int) -> list[list[object]]:
        """See :func:`mnist_peft.app.tabs.test_images.image_detail`."""
        return test_images_tab.image_detail(self, digit, index)

    # -- Registry
    def registry_table(self) -> list[list[object]]:
        """See :func:`mnist_peft.app.tabs.registry.registry_table`."""
        return registry_tab.registry_table(self)

    def heatmap(self) -> tuple[Any, list[list[object]]]:
        """See :func:`mnist_peft.app.tabs.registry.heatmap`."""
        return registry_tab.heatmap(self)
