"""The serving engine below any web framework: cross-request batching (:class:`BatchedEngine`,
:class:`MicroBatcher`) equals answering row by row, a bad request fails alone, the stack cache
evicts by bytes, resolvers are asked in order, Hub references parse, PNG images pass the one gate,
and the metrics are Prometheus text.
"""

from __future__ import annotations

import base64
import copy
import io
import shutil
import threading

import pytest
import torch
from conftest import REPO

from mnist_peft.errors import EntryNotFoundError, IntegrityError, InvalidArgumentError
from mnist_peft.io.adapters import load_stack
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import resolve_base
from mnist_peft.serving.batched import BatchedEngine
from mnist_peft.serving.batcher import MicroBatcher
from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.metrics import Histogram, ServingMetrics
from mnist_peft.serving.requests import images_to_input, png_to_pixels
from mnist_peft.serving.resolvers import Member, RegistryResolver, parse_hub_ref
from mnist_peft.serving.stacks import parse_stack

SPECS = [None, "digit-9", "digit-3@1:0.5", "digit-9@1:0.5,digit-3", "digit-0:-1,digit-1:2", "digit-7@1", "digit-2,digit-4,digit-6"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> AdapterRegistry:
    root = tmp_path_factory.mktemp("engine") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    return AdapterRegistry(root)


@pytest.fixture(scope="module")
def pixels(mnist_test) -> torch.Tensor:
    """Eight test images as the API takes them: 784 pixels in [0, 1] each."""
    return (mnist_test.x[:8] * MNIST_STD + MNIST_MEAN).clamp(0, 1)


def offline_logits(registry: AdapterRegistry, spec: str | None, x: torch.Tensor) -> torch.Tensor:
    """The library's offline answer: ``load_stack`` on a fresh copy of the base, no engine involved."""
    items = parse_stack(spec)
    base = resolve_base("base", registry).eval()
    model = load_stack(copy.deepcopy(base), [registry.path(r) for r, _ in items], [w for _, w in items]) if items else base
    with torch.no_grad():
        return model(x)


def test_concurrent_requests_share_a_forward_and_equal_the_offline_answer_row_by_row(registry, pixels) -> None:
    engine = BatchedEngine(Predictor(registry), max_batch=64, max_wait_s=0.3)  # a long wait: every thread lands in one batch
    answers: dict[int, dict] = {}
    start = threading.Barrier(len(SPECS) * 2)

    def ask(i: int) -> None:
        spec = SPECS[i % len(SPECS)]
        images = [pixels[j].tolist() for j in range(i % 3 + 1)]  # one to three images per request
        start.wait()
        answers[i] = engine.predict(images, spec)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(SPECS) * 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    engine.close()
    assert engine.metrics.batch_requests.count < len(threads)  # batched: fewer forwards than requests
    assert max(engine.metrics.batch_requests.buckets[i] for i, n in enumerate(engine.metrics.batch_requests.counts[:-1]) if n) > 1
    for i, answer in answers.items():
        spec = SPECS[i % len(SPECS)]
        x = images_to_input([pixels[j].tolist() for j in range(i % 3 + 1)], max_images=64)
        want = offline_logits(registry, spec, x).softmax(1)
        got = torch.tensor([p["probabilities"] for p in answer["predictions"]])
        assert [p["label"] for p in answer["predictions"]] == want.argmax(1).tolist()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert [a["adapter"] for a in answer["adapters"]] == [registry.get(r).ref for r, _ in parse_stack(spec)]
        for a in answer["adapters"]:
            assert a["sha256"] == registry.get(a["adapter"]).files["adapter_model.safetensors"]["sha256"]


def test_a_request_whose_adapter_file_is_altered_fails_alone_in_its_batch(tmp_path, pixels) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    registry = AdapterRegistry(root)
    engine = BatchedEngine(Predictor(registry))
    good = [engine.prepare([pixels[0].tolist()], spec) for spec in ("digit-9", None, "digit-3")]
    bad = engine.prepare([pixels[1].tolist()], "digit-5")  # resolved, then its file changes before it loads
    weights = registry.folder(registry.get("digit-5")) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    answers = engine.run_batch([good[0], bad, good[1], good[2]])
    engine.close()
    assert isinstance(answers[1], IntegrityError) and "digit-5" in str(answers[1])
    assert [a["adapters"][0]["adapter"] if a["adapters"] else None for a in (answers[0], answers[2], answers[3])] == [
        "digit-9@1",
        None,
        "digit-3@1",
    ]


def test_the_stack_cache_evicts_least_recently_used_stacks_by_bytes(registry, pixels) -> None:
    predictor = Predictor(registry)
    x = images_to_input([pixels[0].tolist()], max_images=1)
    predictor.predict_batch(x, [predictor.resolve("digit-1")])
    one = predictor.cache_info().nbytes  # a rank-4 adapter of this MLP
    predictor.resize_cache(int(2.5 * one))  # room for two single-adapter stacks
    for spec in ("digit-2", "digit-3", "digit-4"):
        predictor.predict_batch(x, [predictor.resolve(spec)])
        assert predictor.cache_info().nbytes <= predictor.cache_bytes
    info = predictor.cache_info()
    assert (info.entries, info.evictions, info.misses) == (2, 2, 4)
    kept = [key[0][0] for key, _ in predictor.cached()]
    assert kept == ["digit-3@1", "digit-4@1"]  # the least recently used went first
    predictor.predict_batch(x, [predictor.resolve("digit-3")])  # a hit moves it to the end
    assert [key[0][0] for key, _ in predictor.cached()] == ["digit-4@1", "digit-3@1"]
    assert predictor.cache_info().hits == 1


class Recording:
    """A toy resolver: records what it was asked, answers refs starting with its prefix from a registry."""

    def __init__(self, prefix: str, registry: AdapterRegistry, answer: str) -> None:
        self.prefix, self.registry, self.answer, self.asked = prefix, registry, answer, []

    def resolve(self, ref: str, weight: float) -> list[Member] | None:
        self.asked.append(ref)
        if not ref.startswith(self.prefix):
            return None
        entry = self.registry.get(self.answer)
        return [Member(self.registry, entry, weight, f"toy:{ref}")]


def test_resolvers_are_asked_in_order_and_the_first_that_knows_a_ref_answers(registry, pixels) -> None:
    first, last = Recording("digit-9", registry, "digit-9@1"), Recording("hub:", registry, "digit-7@1")
    predictor = Predictor(registry, resolvers=[first, RegistryResolver(registry), last])
    stack = predictor.resolve("digit-9@1:0.5,digit-3,hub:me/digit-9@v1")
    assert stack is not None
    assert [label for label, _ in stack.items] == ["toy:digit-9@1", "digit-3@1", "toy:hub:me/digit-9@v1"]
    assert first.asked == ["digit-9@1", "digit-3", "hub:me/digit-9@v1"]  # asked first, every time
    assert last.asked == ["hub:me/digit-9@v1"]  # the registry answered digit-3 (and refused no Hub ref: not its kind)
    alone = Predictor(registry)  # the registry alone: a Hub reference is no one's
    with pytest.raises(EntryNotFoundError, match="--allow-hub"):
        alone.resolve("hub:me/digit-9@v1")
    with pytest.raises(EntryNotFoundError, match="digit-42"):
        alone.resolve("digit-42")


def test_hub_references_parse_pinned_and_keep_their_colon_in_a_spec() -> None:
    assert parse_stack("hub:me/digit-9@v2:0.5, digit-3") == [("hub:me/digit-9@v2", 0.5), ("digit-3", 1.0)]
    sha = "a" * 40
    assert parse_hub_ref(f"hub:me/bundle/digit-9@{sha}") == ("me/bundle", "digit-9", sha)
    assert parse_hub_ref("hub:me/digit-9@v12") == ("me/digit-9", None, "v12")
    for bad in ("hub:me/digit-9", "hub:me/digit-9@main", "hub:../x@v1", "hub:me@v1", "hub:me/x/y/z@v1", "hub:me/x@v1;rm"):
        with pytest.raises(InvalidArgumentError, match=r"pinned|Hub reference"):
            parse_stack(bad)
    with pytest.raises(InvalidArgumentError, match="named twice"):
        parse_stack("hub:me/x@v1,hub:me/x@v2")


def test_png_images_pass_the_same_gate_as_pixel_lists(pixels) -> None:
    from PIL import Image

    u8 = (pixels[0].reshape(28, 28) * 255).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8.numpy()).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    assert torch.equal(png_to_pixels(text), u8.flatten().float() / 255)
    assert torch.equal(png_to_pixels("data:image/png;base64," + text), png_to_pixels(text))
    x = images_to_input([text, (u8.flatten().float() / 255).tolist()], max_images=2)
    assert torch.equal(x[0], x[1])
    big = io.BytesIO()
    Image.new("L", (400, 400)).save(big, format="PNG")
    for bad, why in (
        (base64.b64encode(big.getvalue()).decode(), "400 x 400"),
        ("not base64!", "not base64"),
        (base64.b64encode(b"GIF89a....").decode(), "not a PNG"),
        (base64.b64encode(buf.getvalue()[:60]).decode(), "truncated|no end"),
        ("A" * 70_000, "characters of base64"),
    ):
        with pytest.raises(InvalidArgumentError, match=why):
            images_to_input([pixels[0].tolist(), bad], max_images=2)
    with pytest.raises(InvalidArgumentError, match=r"images\[1\]"):
        images_to_input([pixels[0].tolist(), "not base64!"], max_images=2)
    with pytest.raises(InvalidArgumentError, match="at most 2"):
        images_to_input([text] * 3, max_images=2)


def test_the_batcher_keeps_its_row_budget_and_gives_each_item_its_own_answer() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def fn(batch: list[int]) -> list[object]:
        gate.wait(5)
        seen.append(list(batch))
        return [ValueError(f"odd {n}") if n % 2 else n * 10 for n in batch]

    with MicroBatcher(fn, max_batch=10, max_wait_s=0.2, max_rows=6, rows=lambda n: n) as batcher:
        futures = [batcher.submit(n) for n in (2, 3, 4, 1, 2)]
        gate.set()
        results = []
        for f in futures:
            try:
                results.append(f.result(5))
            except ValueError as exc:
                results.append(str(exc))
    assert results == [20, "odd 3", 40, "odd 1", 20]
    assert all(sum(b) <= 6 for b in seen) and sum(len(b) for b in seen) == 5

    def broken(batch: list[int]) -> list[int]:
        raise RuntimeError("the batch function failed")

    with MicroBatcher(broken, max_wait_s=0.05) as batcher:
        futures = [batcher.submit(n) for n in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="batch function failed"):
                f.result(5)
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        MicroBatcher(lambda b: b, max_batch=0)


def test_metrics_are_prometheus_text_with_cumulative_histograms(registry, pixels) -> None:
    metrics = ServingMetrics()
    for seconds in (0.003, 0.02, 0.02, 3.0):
        metrics.request("/v1/predict", 200, seconds)
    metrics.request("/v1/predict", 422, 0.001)
    metrics.batch(3, 7)
    predictor = Predictor(registry)
    predictor.predict_batch(images_to_input([pixels[0].tolist()], max_images=1), [predictor.resolve("digit-9")])
    text = metrics.render(predictor.cache_info())
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert values['mnist_peft_requests_total{endpoint="/v1/predict",code="200"}'] == 4
    assert values['mnist_peft_requests_total{endpoint="/v1/predict",code="422"}'] == 1
    assert values['mnist_peft_request_seconds_bucket{endpoint="/v1/predict",le="0.005"}'] == 2
    assert values['mnist_peft_request_seconds_bucket{endpoint="/v1/predict",le="+Inf"}'] == 5
    assert values['mnist_peft_request_seconds_count{endpoint="/v1/predict"}'] == 5
    assert values["mnist_peft_batch_rows_sum"] == 7
    assert values["mnist_peft_cache_misses_total"] == 1 and values["mnist_peft_cache_stacks"] == 1
    assert all(line.startswith("# HELP ") or line.startswith("# TYPE ") for line in text.splitlines() if line.startswith("#"))
    h = Histogram((1, 2, 4))
    for v in (1, 1, 3, 9):
        h.observe(v)
    assert (h.quantile(0.5), h.quantile(0.75), h.quantile(1.0)) == (1, 4, float("inf"))


def test_registry_resolver_refuses_a_base_entry_as_an_adapter(registry) -> None:
    from mnist_peft.errors import RegistryError

    with pytest.raises(RegistryError, match="is a base"):
        RegistryResolver(registry).resolve("base", 1.0)
    assert RegistryResolver(registry).resolve("hub:me/x@v1", 1.0) is None


def test_a_named_stack_in_a_spec_is_its_pinned_members_at_the_spec_weight_times_theirs(tmp_path, pixels) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    registry = AdapterRegistry(root)
    registry.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    registry.add_stack("loud", [("digit-1", 5.0)])
    engine = BatchedEngine(Predictor(registry))
    images = [pixels[j].tolist() for j in range(4)]
    named = engine.predict(images, "mix:2")
    spelled = engine.predict(images, "digit-9@1:1,digit-3@1:2")
    assert named == spelled  # the same stack: the same cached adapter, the same answer
    assert [(a["adapter"], a["weight"]) for a in named["adapters"]] == [("digit-9@1", 1.0), ("digit-3@1", 2.0)]
    assert engine.predictor.cache_info().misses == 1
    for spec, why in (("mix,digit-9", "named twice"), ("loud:3", "multiply to within"), ("base", None)):
        if why is None:
            assert engine.predict(images[:1], spec)["adapters"] == []
            continue
        with pytest.raises(InvalidArgumentError, match=why):
            engine.predict(images[:1], spec)
    engine.close()


def test_a_resolved_spec_is_kept_until_the_index_changes_and_a_new_version_is_used_next(tmp_path, monkeypatch) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    registry = AdapterRegistry(root)
    predictor = Predictor(registry)
    reads = []
    real = registry.get
    monkeypatch.setattr(registry, "get", lambda ref: reads.append(ref) or real(ref))
    first = predictor.resolve("digit-9:0.5,digit-3")
    assert reads == ["digit-9", "digit-3"]
    assert predictor.resolve("digit-9:0.5,digit-3") is first and len(reads) == 2  # kept: no index read
    registry.add("digit-9", registry.folder(real("digit-9@1")))  # a new version while serving
    again = predictor.resolve("digit-9:0.5,digit-3")
    assert [ref for ref, _ in again.items] == ["digit-9@2", "digit-3@1"] and len(reads) == 4
    monkeypatch.setattr(registry, "index_signature", lambda: None)  # a writer at work: nothing is kept
    predictor.resolve("digit-9:0.5,digit-3")
    predictor.resolve("digit-9:0.5,digit-3")
    assert len(reads) == 8


def test_json_booleans_are_not_pixels() -> None:
    for image in ([True] * 784, [[0.0] * 27 + [False]] * 28):
        with pytest.raises(InvalidArgumentError, match="not true/false"):
            images_to_input([image], max_images=1)


def test_hub_pulls_of_different_references_run_at_once_and_a_failure_is_remembered(registry, tmp_path, monkeypatch) -> None:
    import time

    from mnist_peft.errors import HubError
    from mnist_peft.serving.resolvers import HubResolver

    resolver = HubResolver(tmp_path / "hub-cache")
    calls: list[str] = []

    def slow_pull(ref: str):
        calls.append(ref)
        time.sleep(0.6)
        if "bad" in ref:
            raise HubError("no such repo", repo_id=ref)
        return registry, "a" * 40, ["digit-9@1"]

    monkeypatch.setattr(resolver, "_pull", slow_pull)
    refs = ["hub:me/one@v1", "hub:me/two@v1", "hub:me/three@v1"] * 3
    started = time.perf_counter()
    threads = [threading.Thread(target=resolver.resolve, args=(ref, 1.0)) for ref in refs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert time.perf_counter() - started < 1.5  # three pulls at once, not one after another (1.8 s)
    assert sorted(calls) == sorted(set(refs))  # each reference pulled once, its other requests waited for it
    members = resolver.resolve("hub:me/one@v1", 0.5)
    assert [(m.label, m.weight, m.pinned) for m in members] == [(f"hub:me/one@{'a' * 40}/digit-9@1", 0.5, f"hub:me/one/digit-9@{'a' * 40}")]
    for _ in range(2):
        with pytest.raises(HubError, match="no such repo"):
            resolver.resolve("hub:me/bad@v1", 1.0)
    assert calls.count("hub:me/bad@v1") == 1  # the failure is remembered for a while, not pulled again per request
    with pytest.raises(InvalidArgumentError, match="serves Hub adapters of"):
        HubResolver(tmp_path, owners=["team"]).resolve("hub:me/one@v1", 1.0)


def test_a_request_for_registry_adapters_never_waits_behind_slow_hub_pulls(registry, pixels) -> None:
    import asyncio
    import time

    class SlowHub:
        def resolve(self, ref: str, weight: float):
            if not ref.startswith("hub:"):
                return None
            time.sleep(2.0)
            return [Member(registry, registry.get("digit-9@1"), weight, "hub:slow")]

    engine = BatchedEngine(Predictor(registry, resolvers=[RegistryResolver(registry), SlowHub()]))
    image = [pixels[0].tolist()]

    async def run() -> float:
        hub = [asyncio.ensure_future(engine.apredict(image, f"hub:me/r{i}@v1")) for i in range(8)]
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await engine.apredict(image, "digit-3")
        took = time.perf_counter() - started
        await asyncio.gather(*hub)
        return took

    took = asyncio.run(run())
    engine.close()
    assert took < 1.0  # eight pulls of two seconds fill the Hub's own pool, not the one registry requests use


def test_a_png_with_text_chunks_or_another_size_is_refused_from_its_chunks(pixels) -> None:
    import struct
    import zlib

    from PIL import Image, PngImagePlugin

    u8 = (pixels[0].reshape(28, 28) * 255).round().to(torch.uint8).numpy()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 100_000, zip=True)  # ~100 KB that deflate squeezes to a few hundred bytes
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 2000
    with pytest.raises(InvalidArgumentError, match="'zTXt' chunk"):
        png_to_pixels(base64.b64encode(buf.getvalue()).decode())
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    header += struct.pack(">I", zlib.crc32(header[12:29]))
    with pytest.raises(InvalidArgumentError, match="30000 x 30000"):
        png_to_pixels(base64.b64encode(header).decode())


def test_an_adapter_at_two_versions_is_named_twice_once_stacks_are_expanded(tmp_path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    registry = AdapterRegistry(root)
    registry.add("digit-9", registry.folder(registry.get("digit-9@1")))  # digit-9@2, the same bytes
    registry.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    predictor = Predictor(registry)
    for spec in ("mix,digit-9", "mix,digit-9@2", "digit-9@1,digit-9@2"):
        with pytest.raises(InvalidArgumentError, match="named twice"):
            predictor.resolve(spec)
    assert predictor.resolve("mix,digit-5") is not None
