"""The Draw tab: a sketchpad, up to three adapter pickers with a weight each, the base's
probabilities next to those of the chosen stack, and what the stack changes: each digit's change in
log-odds (:func:`log_odds`), a chart that moves where the probabilities of a clear drawing sit at
~100%. The drawing becomes the model's input as MNIST was made
(:func:`~mnist_peft.app.drawing.preprocess_drawing`); every request of a batch is checked on its
own, and the batch runs in one mixed forward (:meth:`~mnist_peft.serving.engine.Predictor.predict_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.serving.requests import Refused
from mnist_peft.serving.stacks import Stack

from ..context import AppContext
from ..drawing import EditorPayload, preprocess_drawing
from .base import Page

__all__ = [
    "CHANGE_COLUMNS",
    "DECIMALS",
    "DISPLAY_SCALE",
    "ELEM",
    "INTRO",
    "NONE_CHOICE",
    "SLOTS",
    "TABLE_HEADERS",
    "WEIGHT_RANGE",
    "DrawResult",
    "DrawTab",
    "draw",
    "log_odds",
]

SLOTS = 3  # adapter pickers on the Draw tab
WEIGHT_RANGE = (-2.0, 2.0)  # a picker's weight slider; a value outside it is a hand-made request, refused
DISPLAY_SCALE = 8  # the 28 x 28 input is shown 8x, each pixel an 8 x 8 block (exactly recoverable: every 8th pixel)
NONE_CHOICE = "(none)"
DECIMALS = 4  # every number of the table, fixed-point: one format (gradio wrote 1.2e-6 as 0.0000012 and 2.944e-7 as is)
TABLE_HEADERS = ["digit", "p base", "p adapters", "logit base", "logit adapters", "change in log-odds"]
CHANGE_COLUMNS = ["digit", "change in log-odds"]  # the chart's data: digit ("0".."9"), the adapters' log-odds minus the base's
INTRO = (
    "A clearly drawn digit is one the base already gets right at ~100%: an adapter barely moves its "
    "probabilities, and what it changes shows in the **change in log-odds** chart (log p/(1-p) per digit, "
    "adapters minus base: +2.3 is ten times the odds). To see adapters fix the base's real mistakes, "
    "open the **Test images** tab."
)
ELEM = {  # element ids the browser test (and anyone scripting the page) relies on
    "sketchpad": "sketchpad",
    "predict": "predict-button",
    "preprocessed": "preprocessed",
    "prediction": "prediction",
    "probabilities": "probabilities",
    "base_label": "base-probabilities",
    "stack_label": "stack-probabilities",
    "change": "log-odds-change",
}


@dataclass
class DrawResult:
    """What the Draw tab shows for one drawing."""

    image: Any  # the (28, 28) uint8 input, shown 8x (224, 224); None when there is no prediction
    base: dict[str, float] | None  # gr.Label value: digit -> probability
    stack: dict[str, float] | None
    message: str  # the predicted digits, or what went wrong and what to do
    table: list[list[object]] | None  # digit, then TABLE_HEADERS' numbers as text with DECIMALS places
    change: dict[str, Any] | None = None  # gr.BarPlot value: CHANGE_COLUMNS, one row per digit


def draw(ctx: AppContext, drawings: Sequence[object], *slots: Sequence[object]) -> tuple[list, ...]:
    """Batched: drawings and ``SLOTS`` (adapter, weight) pairs of lists -> six lists of outputs
    (the 28 x 28 image, the base's and the stack's probabilities, the message, the table, the
    change in log-odds per digit).

    A drawing is an image or sketchpad value (see :func:`drawing_to_ink`) or an
    :class:`EditorPayload` (the page's value before decoding, decoded here one request at a
    time); an adapter is a ``name@version`` (any registry entry: the pickers' choices may be
    older than the registry) or ``"(none)"``, a weight a number in [-2, 2]. Each request is
    checked on its own: a bad one gets its message and the others of its batch their answers.
    """
    results: list[DrawResult] = []
    good: list[tuple[int, torch.Tensor, torch.Tensor, Stack | None]] = []
    for i, drawing in enumerate(drawings):
        results.append(DrawResult(None, None, None, "", None))
        try:
            for value in (drawing, *(slot[i] for slot in slots)):
                if isinstance(value, Refused):
                    raise value.error
            image, x = preprocess_drawing(drawing.decode() if isinstance(drawing, EditorPayload) else drawing)
            items = []
            for s in range(SLOTS):
                ref, weight = slots[2 * s][i], slots[2 * s + 1][i]
                if ref is not None and ref != "" and ref != NONE_CHOICE:
                    items.append((ref, _slider_weight(weight, s + 1)))
            good.append((i, image, x, ctx.predictor.resolve(items)))
        except Exception as exc:  # whatever a hostile request raises is its own answer, not its batch's
            results[i].message = ctx.predictor.public_message(exc)
    outcomes = ctx.predictor.predict_pairs([x for _, _, x, _ in good], [s for *_, s in good])
    for (i, image, _, stack), outcome in zip(good, outcomes, strict=True):
        if isinstance(outcome, Exception):
            results[i].message = ctx.predictor.public_message(outcome)
            continue
        results[i] = _result(image, *outcome, "no adapter" if stack is None else stack.label)
    return (
        [r.image for r in results],
        [r.base for r in results],
        [r.stack for r in results],
        [r.message for r in results],
        [r.table for r in results],
        [r.change for r in results],
    )


def _result(image: torch.Tensor, base: torch.Tensor, with_stack: torch.Tensor, name: str) -> DrawResult:
    """What the tab shows for one answered drawing: ``base`` and ``with_stack`` are its logits (10,)."""
    pb, ps = base.softmax(0), with_stack.softmax(0)
    change = (log_odds(with_stack) - log_odds(base)).tolist()
    return DrawResult(
        image=_enlarge((image * 255).round().to(torch.uint8)).numpy(),
        base={str(d): float(pb[d]) for d in range(10)},
        stack={str(d): float(ps[d]) for d in range(10)},
        message=f"base: {int(base.argmax())} · {name}: {int(with_stack.argmax())}",
        table=[[d, *(_fixed(float(v)) for v in (pb[d], ps[d], base[d], with_stack[d])), _fixed(change[d], signed=True)] for d in range(10)],
        change={
            "columns": list(CHANGE_COLUMNS),
            "data": [[str(d), round(change[d], DECIMALS)] for d in range(10)],
            "datatypes": {"digit": "nominal", "change in log-odds": "quantitative"},
            "mark": "bar",
        },
    )


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Each digit's log-odds, ``log(p / (1 - p))``, from one row of logits (10,), without forming
    ``1 - p`` (which rounds to 0 in float32 for a digit at ~100%): the digit's logit minus the
    logsumexp of the others. Unlike the probability it does not saturate: switching the digit-9
    adapter on moves a clear 9's log-odds by about +2 (seven times the odds) while its probability
    stays at 1.0000.

    >>> log_odds(torch.tensor([0.0, 0.0])).tolist()
    [0.0, 0.0]
    """
    others = logits.expand(len(logits), -1).masked_fill(torch.eye(len(logits), dtype=torch.bool), -torch.inf)  # (10, 10), own logit out
    return logits - others.logsumexp(1)


def _slider_weight(value: object, slot: int) -> float:
    """A picker's weight from the page (``None``: the slider's default, 1)."""
    if value is None:
        return 1.0
    low, high = WEIGHT_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails the range test
        raise InvalidArgumentError(f"weight {slot} must be a number in [{low:g}, {high:g}] (the slider's range), got {str(value)[:20]!r}")
    return float(value)


def _fixed(value: float, *, signed: bool = False) -> str:
    """``value`` with :data:`DECIMALS` places, never in scientific notation (a signed one with its
    ``+``); a value that rounds to zero is ``0.0000``, not ``-0.0000``."""
    text = f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"
    return f"{0:.{DECIMALS}f}" if float(text) == 0 else text


def _enlarge(pixels: torch.Tensor) -> torch.Tensor:
    """(28, 28) -> (224, 224), each pixel an 8 x 8 block: ``big[::8, ::8]`` is the input again."""
    return pixels.repeat_interleave(DISPLAY_SCALE, 0).repeat_interleave(DISPLAY_SCALE, 1)


def _draw_function(handlers: Any, sketch: Any) -> Callable[..., tuple[list, ...]]:
    """The Draw tab's batched event with named parameters (its API page shows them). The drawings
    arrive as the page sent them (``preprocess=False``) and go to :meth:`~mnist_peft.app.handlers.UiHandlers.draw` as
    :class:`EditorPayload`; the images the page sent ahead as blobs are taken out of the
    component's store here, for every request (as gradio's own preprocess does), decoded or not."""

    def draw(drawing, adapter_1, weight_1, adapter_2, weight_2, adapter_3, weight_3):
        payloads = []
        for value in drawing:
            blob_id = value.get("id") if isinstance(value, dict) else None
            blobs = sketch.blob_storage.pop(blob_id, None) if isinstance(blob_id, str) else None
            payloads.append(value if isinstance(value, Refused) else EditorPayload(value, blobs))
        return handlers.draw(payloads, adapter_1, weight_1, adapter_2, weight_2, adapter_3, weight_3)

    assert SLOTS == 3, "draw() names three adapter slots"
    return draw


class DrawTab:
    """The Draw tab (see the module's docstring); its event calls ``page.handlers.draw``."""

    title = "Draw"

    def build(self, page: Page) -> None:
        gr, handlers = page.gr, page.handlers
        choices = [NONE_CHOICE, *handlers.adapter_picker_choices()]  # (label, name@version): a DoRA entry's label says so
        gr.Markdown(INTRO, elem_id="draw-intro")
        with gr.Row():
            with gr.Column(scale=2):
                sketch = gr.Sketchpad(
                    label="Draw a digit (pick the brush, then draw)",
                    elem_id=ELEM["sketchpad"],
                    canvas_size=(400, 400),
                    type="numpy",
                    image_mode="RGBA",
                    brush=gr.Brush(default_size=28, colors=["#000000"], color_mode="fixed"),
                )
                pickers = []
                for s in range(1, SLOTS + 1):
                    with gr.Row():
                        pickers.append(gr.Dropdown(choices, value=NONE_CHOICE, label=f"adapter {s} (name@version)", elem_id=f"adapter-{s}"))
                        pickers.append(gr.Slider(*WEIGHT_RANGE, value=1.0, step=0.05, label=f"weight {s}", elem_id=f"weight-{s}"))
                button = gr.Button("Predict", variant="primary", elem_id=ELEM["predict"])
            with gr.Column(scale=3):
                outputs = self._outputs(gr)
        # preprocess=False: gradio would decode every drawing of a batch, and check every slider
        # and dropdown value, in one loop that fails the whole batch on one bad request (and
        # decodes before any size check); draw() decodes and checks each request on its own.
        button.click(
            _draw_function(handlers, sketch),
            [sketch, *pickers],
            outputs,
            batch=True,
            max_batch_size=page.max_batch_size,
            api_name="draw",
            preprocess=False,
            **page.model_queue,
        )
        dropdowns = pickers[0::2]

        def refresh_pickers() -> list[Any]:
            """The pickers' choices, read from the registry now: a version registered while the app runs can be picked."""
            return [gr.Dropdown(choices=[NONE_CHOICE, *handlers.adapter_picker_choices()]) for _ in dropdowns]

        page.on_registry_change(refresh_pickers, dropdowns)  # each page load, and each Verify press

    @staticmethod
    def _outputs(gr: Any) -> list[Any]:
        """The results column: the message, the input as the model sees it, both probabilities, the
        change in log-odds per digit, the table."""
        message = gr.Markdown("Draw a digit, then press Predict.", label="prediction", elem_id=ELEM["prediction"])
        preprocessed = gr.Image(
            label="what the model sees: the 28 x 28 input, shown 8x", elem_id=ELEM["preprocessed"], format="png", height=240
        )
        with gr.Row():
            base_label = gr.Label(label="base", num_top_classes=10, elem_id=ELEM["base_label"])
            stack_label = gr.Label(label="with the adapters", num_top_classes=10, elem_id=ELEM["stack_label"])
        change = gr.BarPlot(
            x=CHANGE_COLUMNS[0],
            y=CHANGE_COLUMNS[1],
            label="what the adapters change: log-odds per digit, adapters minus base (+2.3: ten times the odds)",
            elem_id=ELEM["change"],
            height=220,
        )
        table = gr.Dataframe(
            headers=TABLE_HEADERS,
            label=f"probabilities, logits and the change in log-odds ({DECIMALS} places)",
            elem_id=ELEM["probabilities"],
            interactive=False,
        )
        return [preprocessed, base_label, stack_label, message, table, change]
