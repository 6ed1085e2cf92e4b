"""The Registry tab: every entry and version with its metrics, fingerprint and ``verify`` status, and
the adapter x digit heat map of test error rates measured on the app's base (cached in the context's
memo while the entries it was measured on stay the same).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_peft.model.data import load_mnist
from mnist_peft.registry.entry import RegistryEntry

from ..context import AppContext, verify_status
from .base import Page

__all__ = ["RegistryTab", "heatmap", "registry_table"]


def registry_table(ctx: AppContext) -> list[list[object]]:
    """One row per entry: ref, kind, digit, r, lora_alpha, fingerprint, fits the base, accuracy, created, verify."""
    rows = []
    for e in ctx.registry.list():
        status = verify_status(ctx.registry, e)
        accuracy = e.metrics.get("accuracy") if isinstance(e.metrics, dict) else None
        fits = "-" if e.kind == "base" else ("yes" if e.base_fingerprint in (None, ctx.predictor.fingerprint) else "no")
        rows.append(
            [
                e.ref,
                e.kind,
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
    """The adapter x digit heat map of test error rates on the app's base: the latest version of
    each adapter entry that has a digit (left out if it does not verify or fits another base).
    Returns the picture (an RGB array, ``None`` without adapters) and the table of rates; cached
    while those entries stay the same."""
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
    counts = torch.bincount(test.y, minlength=10).to(torch.float64)
    matrix, table = [], []
    for entry, stack in zip(entries, stacks, strict=True):
        chunks = [test.x[i : i + 2500] for i in range(0, len(test.y), 2500)]
        pred = torch.cat([ctx.predictor.predict_batch(chunk, [stack] * len(chunk)).argmax(1) for chunk in chunks])
        wrong = torch.bincount(test.y[pred != test.y], minlength=10).to(torch.float64)
        rates = (wrong / counts).tolist()
        matrix.append(rates)
        table.append([entry.ref, *(round(r, 4) for r in rates)])
    picture = None
    if matrix:
        from PIL import Image

        from mnist_peft.experiments.plots import plot_heatmap

        with tempfile.TemporaryDirectory(prefix="mnist-peft-ui-") as tmp:
            path = plot_heatmap(
                matrix,
                Path(tmp) / "heatmap.png",
                row_labels=[e.ref for e in entries],
                col_labels=[str(d) for d in range(10)],
                title="Test error rate per digit (columns) for each adapter (rows)",
            )
            with Image.open(path) as image:
                picture = np.asarray(image.convert("RGB"))
    memo[key] = (picture, table)
    return memo[key]


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
        heat_image = gr.Image(label="adapter x digit test error rate", format="png", elem_id="heatmap")
        heat_table = gr.Dataframe(
            headers=["adapter", *[str(d) for d in range(10)]],
            label="test error rate per digit",
            interactive=False,
            elem_id="heatmap-table",
        )
        verify.click(public(handlers.registry_table), None, [registry_table], api_name="registry")
        heat_button.click(public(lambda: handlers.heatmap()), None, [heat_image, heat_table], api_name="heatmap", **page.model_queue)
        page.rereads_registry(verify)
        page.app.load(public(handlers.registry_table), None, [registry_table], api_visibility="private")
