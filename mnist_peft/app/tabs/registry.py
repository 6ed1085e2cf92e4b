"""The Registry tab: every entry and version with its metrics, fingerprint and ``verify`` status, and
the adapter x digit heat map of each adapter's change against the app's base: test images wrong per
digit, adapter minus base, on a diverging map centred on zero (cached in the context's memo while the
entries it was measured on stay the same).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_peft.model.data import load_mnist
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.serving.requests import require_answer

from ..context import AppContext, verify_status
from .base import Page

__all__ = ["HEATMAP_TITLE", "RegistryTab", "heatmap", "registry_table"]

HEATMAP_TITLE = "Each adapter (rows) against the base:\nchange in test images wrong per digit (columns)"  # as the demo's picture


def registry_table(ctx: AppContext) -> list[list[object]]:
    """One row per entry: ref, kind (``base``, or the adapter's type: ``lora``, ``dora``), digit, r, lora_alpha,
    fingerprint, fits the base, accuracy, created, verify."""
    rows = []
    for e in ctx.registry.list():
        status = verify_status(ctx.registry, e)
        accuracy = e.metrics.get("accuracy") if isinstance(e.metrics, dict) else None
        fits = "-" if e.kind == "base" else ("yes" if e.base_fingerprint in (None, ctx.predictor.fingerprint) else "no")
        rows.append(
            [
                e.ref,
                e.adapter_type or e.kind,
                "" if e.digit is None else e.digit,
                "" if e.r is None else e.r,
                "" if e.lora_alpha is None else e.lora_alpha,
                (e.base_fingerprint or "")[:12],
                fits,
                "" if accuracy is None else accuracy,
                e.created,
                status,
            ]
        )
    return rows


def heatmap(ctx: AppContext) -> tuple[Any, list[list[object]]]:
    """The adapter x digit heat map of each adapter's change against the app's base: per test digit,
    the number of test images the adapter gets wrong minus the number the base gets wrong (negative:
    fewer mistakes), for the latest version of each adapter entry that has a digit (left out if it
    does not verify or fits another base).

    Returns the picture (an RGB array, ``None`` without an adapter that can be applied: a diverging
    map centred on zero, the base's own count under each digit) and the table of changes, one row per
    adapter ending in its status: ``"ok"``, or ``"cannot be applied: ..."`` for an adapter that
    verifies yet cannot be combined or applied, or whose outputs are no usable numbers (its own row
    is marked, blank in the table and named in the picture's title, not drawn; the others still
    show). Cached while those entries stay the same."""
    latest: dict[str, RegistryEntry] = {}
    for e in ctx.registry.list():
        if e.kind == "lora" and e.digit is not None:
            latest[e.name] = e  # list() is sorted by version: the last one wins
    entries = sorted(ctx.usable(list(latest.values())), key=lambda e: (e.digit, e.name))
    stacks = [ctx.predictor.resolve([(e.ref, 1.0)]) for e in entries]
    key = tuple(s.key for s in stacks if s is not None)
    memo = ctx.memo.setdefault("heatmap", {})
    if key in memo:
        return memo[key]
    test = load_mnist(train=False, data_dir=ctx.predictor.data_dir)
    base_wrong = _wrong_per_digit(test.y, ctx.predictor.test_logits().argmax(1))  # the base: the Test images tab's mistakes
    rows, labels, broken, table = [], [], [], []
    for entry, stack in zip(entries, stacks, strict=True):
        try:
            wrong = _adapter_wrong(ctx, test, stack, entry.ref)
        except Exception as exc:  # one adapter's files are outside input: it marks its own row, not the tab
            table.append([entry.ref, *[""] * 10, "cannot be applied: " + ctx.public_message(exc)])
            broken.append(entry.ref)
            continue
        rows.append(wrong)
        labels.append(entry.ref)
        table.append([entry.ref, *(w - b for w, b in zip(wrong, base_wrong, strict=True)), "ok"])
    picture = _picture(rows, base_wrong, labels, broken) if rows else None
    memo[key] = (picture, table)
    return memo[key]


def _wrong_per_digit(y: torch.Tensor, pred: torch.Tensor) -> list[int]:
    """How many test images of each digit 0..9 ``pred`` gets wrong."""
    return torch.bincount(y[pred != y], minlength=10).tolist()


def _adapter_wrong(ctx: AppContext, test: Any, stack: Any, ref: str) -> list[int]:
    """How many test images of each digit one adapter gets wrong, its logits checked to be usable numbers.

    Raises:
        NonFiniteError: the adapter's logits are not finite or beyond ``MAX_ABS_OUTPUT``.
        Exception: whatever loading the adapter raises (its files are outside input).
    """
    preds = []
    for i in range(0, len(test.y), 2500):
        chunk = test.x[i : i + 2500]
        logits = ctx.predictor.predict_batch(chunk, [stack] * len(chunk))
        require_answer(logits, who=f"adapter {ref!r}")
        preds.append(logits.argmax(1))
    return _wrong_per_digit(test.y, torch.cat(preds))


def _picture(rows: list[list[int]], base_wrong: list[int], labels: list[str], broken: list[str]) -> Any:
    """The change heat map (:func:`~mnist_peft.experiments.plots.plot_change_heatmap`, the demo's
    picture) as an RGB array; the adapters that cannot be applied are named in its title."""
    from PIL import Image

    from mnist_peft.experiments.plots import plot_change_heatmap  # lazily: matplotlib only when the map is asked for

    title = HEATMAP_TITLE + (f"\n(not drawn, cannot be applied: {', '.join(broken)}; see the table)" if broken else "")
    with tempfile.TemporaryDirectory(prefix="mnist-peft-ui-") as tmp:
        path = plot_change_heatmap(
            rows, base_wrong, Path(tmp) / "heatmap.png", row_labels=labels, col_labels=[str(d) for d in range(10)], title=title
        )
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))


class RegistryTab:
    """The Registry tab (see the module's docstring); its events call ``page.handlers.registry_table``
    and ``page.handlers.heatmap``. Its Verify button makes every tab read the registry again."""

    title = "Registry"

    def build(self, page: Page) -> None:
        gr, handlers, public = page.gr, page.handlers, page.public
        registry_table = gr.Dataframe(
            headers=["entry", "kind", "digit", "r", "lora_alpha", "fingerprint", "fits base", "accuracy", "created", "verify"],
            label="entries (every version), checked against their sha256 when shown",
            interactive=False,
            elem_id="registry-table",
        )
        verify = gr.Button("Verify again", elem_id="verify-button")
        heat_button = gr.Button("Compute the adapter x digit heat map (a few seconds)", elem_id="heatmap-button")
        heat_image = gr.Image(label="adapter x digit: change in test images wrong against the base", format="png", elem_id="heatmap")
        heat_table = gr.Dataframe(
            headers=["adapter", *[str(d) for d in range(10)], "status"],
            label="change in test images wrong per digit against the base (negative: fewer mistakes than the base)",
            interactive=False,
            elem_id="heatmap-table",
        )
        verify.click(public(handlers.registry_table), None, [registry_table], api_name="registry")
        heat_button.click(public(lambda: handlers.heatmap()), None, [heat_image, heat_table], api_name="heatmap", **page.model_queue)
        page.rereads_registry(verify)
        page.app.load(public(handlers.registry_table), None, [registry_table], api_visibility="private")
