"""The web app in a real browser: Playwright drives Debian's ``chromium`` (``.ci/run`` installs it
with ``apt-get install -y chromium``; no browser download) against ``mnist-peft ui``.

It draws a digit with mouse strokes on the sketchpad, presses Predict, reads the predicted digit and
the 28 x 28 input from the page, switches the digit-9 adapter on and sees the outputs change; each
number is checked against the library on the image the page shows. A screenshot is kept in the
test's tmp folder. Without playwright or chromium the test skips locally and fails when ``CI`` is set.
"""

from __future__ import annotations

import copy
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require

from mnist_peft.io.adapters import load_stack
from mnist_peft.model.data import normalize
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import resolve_base

CHROMIUM = os.environ.get("MNIST_PEFT_CHROMIUM", "/usr/bin/chromium")
# Headless, and quiet: without the background-networking flags chromium's own connections (updates,
# sync, field trials) are attempted and refused in a sandbox with no network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOGIT_ATOL = 1e-4 + 5e-5  # the library vs the served path (see test_ui.py), plus the page's rounding to 4 places
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    sync_api = require("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        message = f"no chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) or set MNIST_PEFT_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _table(page) -> np.ndarray:
    """The Draw tab's table (10 rows: digit, p base, p adapters, logit base, logit adapters, change in
    log-odds) as numbers."""
    cells = [[page.inner_text(f"#probabilities [data-testid='cell-{r}-{c}']") for c in range(6)] for r in range(10)]
    return np.array([[float(v) for v in row] for row in cells])


def _shown_input(page) -> torch.Tensor:
    """The 28 x 28 input the page shows (a PNG at 8x, each pixel an 8 x 8 block), as uint8."""
    from PIL import Image

    src = page.get_attribute("#preprocessed img", "src")
    image = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("L"))
    assert image.shape == (224, 224)
    return torch.from_numpy(image[::8, ::8].copy())


def _predict(page, expect: str) -> re.Match:
    page.click("#predict-button")
    page.wait_for_function(f"document.querySelector('#prediction').innerText.includes({expect!r})", timeout=TIMEOUT_MS)
    text = page.inner_text("#prediction")
    match = re.fullmatch(r"base: (\d) · (.+): (\d)", text.strip())
    assert match, text
    return match


def test_draw_a_digit_predict_and_switch_an_adapter_on_in_chromium(browser, ui_server, tmp_path: Path) -> None:
    registry = AdapterRegistry(ui_server.root)
    base = resolve_base("base", registry).eval()
    nine = load_stack(copy.deepcopy(base), [registry.path("digit-9@1")])
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    try:
        page.goto(ui_server.url, wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        page.wait_for_selector("#sketchpad canvas", timeout=TIMEOUT_MS)
        page.click("#sketchpad button[aria-label=Brush]")
        box = page.locator("#sketchpad canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 60, cy - 90)  # a 7: the bar, then the stem, in one stroke
        page.mouse.down()
        for i in range(1, 13):
            page.mouse.move(cx - 60 + 10 * i, cy - 90)
        for i in range(1, 19):
            page.mouse.move(cx + 60 - 4 * i, cy - 90 + 10 * i)
        page.mouse.up()

        first = _predict(page, "no adapter")
        pixels = _shown_input(page)
        assert int((pixels > 0).sum()) > 40, "the page shows no ink: the strokes did not reach the app"
        x = normalize(pixels[None])
        with torch.no_grad():
            base_logits, nine_logits = base(x)[0], nine(x)[0]
        label = int(first.group(1))
        assert label in range(10) and label == int(base_logits.argmax())  # what the library says for the shown image
        assert first.group(2) == "no adapter" and int(first.group(3)) == label
        before = _table(page)
        np.testing.assert_allclose(before[:, 3], base_logits.numpy(), atol=LOGIT_ATOL, rtol=0)
        np.testing.assert_array_equal(before[:, 3], before[:, 4])  # no adapter chosen: the right side is the base

        page.click("#adapter-1 input")  # switch the digit-9 adapter on
        page.locator("[role=option]", has_text="digit-9@1").first.click()
        second = _predict(page, "digit-9@1")
        after, pixels_again = _table(page), _shown_input(page)
        page.screenshot(path=str(tmp_path / "ui-draw-digit-9-adapter.png"), full_page=True)
    finally:
        page.close()
    assert torch.equal(pixels_again, pixels)  # the same drawing, the same input: only the adapter changed
    assert int(second.group(1)) == label and second.group(2) == "digit-9@1" and int(second.group(3)) == int(nine_logits.argmax())
    np.testing.assert_allclose(after[:, 3], before[:, 3])  # the base's column stays
    np.testing.assert_allclose(after[:, 4], nine_logits.numpy(), atol=LOGIT_ATOL, rtol=0)  # the adapter's is the library's
    assert np.abs(after[:, 4] - before[:, 4]).max() > 0.1, "switching the adapter on did not move the logits"
    assert not before[:, 5].any() and np.abs(after[:, 5]).max() > 0.1, "switching the adapter on did not move the log-odds shown"
    assert (tmp_path / "ui-draw-digit-9-adapter.png").stat().st_size > 10_000
