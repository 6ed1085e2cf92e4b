"""The Test images tab: a digit's test images the base gets wrong, and which registry adapters fix
each (every usable adapter entry run over the images in one mixed forward).
"""

from __future__ import annotations

from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD, load_mnist
from mnist_peft.serving.requests import SIDE

from ..context import AppContext
from .base import Page

__all__ = ["TestImagesTab", "image_detail", "wrong_images"]


def wrong_images(ctx: AppContext, digit: object) -> tuple[list[tuple[Any, str]], list[list[object]], list[int]]:
    """The test images of ``digit`` the base gets wrong: gallery items, a table (test index, base
    says, p of the true digit, the adapters that fix it), and the test indices in order."""
    d = _digit(digit)
    test = load_mnist(train=False, data_dir=ctx.predictor.data_dir)
    logits = ctx.predictor.test_logits()
    wrong = ((test.y == d) & (logits.argmax(1) != d)).nonzero()[:, 0].tolist()
    fixes = _fixes(ctx, wrong, d)
    gallery, table = [], []
    for idx in wrong:
        said = int(logits[idx].argmax())
        fixed_by = [ref for ref, ok in fixes.get(idx, []) if ok]
        gallery.append((_test_image(test.x[idx]), f"#{idx}: base says {said}"))
        table.append([idx, said, round(float(logits[idx].softmax(0)[d]), 4), ", ".join(fixed_by) or "none"])
    return gallery, table, wrong


def image_detail(ctx: AppContext, digit: object, index: int) -> list[list[object]]:
    """One test image: what each registry adapter predicts for it, p of the true digit, fixed or not."""
    d = _digit(digit)
    rows = []
    for ref, said, p, ok in _per_adapter(ctx, [index], d).get(index, []):
        rows.append([ref, said, round(p, 4), "fixes it" if ok else "-"])
    return rows


def _fixes(ctx: AppContext, indices: list[int], digit: int) -> dict[int, list[tuple[str, bool]]]:
    return {i: [(ref, ok) for ref, _, _, ok in v] for i, v in _per_adapter(ctx, indices, digit).items()}


def _per_adapter(ctx: AppContext, indices: list[int], digit: int) -> dict[int, list[tuple[str, int, float, bool]]]:
    """Each of ``indices`` through each usable adapter entry: one mixed forward."""
    if not indices:
        return {}
    test = load_mnist(train=False, data_dir=ctx.predictor.data_dir)
    entries = ctx.usable(ctx.registry.list())
    stacks = [ctx.predictor.resolve([(e.ref, 1.0)]) for e in entries]
    x = test.x[indices]
    logits = ctx.predictor.predict_batch(x.repeat(len(stacks), 1), [s for s in stacks for _ in indices])
    out: dict[int, list[tuple[str, int, float, bool]]] = {i: [] for i in indices}
    for a, entry in enumerate(entries):
        for k, idx in enumerate(indices):
            row = logits[a * len(indices) + k]
            said = int(row.argmax())
            out[idx].append((entry.ref, said, float(row.softmax(0)[digit]), said == digit))
    return out


def _digit(value: object) -> int:
    try:
        d = int(str(value))
    except ValueError:
        raise InvalidArgumentError(f"digit must be 0..9, got {str(value)[:20]!r}") from None
    if not 0 <= d <= 9:
        raise InvalidArgumentError(f"digit must be 0..9, got {d}")
    return d


def _test_image(x: torch.Tensor) -> Any:
    """A normalised test row (784,) back to its (28, 28) uint8 image (exact: the bytes round-trip)."""
    return (x.reshape(SIDE, SIDE) * MNIST_STD + MNIST_MEAN).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


class TestImagesTab:
    """The Test images tab (see the module's docstring); its events call ``page.handlers.wrong_images``
    and ``page.handlers.image_detail``."""

    title = "Test images"

    def build(self, page: Page) -> None:
        gr, handlers, public = page.gr, page.handlers, page.public
        indices = gr.State([])
        digit = gr.Dropdown([str(d) for d in range(10)], value="9", label="digit", elem_id="test-digit")
        gallery = gr.Gallery(label="test images the base gets wrong", columns=8, height=240, format="png", elem_id="wrong-gallery")
        wrong_table = gr.Dataframe(
            headers=["test index", "base says", "p(true digit)", "fixed by"],
            label="the base's mistakes, and the adapters that fix each",
            interactive=False,
            elem_id="wrong-table",
        )
        detail = gr.Dataframe(
            headers=["adapter", "says", "p(true digit)", "fixed?"],
            label="the selected image, per adapter",
            interactive=False,
            elem_id="detail",
        )
        digit.change(public(handlers.wrong_images), [digit], [gallery, wrong_table, indices], api_name="wrong_images", **page.model_queue)

        def select(d, idx, evt):  # annotated below: gradio reads real types, and this module's are strings
            if not isinstance(evt.index, int) or not 0 <= evt.index < len(idx):
                raise InvalidArgumentError("pick an image of the gallery shown")
            return handlers.image_detail(d, idx[evt.index])

        select.__annotations__ = {"d": str, "idx": list, "evt": gr.SelectData, "return": list}
        gallery.select(public(select), [digit, indices], [detail], api_visibility="private", **page.model_queue)
        page.app.load(public(handlers.wrong_images), [digit], [gallery, wrong_table, indices], api_visibility="private", **page.model_queue)
