"""The web app (``mnist_peft.app``, ``mnist_peft.serving.engine``, ``mnist-peft ui``): preprocessing, the batched predictor and its
cache, the page handlers, the ``/predict`` API through ``gradio_client``, read-only use of the
registry, and a load test. The browser test is ``tests/test_ui_browser.py``.

The pure parts need no gradio; the tests that start the app need the ``[ui]`` extra and fail,
rather than skip, without it when ``CI`` is set.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, registry_snapshot, require
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from mnist_peft.app.drawing import drawing_to_ink, preprocess_drawing
from mnist_peft.app.handlers import UiHandlers
from mnist_peft.errors import InvalidArgumentError
from mnist_peft.io.adapters import load_stack, save_adapter
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD, normalize
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import resolve_base
from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.requests import SIDE, image_to_input
from mnist_peft.serving.stacks import parse_stack
from mnist_peft.training.loop import predict
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

# The served path folds stack weights into one `cat` adapter and runs a mixed batch; the library's
# load_stack applies them at forward time. Same math, other float32 summation order: measured up to
# 1.5e-5 apart on logits of size ~42 (4 float32 steps) and 1.2e-7 on probabilities; ~10x margin.
LOGIT_ATOL = 1e-4
PROB_ATOL = 1e-5
AGREEMENT = 0.97  # the bar: drawn digits keep the base's prediction this often
ADAPTER_BYTES = 27_176 * 4  # one rank-4 reference adapter (linear1..3), float32

SPECS = ["", "digit-9", "digit-9@1:0.5,digit-3@1:1", "digit-7@1:-1", "none", "digit-3@1:0.5,digit-8@1:0.5,digit-1@1:0.25"]


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> AdapterRegistry:
    """A copy of the reference registry (tests that alter files make their own copies)."""
    root = tmp_path_factory.mktemp("ui-registry") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    return AdapterRegistry(root)


@pytest.fixture(scope="module")
def base(registry: AdapterRegistry) -> torch.nn.Module:
    return resolve_base("base", registry).eval()


@pytest.fixture(scope="module")
def predictor(registry: AdapterRegistry, data_root: Path) -> Predictor:
    return Predictor(registry, data_dir=str(data_root))


@pytest.fixture(scope="module")
def handlers(predictor: Predictor) -> UiHandlers:
    return UiHandlers(predictor)


class Offline:
    """The library's answer for an input and a stack: ``load_stack`` on a fresh copy of the base."""

    def __init__(self, base: torch.nn.Module, registry: AdapterRegistry) -> None:
        self.base, self.registry, self.models = base, registry, {}

    def logits(self, x: torch.Tensor, items: list[tuple[str, float]]) -> torch.Tensor:
        key = tuple(items)
        if key not in self.models:
            folders = [self.registry.path(ref) for ref, _ in items]
            self.models[key] = load_stack(copy.deepcopy(self.base), folders, [w for _, w in items]) if items else self.base
        with torch.no_grad():
            return self.models[key](x)


@pytest.fixture(scope="module")
def offline(base: torch.nn.Module, registry: AdapterRegistry) -> Offline:
    return Offline(base, registry)


def u8_images(split, indices) -> torch.Tensor:
    """Test images back to their (N, 28, 28) uint8 bytes (exact: normalisation round-trips)."""
    x = split.x[indices].reshape(-1, SIDE, SIDE)
    return (x * MNIST_STD + MNIST_MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def render(image: torch.Tensor, *, scale: float, top: int, left: int, style: str, canvas: int = 400) -> np.ndarray:
    """An MNIST image (28, 28) uint8 as a sketchpad drawing: scaled up (bilinear), placed at
    (top, left) on a ``canvas`` square, in one of the encodings a drawing arrives in."""
    big = F.interpolate(image[None, None].float() / 255, scale_factor=scale, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    ink = torch.zeros(canvas, canvas)
    ink[top : top + big.shape[0], left : left + big.shape[1]] = big
    level = (ink * 255).round().to(torch.uint8)
    full, zero = torch.full_like(level, 255), torch.zeros_like(level)
    if style == "white":  # what gradio's sketchpad sends: black strokes composited on opaque white
        return torch.stack([255 - level] * 3 + [full], -1).numpy()
    if style == "transparent":  # black strokes on a transparent layer
        return torch.stack([zero, zero, zero, level], -1).numpy()
    if style == "negative":  # light strokes on black, gray (MNIST's own polarity)
        return level.numpy()
    raise ValueError(style)


def assert_label(label: int, reference: torch.Tensor) -> None:
    """``label`` is the argmax of ``reference`` logits, unless the top two are within float rounding."""
    top2 = reference.topk(2)
    if float(top2.values[0] - top2.values[1]) > LOGIT_ATOL:
        assert label == int(top2.indices[0])
    else:
        assert label in top2.indices.tolist()


def answer_matches(answer: dict, x: torch.Tensor, spec: str, offline: Offline) -> None:
    """One ``/predict`` answer against the library's outputs for the same input and stack."""
    assert "error" not in answer, answer
    items = parse_stack(spec)
    ref_base = offline.logits(x, [])[0]
    torch.testing.assert_close(torch.tensor(answer["base"]["logits"]), ref_base, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(answer["base"]["probabilities"]), ref_base.softmax(0), atol=PROB_ATOL, rtol=0)
    assert_label(answer["base"]["label"], ref_base)
    if not items:
        assert answer["stack"] is None
        return
    ref = offline.logits(x, [(ref_name, w) for ref_name, w in items])[0]
    got = answer["stack"]
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(got["probabilities"]), ref.softmax(0), atol=PROB_ATOL, rtol=0)
    assert_label(got["label"], ref)
    assert [a["weight"] for a in got["adapters"]] == [w for _, w in items]


def as_pixels(image: torch.Tensor) -> list[list[float]]:
    """A uint8 (28, 28) image as the API takes it: 28 x 28 floats in [0, 1]."""
    return (image.to(torch.float64) / 255).tolist()


# ----------------------------------------------------------------------------- preprocessing
def test_drawn_mnist_digits_keep_the_base_prediction_after_preprocessing(mnist_test, base) -> None:
    """Real test digits, scaled 4-11x and placed anywhere on a 320 x 320 canvas, in the three
    encodings a drawing arrives in, read as the base reads the original for >= 97% of them; the
    same drawings squeezed to 28 x 28 without MNIST's procedure are misread far more often."""
    g = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(mnist_test.y), generator=g)[:200]
    images = u8_images(mnist_test, indices)
    ours, naive = [], []
    for k, image in enumerate(images):
        scale = float(torch.randint(4, 12, (1,), generator=g))
        side = round(SIDE * scale)
        top, left = (int(v) for v in torch.randint(0, 320 - side + 1, (2,), generator=g))
        drawing = render(image, scale=scale, top=top, left=left, style=("white", "transparent", "negative")[k % 3], canvas=320)
        ours.append(preprocess_drawing(drawing)[1])
        ink = drawing_to_ink(drawing)
        squeezed = F.interpolate(ink[None, None], size=(SIDE, SIDE), mode="bilinear", antialias=True)[0, 0]
        naive.append(normalize((squeezed * 255).round().to(torch.uint8)[None]))
    reference = predict(base, mnist_test.x[indices])
    agreement = float((predict(base, torch.cat(ours)) == reference).float().mean())
    without = float((predict(base, torch.cat(naive)) == reference).float().mean())
    assert agreement >= AGREEMENT, f"only {agreement:.3f} of drawn digits keep the base's prediction"
    print(f"drawn digits keeping the base's prediction: {agreement:.3f} with the preprocessing, {without:.3f} without")
    assert without < 0.6, f"the test is too easy: {without:.3f} agree even without the preprocessing"


def test_the_three_drawing_encodings_give_the_same_input(mnist_test) -> None:
    image = u8_images(mnist_test, [7])[0]
    inputs = [preprocess_drawing(render(image, scale=9, top=60, left=130, style=s)) for s in ("white", "transparent", "negative")]
    for pixels, x in inputs[1:]:
        assert (pixels - inputs[0][0]).abs().max() <= 1 / 255 + 1e-6  # luma weights sum to 1 up to float rounding
        assert x.shape == (1, 784)
    assert inputs[0][0].shape == (SIDE, SIDE) and inputs[0][0].max() > 0.9


def test_the_model_sees_exactly_the_8_bit_image_the_app_shows(mnist_test) -> None:
    image = u8_images(mnist_test, [3])[0]
    pixels, x = preprocess_drawing(render(image, scale=6, top=10, left=20, style="white"))
    assert torch.equal((pixels * 255).round() / 255, pixels)  # multiples of 1/255: a PNG holds it exactly
    assert torch.equal(x, normalize((pixels * 255).round().to(torch.uint8)[None]))  # what training saw for such bytes


def test_a_drawing_is_centred_on_its_mass_and_scaled_to_20_pixels() -> None:
    canvas = np.full((300, 500, 3), 255, np.uint8)
    canvas[200:290, 400:430] = 0  # a bar, 90 x 30, in a corner
    pixels, _ = preprocess_drawing(canvas)
    rows, cols = (pixels > 0.5).any(1).nonzero()[:, 0], (pixels > 0.5).any(0).nonzero()[:, 0]
    assert int(rows[-1] - rows[0] + 1) == 20 and 6 <= int(cols[-1] - cols[0] + 1) <= 8  # 20 x 20/3, aspect kept
    r = torch.arange(SIDE, dtype=torch.float32)
    cy, cx = float((pixels.sum(1) * r).sum() / pixels.sum()), float((pixels.sum(0) * r).sum() / pixels.sum())
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_a_gradio_sketchpad_value_is_read_from_its_composite_or_else_its_layers(mnist_test) -> None:
    image = u8_images(mnist_test, [11])[0]
    white, clear = render(image, scale=8, top=50, left=50, style="white"), render(image, scale=8, top=50, left=50, style="transparent")
    expected = preprocess_drawing(white)[0]
    assert torch.equal(preprocess_drawing({"background": None, "layers": [], "composite": white})[0], expected)
    from_layers = preprocess_drawing({"background": None, "layers": [clear], "composite": None})[0]
    assert (from_layers - expected).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    "drawing",
    [
        None,
        {"background": None, "layers": [], "composite": None},
        np.full((400, 400, 4), 255, np.uint8),  # untouched white canvas
        np.zeros((400, 400, 4), np.uint8),  # untouched transparent canvas
    ],
    ids=["none", "empty-dict", "white", "transparent"],
)
def test_an_empty_canvas_is_a_clear_error_not_a_crash(drawing) -> None:
    with pytest.raises(InvalidArgumentError, match="the drawing is empty: draw a digit"):
        preprocess_drawing(drawing)


@pytest.mark.parametrize(
    ("drawing", "message"),
    [
        (np.full((28, 28), np.nan, np.float32), "finite values in \\[0, 1\\]"),
        (np.full((28, 28), 3.0, np.float32), "finite values in \\[0, 1\\]"),
        (np.zeros((4096, 8), np.uint8), "the limit is 2048"),
        (np.zeros((28, 28, 2), np.uint8), "has shape"),
        (np.zeros((28, 28), np.int64), "dtype"),
        ("a string", "shape|not an image"),
    ],
    ids=["nan", "above-one", "huge", "two-channels", "int64", "string"],
)
def test_hostile_drawings_are_refused_with_a_message(drawing, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        preprocess_drawing(drawing)


def test_api_pixels_are_normalised_as_in_training(mnist_test) -> None:
    images = u8_images(mnist_test, list(range(5)))
    for k, image in enumerate(images):
        assert torch.equal(image_to_input(as_pixels(image)), mnist_test.x[k : k + 1])  # bit for bit: same float32 ops
        assert torch.equal(image_to_input([v for row in as_pixels(image) for v in row]), mnist_test.x[k : k + 1])  # 784 flat numbers too
    for bad in ([[0.5] * 27] * 28, [[float("nan")] * 28] * 28, [[1.5] * 28] * 28, "pixels"):
        with pytest.raises(InvalidArgumentError):
            image_to_input(bad)


# ----------------------------------------------------------------------------- stack specs
def test_parse_stack_reads_names_versions_and_weights() -> None:
    assert parse_stack("digit-9@1:1.0, digit-3:0.5") == [("digit-9@1", 1.0), ("digit-3", 0.5)]
    assert parse_stack("digit-9") == [("digit-9", 1.0)]
    assert parse_stack("digit-7@2:-1") == [("digit-7@2", -1.0)]
    assert parse_stack("") == parse_stack("none") == parse_stack(" Base ") == parse_stack(None) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("../adapters/digit-9", "invalid registry name"),
        ("/etc/passwd", "invalid registry name"),
        ("digit-9:nan", "finite number"),
        ("digit-9:1e9", "finite number"),
        ("digit-9:heavy", "not a number"),
        ("digit-9@0", "invalid version"),
        ("digit-9@1,digit-9@1:0.5", "named twice"),
        (",".join(f"a{i}" for i in range(11)), "at most 10"),
    ],
)
def test_parse_stack_refuses_paths_bad_weights_repeats_and_long_stacks(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_stack(spec)


# ----------------------------------------------------------------------------- the predictor
def test_predictor_answers_what_the_library_computes(predictor, offline, mnist_test) -> None:
    x = mnist_test.x[:12]
    for spec in SPECS[1:4]:  # the adapters change the output, so equality below is not trivial
        assert (offline.logits(x, parse_stack(spec)) - offline.logits(x, [])).abs().max() > 0.1
    images = [as_pixels(im) for im in u8_images(mnist_test, list(range(12)))]
    specs = [SPECS[k % len(SPECS)] for k in range(12)]
    answers = predictor.answer(images, specs)
    for k, answer in enumerate(answers):
        answer_matches(answer, x[k : k + 1], specs[k], offline)


# What a hostile /predict client can send as the spec (any JSON) or the image, and what each gets back.
HOSTILE_SPECS = [
    ("no-such-adapter", "no registry entry 'no-such-adapter'"),
    ("base@1", "is a base, not an adapter"),
    (5, "must be a string such as .* got int"),
    (3.5, "must be a string such as .* got float"),
    (True, "must be a string such as .* got bool"),
    ({"digit-9": 1}, "must be a string such as .* got dict"),
    ([1, 2], "'1' is not a \\[name, weight\\] pair"),
    ([["digit-9", 10**400]], "the weight '1000.*' of 'digit-9' is not a number"),
    ([["digit-9", True]], "the weight 'True' of 'digit-9' is not a number"),
    ([[9, 1.0]], "'9' is not a registry name"),
    ([["digit-9", 1.0]] * 11, "at most 10 adapters"),
]
HOSTILE_IMAGES = [
    ([[2.0] * 28] * 28, "pixels must be finite numbers in \\[0, 1\\]"),
    ([[10**400] * 28] * 28, "the image must be 28 x 28"),
    ({"pixels": 1}, "the image must be 28 x 28"),
    (None, "the image must be 28 x 28"),
]


def test_a_bad_request_gets_its_own_error_and_the_rest_of_the_batch_is_answered(predictor, offline, mnist_test) -> None:
    """Every hostile request of one batch gets its own error; the good ones around them, in the same
    batch and forward, get the library's answer (a TypeError or OverflowError from one request once
    failed the whole batch)."""
    good = as_pixels(u8_images(mnist_test, [0])[0])
    images, specs, expected = [good], ["digit-9"], [None]
    for spec, message in HOSTILE_SPECS:
        images += [good, good]
        specs += [spec, "digit-3@1:0.5"]
        expected += [message, None]
    for image, message in HOSTILE_IMAGES:
        images += [image, good]
        specs += ["digit-9", [["digit-9@1", 0.5], ["digit-3", 1]]]
        expected += [message, None]
    answers = predictor.answer(images, specs)
    assert len(answers) == len(images)
    for answer, spec, message in zip(answers, specs, expected, strict=True):
        if message is None:
            items = spec if isinstance(spec, str) else ",".join(f"{r}:{w}" for r, w in spec)
            answer_matches(answer, mnist_test.x[:1], items, offline)
        else:
            assert answer == {"error": answer.get("error")} and re.search(message, answer["error"]), (spec, answer)


def test_an_altered_adapter_file_fails_only_the_requests_that_use_it(tmp_path: Path, data_root: Path, mnist_test) -> None:
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    registry = AdapterRegistry(tmp_path / "adapters")
    predictor = Predictor(registry, data_dir=str(data_root))
    weights = tmp_path / "adapters" / "digit-3" / "v1" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one tensor
    weights.write_bytes(bytes(raw))
    good = as_pixels(u8_images(mnist_test, [0])[0])
    answers = predictor.answer([good, good, good], ["digit-3", "digit-9", ""])
    assert "does not match its recorded sha256" in answers[0]["error"]
    assert answers[1]["stack"]["label"] in range(10) and answers[2]["stack"] is None
    assert predictor.cache_info().entries == 1  # digit-9 only: nothing of the bad file was loaded
    # The web client is told which file, relative to the registry: not the server's folders.
    assert "'<registry>/digit-3/v1/adapter_model.safetensors'" in answers[0]["error"] and str(tmp_path) not in answers[0]["error"]


def test_an_adapter_trained_on_another_base_is_refused(tmp_path: Path, data_root: Path, mnist_test) -> None:
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    registry = AdapterRegistry(tmp_path / "adapters")
    torch.manual_seed(1)
    stranger = LoraModel(MnistMLP(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    registry.add("stranger", save_adapter(stranger, tmp_path / "stranger"))
    predictor = Predictor(registry, data_dir=str(data_root))
    answer = predictor.answer([as_pixels(u8_images(mnist_test, [0])[0])], ["stranger"])[0]
    assert "was trained on base" in answer["error"] and "stranger" not in [n for _, n in predictor.cached()]


def test_the_stack_cache_keeps_the_most_recently_used_within_its_byte_budget(registry, data_root, mnist_test, offline) -> None:
    predictor = Predictor(registry, cache_bytes=2 * ADAPTER_BYTES, data_dir=str(data_root))
    x = mnist_test.x[:1]
    stacks = {d: predictor.resolve(f"digit-{d}") for d in (1, 2, 3)}
    for d in (1, 2, 1, 3):  # 1 is used again before 3 arrives: 2 is the least recently used
        predictor.predict_batch(x, [stacks[d]])
    assert [key for key, _ in predictor.cached()] == [stacks[1].key, stacks[3].key]
    assert sorted(predictor.model.peft_config) == sorted(name for _, name in predictor.cached())  # evicted = deleted
    info = predictor.cache_info()
    assert (info.hits, info.misses, info.evictions, info.nbytes) == (1, 3, 1, 2 * ADAPTER_BYTES)
    torch.testing.assert_close(
        predictor.predict_batch(x, [stacks[2]])[0], offline.logits(x, [("digit-2@1", 1.0)])[0], atol=LOGIT_ATOL, rtol=0
    )
    three = predictor.resolve("digit-1,digit-2,digit-3")  # 3 adapters' bytes: over budget, kept while its batch runs
    predictor.predict_batch(x, [three])
    assert predictor.cache_info().nbytes <= 2 * ADAPTER_BYTES


def test_a_new_weight_or_mix_of_known_adapters_reads_no_file(registry, data_root, mnist_test, offline, monkeypatch) -> None:
    """Each entry is read and checked once (both files' sha256 in its key and in every stack's key);
    a stack that is new only in its weights or its mix is combined from the entries already read."""
    predictor = Predictor(registry, data_dir=str(data_root))
    x = mnist_test.x[:1]
    first = predictor.resolve("digit-4:0.5,digit-6:1")
    predictor.predict_batch(x, [first])
    entry = registry.get("digit-4@1")
    files = {name: info["sha256"] for name, info in entry.files.items()}
    assert first.key[0] == ("digit-4@1", files["adapter_model.safetensors"], files["adapter_config.json"], 0.5)
    assert (predictor.cache_info().entry_misses, predictor.cache_info().entry_hits) == (2, 0)

    def no_reading(*args, **kwargs):
        raise AssertionError("an adapter file was read again")

    cases = (("digit-4:0.25", [("digit-4@1", 0.25)]), ("digit-6,digit-4:-1", [("digit-6@1", 1.0), ("digit-4@1", -1.0)]))
    references = [offline.logits(x, items)[0] for _, items in cases]  # the library's reads (registry.path verifies) come first
    monkeypatch.setattr(registry, "read_file", no_reading)
    for (spec, _), reference in zip(cases, references, strict=True):
        logits = predictor.predict_batch(x, [predictor.resolve(spec)])
        torch.testing.assert_close(logits[0], reference, atol=LOGIT_ATOL, rtol=0)
    info = predictor.cache_info()
    assert (info.misses, info.entry_misses, info.entry_hits, info.entry_files) == (3, 2, 3, 2)


def test_an_unversioned_name_follows_a_version_registered_while_the_app_runs(tmp_path: Path, data_root: Path, mnist_test, offline) -> None:
    """``digit-9`` is the latest version at each request: a v2 registered while the predictor runs
    (here: digit-3's weights under the name digit-9) is used from the next request on, not v1's
    cached stack; ``digit-9@1`` still names v1, and the pickers list the new version."""
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    registry = AdapterRegistry(tmp_path / "adapters")
    handlers = UiHandlers(Predictor(registry, data_dir=str(data_root)))
    good = as_pixels(u8_images(mnist_test, [0])[0])
    x = mnist_test.x[:1]
    before = handlers.predictor.answer([good], ["digit-9"])[0]
    assert before["stack"]["adapters"] == [{"adapter": "digit-9@1", "weight": 1.0}]
    registry.add("digit-9", registry.path("digit-3@1"))  # the app's registry changes under it
    after, old = handlers.predictor.answer([good, good], ["digit-9", "digit-9@1"])
    assert after["stack"]["adapters"] == [{"adapter": "digit-9@2", "weight": 1.0}]
    torch.testing.assert_close(torch.tensor(after["stack"]["logits"]), offline.logits(x, [("digit-3@1", 1.0)])[0], atol=LOGIT_ATOL, rtol=0)
    assert (torch.tensor(after["stack"]["logits"]) - torch.tensor(before["stack"]["logits"])).abs().max() > 0.1  # not v1's stack
    torch.testing.assert_close(torch.tensor(old["stack"]["logits"]), torch.tensor(before["stack"]["logits"]), atol=LOGIT_ATOL, rtol=0)
    assert "digit-9@2" in handlers.adapter_choices()


POOL = [
    (("digit-9@1", 1.0),),
    (("digit-3@1", 1.0),),
    (("digit-9@1", 0.5), ("digit-3@1", 1.0)),
    (("digit-1@1", -1.0),),
    (("digit-9@1", 1.0), ("digit-1@1", 1.0)),
]


@pytest.fixture(scope="module")
def pool_reference(offline, mnist_test):
    x = mnist_test.x[:3]
    return x, {items: offline.logits(x, list(items)) for items in POOL}, offline.logits(x, [])


def test_the_stack_cache_matches_a_naive_lru_over_random_call_sequences(predictor, pool_reference) -> None:
    """A stateful property test: random batches of stacks (and budget changes) against a naive
    LRU model of the cache; after every step the cache holds what the model says, the model holds
    exactly the cached adapters, and every row's logits are the library's for its stack."""
    x, reference, base_logits = pool_reference

    class CacheMachine(RuleBasedStateMachine):
        @initialize(units=st.integers(0, 4))
        def start(self, units: int) -> None:
            predictor.resize_cache(0)
            predictor.resize_cache(units * ADAPTER_BYTES)
            self.lru: OrderedDict[tuple, int] = OrderedDict()

        def _shrink(self, keep=frozenset()) -> None:
            total = sum(self.lru.values())
            for key in list(self.lru):
                if total <= predictor.cache_bytes:
                    break
                if key not in keep:
                    total -= self.lru.pop(key)

        @rule(picks=st.lists(st.one_of(st.none(), st.sampled_from(POOL)), min_size=1, max_size=4), row=st.integers(0, 2))
        def predict(self, picks, row: int) -> None:
            stacks = [None if p is None else predictor.resolve(list(p)) for p in picks]
            logits = predictor.predict_batch(x[row : row + 1].repeat(len(picks), 1), stacks)
            for k, p in enumerate(picks):
                expected = base_logits[row] if p is None else reference[p][row]
                torch.testing.assert_close(logits[k], expected, atol=LOGIT_ATOL, rtol=0)
            self._shrink(keep={s.key for s in stacks if s is not None})
            for p, s in zip(picks, stacks, strict=True):
                if s is None:
                    continue
                if s.key in self.lru:
                    self.lru.move_to_end(s.key)
                else:
                    self.lru[s.key] = len(p) * ADAPTER_BYTES
            self._shrink()

        @rule(units=st.integers(0, 4))
        def resize(self, units: int) -> None:
            predictor.resize_cache(units * ADAPTER_BYTES)
            self._shrink()

        @invariant()
        def cache_is_the_naive_lru(self) -> None:
            cached = predictor.cached()
            assert [key for key, _ in cached] == list(self.lru)
            assert sorted(predictor.model.peft_config) == sorted(name for _, name in cached)
            assert predictor.cache_info().nbytes == sum(self.lru.values())
            # However often a stack is evicted and combined again, each entry was read once.
            assert predictor.cache_info().entry_misses - entry_reads_before <= len({ref for items in POOL for ref, _ in items})

    budget = predictor.cache_bytes
    entry_reads_before = predictor.cache_info().entry_misses
    try:
        run_state_machine_as_test(
            CacheMachine,
            settings=settings(
                max_examples=25, stateful_step_count=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
            ),
        )
    finally:
        predictor.resize_cache(budget)  # the module's other tests share this predictor


# ----------------------------------------------------------------------------- the page handlers
def test_the_draw_handler_shows_the_input_and_predicts_what_the_library_does(handlers, offline, mnist_test) -> None:
    images = u8_images(mnist_test, [0, 1])
    drawings = [
        render(images[0], scale=10, top=40, left=90, style="white"),
        None,
        render(images[1], scale=7, top=150, left=10, style="white"),
    ]
    slots = [
        ["digit-9@1", "(none)", "digit-3@1"],
        [0.5, 1.0, 1.0],
        ["digit-3@1", "(none)", "(none)"],
        [1.0, 1.0, 1.0],
        ["(none)"] * 3,
        [1.0] * 3,
    ]
    shown, base_p, stack_p, messages, tables, _ = handlers.draw(drawings, *slots)
    assert shown[1] is None and "the drawing is empty" in messages[1]  # the empty canvas in the batch gets its message
    for k, items in ((0, [("digit-9@1", 0.5), ("digit-3@1", 1.0)]), (2, [("digit-3@1", 1.0)])):
        pixels = torch.from_numpy(shown[k][::8, ::8].copy())  # shown 8x: every 8th pixel is the input
        assert torch.equal(pixels, (preprocess_drawing(drawings[k])[0] * 255).round().to(torch.uint8))
        x = normalize(pixels[None])
        ref_base, ref_stack = offline.logits(x, [])[0], offline.logits(x, items)[0]
        torch.testing.assert_close(torch.tensor([base_p[k][str(d)] for d in range(10)]), ref_base.softmax(0), atol=PROB_ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor([stack_p[k][str(d)] for d in range(10)]), ref_stack.softmax(0), atol=PROB_ATOL, rtol=0)
        torch.testing.assert_close(
            torch.tensor([float(row[4]) for row in tables[k]]), ref_stack, atol=1e-4 + 5e-5, rtol=0
        )  # shown to 4 places
        assert messages[k].startswith(f"base: {int(ref_base.argmax())} · ")
        assert messages[k].endswith(f": {int(ref_stack.argmax())}")


def test_wrong_images_are_the_base_mistakes_and_fixed_by_names_the_adapters_that_fix_them(handlers, base, offline, mnist_test) -> None:
    digit = 7
    gallery, table, indices = handlers.wrong_images(str(digit))
    expected = ((mnist_test.y == digit) & (predict(base, mnist_test.x) != digit)).nonzero()[:, 0].tolist()
    assert indices == expected and len(indices) > 5 and [row[0] for row in table] == expected
    refs = handlers.adapter_choices()
    for row, idx in zip(table, indices, strict=True):
        x = mnist_test.x[idx : idx + 1]
        fixed = []
        for ref in refs:
            logits = offline.logits(x, [(ref, 1.0)])[0]
            if abs(float(logits.topk(2).values.diff().abs())) > LOGIT_ATOL:  # clear of a float-rounding tie
                fixed += [ref] if int(logits.argmax()) == digit else []
            elif ref in row[3]:
                fixed.append(ref)
        assert row[3] == (", ".join(fixed) or "none")
    assert all(caption.startswith(f"#{idx}: base says ") for (_, caption), idx in zip(gallery, indices, strict=True))
    detail = handlers.image_detail(str(digit), indices[0])
    assert [r[0] for r in detail] == refs and {r[3] for r in detail} <= {"fixes it", "-"}


def test_registry_table_lists_every_entry_with_its_verify_status(tmp_path: Path, data_root: Path) -> None:
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    registry = AdapterRegistry(tmp_path / "adapters")
    handlers = UiHandlers(Predictor(registry, data_dir=str(data_root)))
    rows = handlers.registry_table()
    assert [r[0] for r in rows] == [e.ref for e in registry.list()] and {r[9] for r in rows} == {"ok"}
    assert {r[6] for r in rows if r[1] == "lora"} == {"yes"}  # every reference adapter fits the reference base
    card = tmp_path / "adapters" / "digit-5" / "v1" / "README.md"
    card.write_bytes(card.read_bytes().replace(b"digit", b"DIGIT", 1))  # same size, other bytes
    status = {r[0]: r[9] for r in handlers.registry_table()}
    assert status["digit-5@1"].startswith("BAD: digit-5@1: file") and "sha256" in status["digit-5@1"]
    assert all(s == "ok" for ref, s in status.items() if ref != "digit-5@1")
    _, _, wrong = handlers.wrong_images("5")  # the other tabs leave the bad entry out, and still work
    assert [r[0] for r in handlers.image_detail("5", wrong[0])] == [f"digit-{d}@1" for d in range(10) if d != 5]


def test_the_heat_map_is_each_adapters_change_in_test_images_wrong_against_the_base(handlers, registry, base) -> None:
    from mnist_peft.training.loop import evaluate

    picture, table = handlers.heatmap()
    assert picture.ndim == 3 and picture.shape[2] == 3 and [r[0] for r in table] == [f"digit-{d}@1" for d in range(10)]
    base_wrong = evaluate(base).wrong_per_digit
    for d in (1, 5, 9):
        wrong = evaluate(load_stack(copy.deepcopy(base), [registry.path(f"digit-{d}")])).wrong_per_digit
        for digit in range(10):  # a near-tie may flip one image under float rounding, in the base's count or the adapter's
            assert abs(table[d][1 + digit] - (wrong[digit] - base_wrong[digit])) <= 2, (d, digit)
    assert table[9][10] < 0  # the digit-9 adapter fixes some of the base's 9s (7 of its 17)
    again = handlers.heatmap()
    assert again[0] is picture and again[1] is table  # cached while the registry is unchanged


# ----------------------------------------------------------------------------- the app, through gradio_client
@pytest.fixture(scope="module")
def client(ui_server):
    gradio_client = require("gradio_client")
    c = gradio_client.Client(ui_server.url, verbose=False, analytics_enabled=False, ssl_verify=False)  # http: no TLS to verify
    yield c
    c.close()


def test_predict_endpoint_answers_what_the_library_computes(client, offline, mnist_test) -> None:
    assert "/predict" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for k in range(len(SPECS)):
        image = u8_images(mnist_test, [100 + k])[0]
        answer = client.predict(as_pixels(image), SPECS[k], api_name="/predict")
        answer_matches(answer, mnist_test.x[100 + k : 101 + k], SPECS[k], offline)
    bad = client.predict(as_pixels(image), "../../etc/passwd", api_name="/predict")
    assert bad == {"error": bad["error"]} and "invalid registry name" in bad["error"]


def test_the_readme_gradio_client_snippet_runs_against_the_app(ui_server) -> None:
    text = (REPO / "docs/web-app.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in section.split("```python\n")[1:] if "gradio_client" in b)
    snippet, printed = block.split("```", 1)[0], block.split("```text\n", 1)[1].split("```", 1)[0]
    assert 'Client("http://127.0.0.1:7860/"' in snippet
    code = snippet.replace("http://127.0.0.1:7860/", ui_server.url)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.replace(ui_server.url, "http://127.0.0.1:7860/") == printed  # exactly what the README shows


def test_a_session_of_app_use_leaves_the_registry_byte_identical(ui_server, client, tmp_path: Path, mnist_test) -> None:
    from gradio_client import handle_file
    from PIL import Image

    drawing = tmp_path / "drawing.png"
    Image.fromarray(render(u8_images(mnist_test, [5])[0], scale=9, top=30, left=60, style="white")).save(drawing)
    value = {"background": None, "layers": [], "composite": handle_file(str(drawing)), "id": None}
    shown, _, stack_label, message, _, _ = client.predict(value, "digit-9@1", 1.0, "digit-3@1", 0.5, "(none)", 1.0, api_name="/draw")
    assert (
        message.startswith("base: ") and " + " in message and Path(shown).is_file() and stack_label["label"] in [str(d) for d in range(10)]
    )
    for spec in SPECS:
        assert "error" not in client.predict(as_pixels(u8_images(mnist_test, [1])[0]), spec, api_name="/predict")
    for digit in ("3", "9"):
        client.predict(digit, api_name="/wrong_images")
    registry_rows = client.predict(api_name="/registry")["data"]
    assert {row[-1] for row in registry_rows} == {"ok"}
    _, heat = client.predict(api_name="/heatmap")
    assert len(heat["data"]) == 10
    assert registry_snapshot(ui_server.root) == ui_server.before  # no file added, removed or changed


@pytest.fixture(scope="module")
def local_app(registry, data_root):
    """The app served in this process (``serve``) over its own predictor, so that tests can count
    and hold its batches; started once for the module."""
    require("gradio")
    require("gradio_client")
    from mnist_peft.app.launch import serve

    running = serve(UiHandlers(Predictor(registry, data_dir=str(data_root))), max_batch_size=16)
    yield running
    running.close()


class HeldBatches:
    """Wraps a handler so the first batch it gets waits (the other requests queue up meanwhile and
    are then handed over as one batch); records every batch's size."""

    def __init__(self, inner) -> None:
        self.inner, self.sizes, self.first, self.release = inner, [], threading.Event(), threading.Event()

    def __call__(self, first_input, *rest):
        self.sizes.append(len(first_input))
        if not self.first.is_set():
            self.first.set()
            self.release.wait(30)
        return self.inner(first_input, *rest)


def raw_join(url: str, fn_index: int, data: list) -> str:
    """One event into gradio's queue over plain HTTP, as a hand-made client sends it (gradio_client
    would upload a local file it is given; this sends a server path as is). Returns the session."""
    import uuid

    import httpx

    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None, "event_data": None}
    httpx.post(url + "gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    return session


def raw_result(url: str, session: str) -> dict:
    """The ``process_completed`` message of the session's one event."""
    import httpx

    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and (message := json.loads(line[5:])).get("msg") == "process_completed":
                return message
    raise AssertionError(f"no answer for session {session}")


def test_concurrent_requests_are_answered_in_one_forward_per_batch(local_app, offline, mnist_test, monkeypatch) -> None:
    """While a held first batch runs, the other requests queue up; they are then served together,
    each batch in exactly one forward."""
    from mnist_peft.app.load import run_load

    handlers = local_app.handlers
    held, forwards = HeldBatches(handlers.api), []
    inner_forward = handlers.predictor.predict_batch
    monkeypatch.setattr(handlers, "api", held)
    monkeypatch.setattr(handlers.predictor, "predict_batch", lambda x, stacks: forwards.append(len(stacks)) or inner_forward(x, stacks))
    threading.Timer(1.0, held.release.set).start()  # the other requests arrive meanwhile
    images = u8_images(mnist_test, list(range(24)))
    requests = [(as_pixels(images[k]), SPECS[k % len(SPECS)]) for k in range(24)]
    answers, _ = run_load(local_app.url, requests, clients=12)
    for k, answer in enumerate(answers):
        answer_matches(answer, mnist_test.x[k : k + 1], requests[k][1], offline)
    assert sum(held.sizes) == 24 and max(held.sizes) > 1 and max(held.sizes) <= 16
    assert len(forwards) == len(held.sizes)  # one mixed forward per batch


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns on opening the 12000 x 12000 PNG
def test_hostile_draw_requests_fail_alone_in_their_batch(local_app, offline, mnist_test, tmp_path: Path, monkeypatch) -> None:
    """One batch of /draw requests (held until all are queued): good drawings, and a weight outside
    the slider's range, an adapter that is no registry entry, a non-image upload, a 12000 x 12000
    PNG, a malformed sketchpad value and a server path that was never uploaded. Each bad one gets
    its own message; the good ones get the library's answer. (Gradio checks and decodes a batch's
    inputs in one loop: before the app took each request in on its own, any of these failed every
    request of its batch.)"""
    import httpx
    from gradio_client import Client, handle_file
    from PIL import Image

    handlers = local_app.handlers
    held = HeldBatches(handlers.draw)
    monkeypatch.setattr(handlers, "draw", held)
    drawings = {}
    for k in (0, 1, 2):
        drawings[k] = render(u8_images(mnist_test, [20 + k])[0], scale=8, top=40 + 30 * k, left=60, style="white")
        Image.fromarray(drawings[k]).save(tmp_path / f"good-{k}.png")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 18 MB of pixels in 1 bit, 17 KB as a PNG
    assert (tmp_path / "bomb.png").stat().st_size < 100_000

    def sketch(path: Path) -> dict:
        return {"background": None, "layers": [], "composite": handle_file(str(path)), "id": None}

    none = ["(none)", 1.0, "(none)", 1.0]
    good = {  # request -> the stack its drawing goes through
        "good-0": (
            sketch(tmp_path / "good-0.png"),
            ["digit-9@1", 0.5, "digit-3@1", 1.0, *none[:2]],
            [("digit-9@1", 0.5), ("digit-3@1", 1.0)],
        ),
        "good-1": (sketch(tmp_path / "good-1.png"), ["(none)", 1.0, *none], []),
        "good-2": (sketch(tmp_path / "good-2.png"), ["digit-7", -1.0, *none], [("digit-7@1", -1.0)]),
    }
    bad = {  # request -> its message
        "weight": ((sketch(tmp_path / "good-0.png"), "digit-9@1", 5.0, *none), r"weight 1 must be a number in \[-2, 2\]"),
        "adapter": ((sketch(tmp_path / "good-0.png"), "no-such-adapter", 1.0, *none), "no registry entry 'no-such-adapter'"),
        "not-an-image": ((sketch(tmp_path / "notes.png"), "digit-9@1", 1.0, *none), "not an image file"),
        "bomb": ((sketch(tmp_path / "bomb.png"), "(none)", 1.0, *none), "12000 x 12000 pixels; the limit is 2048 per side"),
        "malformed": (({"background": None, "layers": [], "composite": {"path": "x.png"}, "id": None}, "(none)", 1.0, *none), "EditorData"),
    }
    fn_index = next(i for i, fn in local_app.app.fns.items() if fn.api_name == "draw")
    client = Client(local_app.url, verbose=False, analytics_enabled=False, ssl_verify=False)
    try:
        jobs = {"first": client.submit(*good["good-1"][0:1], *good["good-1"][1], api_name="/draw")}
        assert held.first.wait(30)  # the first batch is held: everything below queues up behind it
        jobs.update({name: client.submit(value, *slots, api_name="/draw") for name, (value, slots, _) in good.items()})
        jobs.update({name: client.submit(*args, api_name="/draw") for name, (args, _) in bad.items()})
        not_uploaded = {
            "background": None,
            "layers": [],
            "composite": {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}},
            "id": None,
        }
        session = raw_join(local_app.url, fn_index, [not_uploaded, "(none)", 1.0, *none])
        batch = len(jobs) - 1 + 1  # every request but the held first one, and the hand-made one
        deadline = time.monotonic() + 30
        while httpx.get(local_app.url + "gradio_api/queue/status").json()["queue_size"] < batch:
            assert time.monotonic() < deadline, "the requests did not reach the queue"
            time.sleep(0.05)
        held.release.set()
        results = {name: job.result(timeout=60) for name, job in jobs.items()}
        raw = raw_result(local_app.url, session)
    finally:
        held.release.set()
        client.close()
    assert held.sizes == [1, batch], held.sizes  # all of them in one batch
    assert raw["success"] and "it was not uploaded by a user" in raw["output"]["data"][3]  # its own answer, in the batch
    for name, (_, pattern) in bad.items():
        shown, base_label, _, message, _, _ = results[name]
        assert shown is None and not base_label and re.search(pattern, message), (name, message)
    for name, (_, _, items) in good.items():
        _, base_label, _, message, table, _ = results[name]
        _, x = preprocess_drawing(drawings[int(name[-1])])  # the drawing the PNG holds, read as the app reads it
        ref_base, ref_stack = offline.logits(x, [])[0], offline.logits(x, items)[0]
        assert message.startswith(f"base: {int(ref_base.argmax())} · ") and message.endswith(f": {int(ref_stack.argmax())}"), message
        logits = torch.tensor([[float(row[3]), float(row[4])] for row in table["data"]], dtype=torch.float32)
        torch.testing.assert_close(logits[:, 0], ref_base, atol=1e-4 + 5e-5, rtol=0)  # the table shows 4 places
        torch.testing.assert_close(logits[:, 1], ref_stack, atol=1e-4 + 5e-5, rtol=0)
        assert base_label["label"] == str(int(ref_base.argmax()))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_drawing_is_refused_from_its_header_without_decoding_it(tmp_path: Path, mnist_test, monkeypatch) -> None:
    """A 12000 x 12000 PNG (17 KB, 576 MB as RGBA) is refused from the size its header declares,
    before any pixel is decoded, whether it came as a file or as a blob; a drawing within the
    limit decodes to the very array the page drew."""
    from PIL import Image, ImageFile

    from mnist_peft.app.drawing import EditorPayload

    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    drawn = render(u8_images(mnist_test, [4])[0], scale=8, top=40, left=60, style="white")
    Image.fromarray(drawn).save(tmp_path / "good.png")
    good = EditorPayload({"id": "abc"}, SimpleNamespace(background=None, layers=[], composite=(tmp_path / "good.png").read_bytes()))
    assert np.array_equal(good.decode()["composite"], drawn)  # what the page sent ahead as a blob, exactly
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    for payload in (
        EditorPayload({"background": None, "layers": [], "composite": {"path": str(tmp_path / "bomb.png")}, "id": None}),
        EditorPayload({"id": "abc"}, SimpleNamespace(background=None, layers=[(tmp_path / "bomb.png").read_bytes()], composite=None)),
    ):
        with pytest.raises(InvalidArgumentError, match="12000 x 12000 pixels; the limit is 2048 per side"):
            payload.decode()
    assert decoded == []  # refused from the header alone
    with pytest.raises(InvalidArgumentError, match="at most 4 layers"):
        EditorPayload({"background": None, "layers": [{"path": str(tmp_path / "good.png")}] * 5, "composite": None, "id": None}).decode()


def test_the_app_listens_on_this_machine_only_sends_no_analytics_and_refreshes_its_pickers(
    tmp_path: Path, data_root: Path, monkeypatch
) -> None:
    """127.0.0.1 by default (the command, ``launch`` and ``serve``); the Blocks are built with
    analytics off even when the environment asks for them; the adapter pickers are filled from
    the registry again on each page load and each Verify press (a version registered meanwhile
    can be picked)."""
    require("gradio")
    import inspect

    from mnist_peft.app.launch import launch, serve
    from mnist_peft.app.page import build_app
    from mnist_peft.cli.main import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    registry = AdapterRegistry(tmp_path / "adapters")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    app = build_app(UiHandlers(Predictor(registry, data_dir=str(data_root))))
    assert app.analytics_enabled is False
    registry.add("digit-9", registry.path("digit-3@1"))  # registered after the page was built
    pickers = {block._id for block in app.blocks.values() if getattr(block, "elem_id", None) in ("adapter-1", "adapter-2", "adapter-3")}
    verify = next(block._id for block in app.blocks.values() if getattr(block, "elem_id", None) == "verify-button")
    refreshers = [fn for fn in app.fns.values() if {o._id for o in fn.outputs} == pickers]
    assert {event for fn in refreshers for _, event in fn.targets} == {"load", "click"}
    assert any((verify, "click") in fn.targets for fn in refreshers)
    for fn in refreshers:
        updates = fn.fn()
        assert len(updates) == 3 and all("digit-9@2" in [value for _, value in u.choices] for u in updates)


@pytest.mark.slow
def test_load_200_requests_from_20_clients_all_answered_exactly(ui_server, offline, mnist_test, tmp_path: Path, capsys) -> None:
    """200 requests (test images, a mix of stacks and none) from 20 concurrent gradio_client
    clients; every answer is the library's for its input and stack. Reports p50/p99 latency and
    throughput, against the same requests one at a time (one client) and against 20 clients on an
    endpoint that does not batch. Timings are reported, not asserted (`mnist-peft bench` owns ratios)."""
    from mnist_peft.app.api import UNBATCHED_API_NAME
    from mnist_peft.app.load import run_load

    g = torch.Generator().manual_seed(1)
    indices = torch.randperm(len(mnist_test.y), generator=g)[:200].tolist()
    images = u8_images(mnist_test, indices)
    requests = [(as_pixels(images[k]), SPECS[k % len(SPECS)]) for k in range(200)]
    run_load(ui_server.url, [requests[k] for k in range(len(SPECS))], clients=1)  # warm: each stack loaded once
    runs = {
        "batched, 20 clients": run_load(ui_server.url, requests, clients=20),
        "unbatched, 20 clients": run_load(ui_server.url, requests, clients=20, api_name="/" + UNBATCHED_API_NAME),
        "sequential, 1 client": run_load(ui_server.url, requests, clients=1),
    }
    for answers, _ in runs.values():
        for k, answer in enumerate(answers):
            answer_matches(answer, mnist_test.x[indices[k] : indices[k] + 1], requests[k][1], offline)
    report = {name: r.to_dict() for name, (_, r) in runs.items()}
    batched, sequential = runs["batched, 20 clients"][1], runs["sequential, 1 client"][1]
    report["ratio batched / sequential"] = round(batched.throughput / sequential.throughput, 2)
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print("\nweb app load test:", json.dumps(report, indent=2))


# ----------------------------------------------------------------------------- the command
def test_ui_command_checks_its_options_then_refuses_a_registry_that_does_not_exist(tmp_path: Path) -> None:
    """A bad --cache-mb or --max-batch-size is named as such (not a float conversion error, not the
    registry's or the base's problem) before anything is loaded: the registry here does not exist,
    which with good options is the error. The real ``main`` in one subprocess (gradio imported once)."""
    require("gradio")
    nowhere = str(tmp_path / "nowhere")
    runs = [["--cache-mb", "nan"], ["--cache-mb", "-1"], ["--max-batch-size", "0"], ["--port", "7999"]]
    code = (
        "from mnist_peft.cli.main import main\n"
        f"for extra in {runs!r}:\n"
        "    try:\n"
        f"        code = main(['ui', '--root', {nowhere!r}, *extra])\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "    print('exit', code, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.split("\n")[:4] == ["exit 2", "exit 2", "exit 2", "exit 1"], proc.stdout + proc.stderr[-2000:]
    errors = proc.stderr.strip().split("\n")
    assert len(errors) == 4 and "Traceback" not in proc.stderr, errors
    assert errors[0].startswith("error: --cache-mb nan is not a memory budget: give a finite number of MB >= 0"), errors
    assert errors[1].startswith("error: --cache-mb -1.0 is not a memory budget"), errors
    assert errors[2].startswith("error: --max-batch-size 0 is not a batch size: give an integer >= 1"), errors
    assert errors[3].startswith("error: no registry at"), errors


def test_run_load_closes_the_clients_it_made_when_another_fails_to_start(monkeypatch) -> None:
    gradio_client = require("gradio_client")
    from mnist_peft.app.load import run_load

    made, closed = [], []

    class FlakyClient:
        def __init__(self, url, **options) -> None:
            if len(made) == 2:
                made.append(None)
                raise ConnectionError("the third client cannot connect")
            made.append(self)

        def close(self) -> None:
            closed.append(self)

    monkeypatch.setattr(gradio_client, "Client", FlakyClient)
    with pytest.raises(ConnectionError, match="third client"):
        run_load("http://127.0.0.1:9/", [([[0.0] * 28] * 28, "")] * 5, clients=5)
    assert len(made) == 5 and sorted(map(id, closed)) == sorted(id(c) for c in made if c is not None)


def test_ui_command_without_gradio_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['gradio'] = None; from mnist_peft.cli.main import main; sys.exit(main(['ui']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "pip install -e '.[ui]'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_pure_parts_import_without_gradio() -> None:
    """The app's preprocessing, handlers, tabs and page assembly, and the serving engine, import
    (and work) without the ``[ui]`` extra: only building or serving the page imports gradio."""
    code = (
        "import sys; import mnist_peft.app, mnist_peft.app.drawing, mnist_peft.app.handlers, mnist_peft.app.page, "
        "mnist_peft.app.tabs.draw, mnist_peft.app.launch, mnist_peft.serving.engine, mnist_peft.serving.stacks; "
        "assert 'gradio' not in sys.modules and 'gradio_client' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
