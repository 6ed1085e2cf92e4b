"""What a tab of the page implements (:class:`Tab`) and what it builds with (:class:`Page`).

A tab is an object with a ``title`` and a ``build(page)`` that lays out its components (the page
has already opened the ``gr.Tab(title)`` they go in) and wires their events to its handlers, plain
functions of plain values over the app's shared state (``page.handlers``, an
:class:`~mnist_peft.app.context.AppContext`). The page (:func:`mnist_peft.app.page.build_app`)
builds each tab of its table in order. No gradio import here: ``page.gr`` is the module.

Example:
    >>> class About:
    ...     title = "About"
    ...     def build(self, page: Page) -> None:
    ...         out = page.gr.Markdown()
    ...         page.gr.Button("Hello").click(page.public(lambda: "hello"), None, [out], api_name="hello")
    >>> build_app(handlers, tabs=[*DEFAULT_TABS, About()])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["MODEL_QUEUE", "Page", "Tab"]

MODEL_QUEUE: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "model"}  # one batch at a time: the model has one state


@runtime_checkable
class Tab(Protocol):
    """One tab of the page."""

    title: str
    """The tab's label on the page."""

    def build(self, page: Page) -> None:
        """Lay out the tab's components (inside its ``gr.Tab``) and wire their events."""
        ...


@dataclass
class Page:
    """What a tab builds with: one per :func:`~mnist_peft.app.page.build_app` call."""

    gr: Any
    """The gradio module (the page imports it; a tab module needs no gradio import)."""
    app: Any
    """The ``gr.Blocks`` being built, for page-level events (``page.app.load``)."""
    handlers: Any
    """The app's shared state, an :class:`~mnist_peft.app.context.AppContext` (the engine, the
    registry); ``build_app`` gets a :class:`~mnist_peft.app.handlers.UiHandlers`, which also holds
    the built-in tabs' handlers."""
    public: Callable[[Callable[..., Any]], Callable[..., Any]]
    """Wraps a handler so its library errors reach the browser as ``gr.Error``, paths hidden."""
    max_batch_size: int
    """The largest batch a batched event (``batch=True``) takes."""
    model_queue: dict[str, Any] = field(default_factory=lambda: dict(MODEL_QUEUE))
    """Keywords for an event that runs the model: one such event at a time."""
    _refreshers: list[tuple[Callable[[], Any], list[Any]]] = field(default_factory=list, repr=False)
    _triggers: list[Any] = field(default_factory=list, repr=False)

    def on_registry_change(self, fn: Callable[[], Any], outputs: list[Any]) -> None:
        """Run ``fn`` (no inputs) into ``outputs`` on each page load and on each trigger that
        :meth:`rereads_registry` names: what a tab shows of the registry (its choices) stays current."""
        self._refreshers.append((fn, outputs))

    def rereads_registry(self, trigger: Any) -> None:
        """A button (any component with ``click``) whose click makes every tab read the registry again."""
        self._triggers.append(trigger)

    def finish(self) -> None:
        """Wire the refreshers to their triggers and to the page load (after every tab is built)."""
        for fn, outputs in self._refreshers:
            for trigger in self._triggers:
                trigger.click(self.public(fn), None, outputs, api_visibility="private")
            self.app.load(self.public(fn), None, outputs, api_visibility="private")
