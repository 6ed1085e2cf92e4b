"""The Test images tab: a digit's test images the base gets wrong, and which registry adapters fix
each (every usable adapter entry run over the images in one mixed forward).
"""

from __future__ import annotations

from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError, NonFiniteError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD, load_mnist
from mnist_peft.serving.requests import SIDE, require_answer

from ..context import AppContext
from .base import Page

__all__ = ["TestImagesTab", "image_detail", "wrong_images"]


def wrong_images(ctx: AppContext, digit: object) -> tuple[list[tuple[Any, str]], list[list[object]], list[int]]:
    """The test images of ``digit`` the base gets wrong: gallery items, a table (test index, base
    says, p of the true digit, the adapters that fix it, and any that cannot be applied), and the
    test indices in order."""
    d = _digit(digit)
    test = load_mnist(train=False, data_dir=ctx.predictor.data_dir)
    logits = ctx.predictor.test_logits()
    wrong = ((test.y == d) & (logits.argmax(1) != d)).nonzero()[:, 0].tolist()
    results, broken = _per_adapter(ctx, wrong, d)
    not_applied = f"; cannot be applied: {', '.join(broken)}" if broken else ""
    gallery, table = [], []
    for idx in wrong:
        said = int(logits[idx].argmax())
        fixed_by = [ref for ref, _, _, ok in results.get(idx, []) if ok]
        gallery.append((_test_image(test.x[idx]), f"#{idx}: base says {said}"))
        table.append([idx, said, round(float(logits[idx].softmax(0)[d]), 4), (", ".join(fixed_by) or "none") + not_applied])
    return gallery, table, wrong


def image_detail(ctx: AppContext, digit: object, index: int) -> list[list[object]]:
    """One test image: what each registry adapter predicts for it, p of the true digit, fixed or not
    (an adapter that cannot be applied gets its own row saying so)."""
    d = _digit(digit)
    results, broken = _per_adapter(ctx, [index], d)
    rows: list[list[object]] = [[ref, said, round(p, 4), "fixes it" if ok else "-"] for ref, said, p, ok in results.get(index, [])]
    return rows + [[ref, "-", "-", why] for ref, why in broken.items()]


def _per_adapter(ctx: AppContext, indices: list[int], digit: int) -> tuple[dict[int, list[tuple[str, int, float, bool]]], dict[str, str]]:
    """Each of ``indices`` through each usable adapter entry, in one mixed forward: per index,
    ``(ref, says, p(digit), fixes it)``; and each adapter that cannot be applied, with why."""
    if not indices:
        return {}, {}
    test = load_mnist(train=False, data_dir=ctx.predictor.data_dir)
    entries = ctx.usable(ctx.registry.list())
    out: dict[int, list[tuple[str, int, float, bool]]] = {i: [] for i in indices}
    broken: dict[str, str] = {}
    for entry, logits in zip(entries, _adapter_logits(ctx, test.x[indices], [e.ref for e in entries]), strict=True):
        if isinstance(logits, Exception):
            broken[entry.ref] = "cannot be applied: " + ctx.public_message(logits)
            continue
        for k, idx in enumerate(indices):
            said = int(logits[k].argmax())
            out[idx].append((entry.ref, said, float(logits[k].softmax(0)[digit]), said == digit))
    return out, broken


def _adapter_logits(ctx: AppContext, x: torch.Tensor, refs: list[str]) -> list[torch.Tensor | Exception]:
    """``x`` through each adapter of ``refs``: one mixed forward; if it fails, one forward per adapter
    to find the one(s) that cannot be applied. Each adapter's logits are checked to be usable numbers;
    an adapter that fails gets its error in its place (its files are outside input), the others their logits."""
    stacks = [ctx.predictor.resolve([(ref, 1.0)]) for ref in refs]
    n = len(x)
    parts: list[torch.Tensor | Exception]
    try:
        logits = ctx.predictor.predict_batch(x.repeat(len(stacks), 1), [s for s in stacks for _ in range(n)])
        parts = [logits[a * n : (a + 1) * n] for a in range(len(stacks))]
    except Exception:  # some adapter's files: find which, by itself
        parts = []
        for stack in stacks:
            try:
                parts.append(ctx.predictor.predict_batch(x, [stack] * n))
            except Exception as exc:
                parts.append(exc)
    for a, (ref, part) in enumerate(zip(refs, parts, strict=True)):
        if not isinstance(part, Exception):
            try:
                require_answer(part, who=f"adapter {ref!r}")
            except NonFiniteError as exc:
                parts[a] = exc
    return parts


def _digit(value: object) -> int:
    """A digit from the page: the dropdown's ``"0"``..``"9"`` (or an int 0..9), nothing else (no
    ``'٣'``, no ``' 3'``, no ``'0_3'``, which ``int()`` would take)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    if isinstance(value, str) and len(value) == 1 and value in "0123456789":
        return int(value)
    shown = value[:20] if isinstance(value, str) else type(value).__name__
    raise InvalidArgumentError(f"digit must be one of 0..9, got {shown!r}")


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
            index = getattr(evt, "index", None)
            if not isinstance(idx, list) or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(idx):
                raise InvalidArgumentError("pick an image of the gallery shown")
            return handlers.image_detail(d, idx[index])

        select.__annotations__ = {"d": str, "idx": list, "evt": gr.SelectData, "return": list}
        gallery.select(public(select), [digit, indices], [detail], api_visibility="private", **page.model_queue)
        page.app.load(public(handlers.wrong_images), [digit], [gallery, wrong_table, indices], api_visibility="private", **page.model_queue)
