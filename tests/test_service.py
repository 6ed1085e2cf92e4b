"""The HTTP API (``mnist_peft.service``) served in this process by uvicorn on 127.0.0.1 (``start_service``):
answers equal the library's offline ones; hostile specs, images and headers each get the right 4xx, a
JSON error naming the field and nothing of the server; a request that fails does not fail its
batch-mates; the bearer key; metrics by route template; the API over another backend (the seam).
The real ``mnist-peft serve`` in a subprocess is ``tests/test_service_command.py``.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, require
from service_support import PROB_ATOL, SPECS, Offline, assert_answer, assert_clean, assert_error, error_of, pixels, png_b64, raw_request, u8

from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import resolve_base

requests = require("requests")
require("fastapi")
require("uvicorn")

from mnist_peft.service.api import body_limit  # noqa: E402  (after the extras are required)
from mnist_peft.service.launch import start_service  # noqa: E402

KEY = "k3y-for-the-tests-" + "x" * 20


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> AdapterRegistry:
    root = tmp_path_factory.mktemp("service-registry") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    return AdapterRegistry(root)


@pytest.fixture(scope="module")
def offline(registry: AdapterRegistry) -> Offline:
    return Offline(resolve_base("base", registry).eval(), registry)


@pytest.fixture(scope="module")
def server(registry: AdapterRegistry, data_root: Path):
    running = start_service(registry.root, ui=False, data_dir=str(data_root))
    yield running
    running.close()


@pytest.fixture(scope="module")
def keyed(registry: AdapterRegistry, data_root: Path):
    running = start_service(registry.root, ui=False, data_dir=str(data_root), api_key=KEY)
    yield running
    running.close()


def predict(url: str, body: object, headers: dict[str, str] | None = None) -> requests.Response:
    """POST ``body`` as JSON, NaN and infinities written as Python writes them (``requests`` refuses to send them)."""
    return requests.post(
        url + "v1/predict", data=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}, timeout=60
    )


# ----------------------------------------------------------------------------- answers
def test_predict_answers_what_the_library_computes_for_every_spec_form(server, offline, mnist_test) -> None:
    with torch.no_grad():
        confidence = offline.base(mnist_test.x).softmax(1).max(1).values
    indices = [0, 1, *confidence.argsort()[:2].tolist()]  # two easy images, and the two the base is least sure of
    images = [pixels(i) for i in u8(mnist_test, indices)]
    answers = {json.dumps(spec): predict(server.url, {"images": images, "adapters": spec}).json() for spec in SPECS}
    base = answers[json.dumps(None)]["predictions"]
    moved = max(
        abs(a - b)
        for answer in answers.values()
        for p, q in zip(base, answer["predictions"], strict=True)
        for a, b in zip(p["probabilities"], q["probabilities"], strict=True)
    )
    assert moved > 1000 * PROB_ATOL  # the stacks move answers far beyond the tolerance: the equality below is not trivial
    for spec in SPECS:
        assert_answer(answers[json.dumps(spec)], mnist_test.x[indices], spec, offline)


def test_a_png_image_is_answered_as_its_pixels_are(server, offline, mnist_test) -> None:
    images = u8(mnist_test, [3, 4])
    spec = "digit-9@1:0.5,digit-3@1"
    as_png = predict(server.url, {"images": [png_b64(images[0]), "data:image/png;base64," + png_b64(images[1])], "adapters": spec})
    assert as_png.status_code == 200, as_png.text
    assert_answer(as_png.json(), mnist_test.x[[3, 4]], spec, offline)
    as_numbers = predict(server.url, {"images": [pixels(i) for i in images], "adapters": spec}).json()
    assert as_png.json() == as_numbers  # the same 8-bit pixels, the same answer


# ----------------------------------------------------------------------------- hostile input
HOSTILE_SPECS = [
    ("x" * 5000, 422, "5,000 characters"),
    ("digit-9:0.5," * 11, 422, "at most 10 adapters"),
    ("hub:someone/digit-9@v1", 404, "--allow-hub"),
    ("digit-42", 404, "no registry entry 'digit-42'"),
    ("digit-9@7", 404, "no version 7"),
    ("../../etc/passwd", 422, "invalid registry name"),
    ("/etc/passwd", 422, "invalid registry name"),
    ("digit-9:nan", 422, "finite number"),
    ("digit-9:1e308", 422, "finite number"),
    ("digit-9:abc", 422, "not a number"),
    ("digit-9,digit-9@1", 422, "named twice"),
    ([["digit-9"]], 422, "not a [name, weight] pair"),
    ([["digit-9", "x" * 100]], 422, "not a number"),
    ([["digit-9", 1e999]], 422, "finite number"),
    ([[7, 1]], 422, "not a registry name"),
    ({"digit-9": 1}, 422, "'adapters' must be"),
    (12, 422, "'adapters' must be"),
]


@pytest.mark.parametrize(("spec", "status", "phrase"), HOSTILE_SPECS, ids=[f"spec{i}" for i in range(len(HOSTILE_SPECS))])
def test_a_hostile_spec_gets_its_4xx_naming_adapters_and_nothing_of_the_server(server, registry, mnist_test, spec, status, phrase) -> None:
    response = predict(server.url, {"images": [pixels(u8(mnist_test, [0])[0])], "adapters": spec})
    message = assert_error(response, status, "adapters", root=registry.root, sent=json.dumps(spec))
    assert phrase in message


def _png_bomb_header() -> str:
    """A PNG whose header says 50,000 x 50,000 pixels (10 GB of RGBA) over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 6, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _nested(depth: int) -> object:
    value: object = 0.5
    for _ in range(depth):
        value = [value]
    return value


def hostile_images(mnist_test) -> list[tuple[str, object, str]]:
    good = pixels(u8(mnist_test, [0])[0])
    return [
        ("783 numbers", [good[:-1]], "images[0]: the image has shape (783,)"),
        ("1e308", [[1e308] * 784], "finite numbers in [0, 1]"),
        ("inf", [[1e999] * 784], "finite numbers in [0, 1]"),
        ("negative", [[-0.5] * 784], "finite numbers in [0, 1]"),
        ("strings inside", [["0.5"] * 784], "784) numbers in [0, 1]"),
        ("a dict", [{"pixels": good}], "784) numbers in [0, 1]"),
        ("784 x 100", [[[0.0] * 100] * 784], "images[0]: the image has shape (784, 100)"),
        ("nested 40 deep", [_nested(40)], "images[0]"),
        ("65 images", [good] * 65, "at most 64 per request"),
        ("none", [], "non-empty list"),
        ("not base64", ["not base64 at all!"], "not base64"),
        ("base64 not png", [base64.b64encode(b"GIF89a" + b"\0" * 40).decode()], "not a PNG"),
        ("png 29 x 28", [png_b64(u8(mnist_test, [0])[0], size=(29, 28))], "the PNG is 29 x 28"),
        ("png bomb header", [_png_bomb_header()], "images[0]"),
        ("png truncated", [png_b64(u8(mnist_test, [0])[0])[:60]], "images[0]"),
        ("png too long", ["A" * 70_000], "limit 16,384"),
        ("images a string", "x" * 100, "'images' must be a list"),
    ]


def test_hostile_images_get_422_naming_images_and_nothing_of_the_server(server, registry, mnist_test) -> None:
    for name, images, phrase in hostile_images(mnist_test):
        response = predict(server.url, {"images": images, "adapters": "digit-9"})
        message = assert_error(response, 422, "images", root=registry.root, sent=json.dumps(images)[:5000])
        assert phrase in message, (name, message)


def test_malformed_bodies_are_refused_naming_the_body(server, registry) -> None:
    cases = [
        (b'{"images": [[0.5]', "application/json", 422, "not valid JSON", "body"),
        (b"[1, 2, 3]", "application/json", 422, "must be a JSON object", "body"),
        (b'{"adapters": "digit-9"}', "application/json", 422, "no 'images' field", "images"),
        (b'{"images": [], "adapter": "digit-9"}', "application/json", 422, "('adapter')", "body"),
        (b'{"images": [], "' + b"k" * 300 + b'": 1}', "application/json", 422, "does not take:", "body"),
        (b"\xff\xfe\x00garbage", "application/json", 422, "not valid JSON", "body"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "could not be parsed", "body"),
        (b'{"images": [[0.5]]}', "text/plain", 415, "Content-Type: application/json", "body"),
        (b'{"images": [[0.5]]}', "application/x-www-form-urlencoded", 415, "Content-Type: application/json", "body"),
    ]
    for body, content_type, status, phrase, field in cases:
        response = requests.post(server.url + "v1/predict", data=body, headers={"Content-Type": content_type}, timeout=60)
        assert phrase in assert_error(response, status, field, root=registry.root), body[:40]
    no_type = requests.post(server.url + "v1/predict", data=b'{"images": [[0.5]]}', timeout=60)  # requests sends no Content-Type
    assert_error(no_type, 415, "body")


def test_a_body_over_the_limit_is_refused_before_it_is_read(server) -> None:
    limit = body_limit(64)
    path = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
    # A Content-Length over the limit: answered from the header alone (the body is never sent).
    status, _, body = raw_request(server.url, f"{path}\r\nContent-Length: {10**12}")
    assert status == 413 and error_of(body) == {"message": error_of(body)["message"], "field": "body"}
    assert f"{limit:,} bytes" in error_of(body)["message"]
    status, _, _ = raw_request(server.url, f"{path}\r\nContent-Length: {limit + 1}")
    assert status == 413
    # Chunked, no Content-Length: refused as soon as the bytes received pass the limit (the last chunk is never sent).
    chunk = b"[" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (limit // len(chunk) + 1)
    status, _, body = raw_request(server.url, f"{path}\r\nTransfer-Encoding: chunked", parts)
    assert status == 413 and error_of(body)["field"] == "body"
    # Just under the limit, chunked: read and parsed (and refused for what it is, not for its size).
    under = json.dumps({"images": [[0.0] * 784] * 2, "adapters": "digit-9", "pad": " " * (limit // 2)}).encode()
    status, _, body = raw_request(server.url, f"{path}\r\nTransfer-Encoding: chunked", [b"%x\r\n%s\r\n0\r\n\r\n" % (len(under), under)])
    assert status == 422 and "('pad')" in error_of(body)["message"]


# ----------------------------------------------------------------------------- batch-mates
def test_a_request_that_fails_in_the_forward_does_not_fail_its_batch_mates(tmp_path: Path, data_root: Path, offline, mnist_test) -> None:
    """digit-5's weights file altered after it was registered: a request naming it fails with 409 when
    its stack loads, inside the batch; the six requests batched with it are answered exactly, and a
    request refused at the gate (bad pixels) fails alone before it joins a batch."""
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    weights = AdapterRegistry(root).path("digit-5") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: its recorded sha256 no longer matches
    weights.write_bytes(bytes(data))
    running = start_service(root, ui=False, data_dir=str(data_root), max_batch_size=7, max_wait_ms=1000)
    try:
        good = [s for s in SPECS if s is not None][:6]
        bodies = [{"images": [pixels(u8(mnist_test, [k])[0])], "adapters": spec} for k, spec in enumerate(good)]
        bodies += [{"images": [pixels(u8(mnist_test, [9])[0])], "adapters": "digit-5@1:0.5,digit-9"}]
        bodies += [{"images": [[2.0] * 784], "adapters": "digit-9"}]
        barrier = threading.Barrier(len(bodies))

        def send(body: dict) -> requests.Response:
            barrier.wait()
            return predict(running.url, body)

        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(send, bodies))
        for k, (spec, response) in enumerate(zip(good, responses, strict=False)):
            assert response.status_code == 200, response.text
            assert_answer(response.json(), mnist_test.x[k : k + 1], spec, offline)
        message = assert_error(responses[6], 409, "adapters", root=root)
        assert "sha256" in message and "digit-5" in message
        assert_error(responses[7], 422, "images", root=root)
        batches = running.service.metrics.batch_requests
        assert batches.sum == 7 and batches.count < 7  # the seven that passed the gate shared forwards
    finally:
        running.close()


# ----------------------------------------------------------------------------- reads, metrics, docs
def test_adapters_lists_every_entry_without_a_server_path(server, registry) -> None:
    listing = requests.get(server.url + "v1/adapters", timeout=30).json()["adapters"]
    assert [e["ref"] for e in listing] == [e.ref for e in registry.list()]
    digit9 = next(e for e in listing if e["ref"] == "digit-9@1")
    entry = registry.get("digit-9@1")
    assert digit9["files"]["adapter_model.safetensors"]["sha256"] == entry.files["adapter_model.safetensors"]["sha256"]
    assert digit9["kind"] == "lora" and digit9["digit"] == 9 and digit9["base_fingerprint"] == entry.base_fingerprint
    text = json.dumps(listing)
    assert_clean(text, root=registry.root)
    assert '"path"' not in text
    one = requests.get(server.url + "v1/adapters/digit-9", timeout=30).json()["adapters"]
    assert one == [digit9]
    assert requests.get(server.url + "v1/adapters/digit-9@1", timeout=30).json()["adapters"] == [digit9]  # one version
    assert "no version 5" in assert_error(requests.get(server.url + "v1/adapters/digit-9@5", timeout=30), 404, "name")
    assert "no registry entry 'digit-42'" in assert_error(requests.get(server.url + "v1/adapters/digit-42", timeout=30), 404, "name")
    assert "invalid registry name" in assert_error(requests.get(server.url + "v1/adapters/" + "Y" * 5000, timeout=30), 422, "name")


def test_metrics_label_requests_by_route_template_and_show_batches_and_the_cache(server, mnist_test) -> None:
    for k in range(30):
        requests.get(server.url + f"v1/adapters/no-such-entry-{k}", timeout=30)
        requests.get(server.url + f"no/such/path/{k}", timeout=30)
    predict(server.url, {"images": [pixels(u8(mnist_test, [0])[0])], "adapters": "digit-1@1:0.3"})
    predict(server.url, {"images": [pixels(u8(mnist_test, [0])[0])], "adapters": "digit-1@1:0.3"})
    response = requests.get(server.url + "metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert "no-such-entry" not in text and "no/such/path" not in text  # the raw paths never become labels
    assert 'mnist_peft_requests_total{endpoint="/v1/adapters/{name}",code="404"} ' in text
    assert 'mnist_peft_requests_total{endpoint="unmatched",code="404"} ' in text
    assert 'mnist_peft_request_seconds_count{endpoint="/v1/predict"}' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['mnist_peft_requests_total{endpoint="/v1/adapters/{name}",code="404"}'] >= 30
    assert values["mnist_peft_cache_hits_total"] >= 1 and values["mnist_peft_cache_misses_total"] >= 1
    assert values["mnist_peft_batch_requests_count"] >= 2 and values["mnist_peft_batch_rows_sum"] >= 2


def test_healthz_and_the_openapi_description_state_the_limits(server) -> None:
    assert requests.get(server.url + "healthz", timeout=30).json() == {"status": "ok"}
    assert requests.head(server.url + "healthz", timeout=30).status_code == 200  # health checkers that send HEAD
    spec = requests.get(server.url + "openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/metrics"} <= set(spec["paths"])
    assert "at most 64 images per request" in spec["info"]["description"]
    assert "Up to 64 images per request" in spec["paths"]["/v1/predict"]["post"]["description"]
    assert set(spec["components"]["schemas"]["PredictRequest"]["properties"]) == {"images", "adapters"}
    docs = requests.get(server.url + "docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# ----------------------------------------------------------------------------- the bearer key
def test_the_api_key_is_required_compared_and_never_echoed(keyed, registry, mnist_test, caplog) -> None:
    body = {"images": [pixels(u8(mnist_test, [0])[0])], "adapters": "digit-9"}
    missing = predict(keyed.url, body)
    assert "Authorization: Bearer" in assert_error(missing, 401, "authorization")
    assert missing.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", "Bearer ", f"Basic {KEY}", KEY):
        wrong = predict(keyed.url, body, headers={"Authorization": header})
        assert_error(wrong, 401, "authorization")
        assert KEY not in wrong.text and KEY[:12] not in wrong.text
    assert predict(keyed.url, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert predict(keyed.url, body, headers={"Authorization": f"bearer  {KEY}"}).status_code == 200  # the scheme is case-insensitive
    for path in ("v1/adapters", "v1/adapters/digit-9", "metrics", "no/such/path"):
        assert requests.get(keyed.url + path, timeout=30).status_code == 401, path
        assert requests.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code in (200, 404)
    for path in ("healthz", "docs", "openapi.json"):
        assert requests.get(keyed.url + path, timeout=30).status_code == 200, path
    # Without the key, a body is never read: a huge Content-Length is answered 401 at once.
    status, _, raw = raw_request(
        keyed.url, f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {10**12}"
    )
    assert status == 401 and error_of(raw)["field"] == "authorization"
    assert KEY not in caplog.text and KEY not in repr(keyed.app.user_middleware)


# ----------------------------------------------------------------------------- the seam: any backend
class ToyBackend:
    """A second ServiceBackend (not the engine): canned answers, and the errors of each kind on cue."""

    def __init__(self) -> None:
        self.closed = False
        self.error: BaseException | None = None  # raised for the spec "raise"

    async def predict(self, images: object, spec: object) -> dict:
        from mnist_peft.errors import EntryNotFoundError, HubError, IntegrityError

        if spec == "raise" and self.error is not None:
            raise self.error
        failures = {
            "boom": RuntimeError("/srv/secret/model.bin exploded"),
            "hub-down": HubError("pull failed: cannot reach the Hub at https://hub.example", repo_id="me/x"),
            "changed": IntegrityError("sha256 mismatch for /srv/reg/digit-9/v1/adapter_model.safetensors", path="/srv/reg/x"),
            "missing": EntryNotFoundError("no registry entry 'x'", name="x"),
        }
        if spec in failures:
            raise failures[spec]
        return {
            "predictions": [{"label": 3, "probabilities": [0.1] * 10} for _ in images],
            "adapters": [{"adapter": "toy@1", "weight": 1.0, "sha256": "0" * 64}],
        }

    def entries(self, name: str | None = None) -> list:
        return []

    def cache_info(self) -> None:
        return None

    def public_message(self, exc: BaseException) -> str:
        from mnist_peft.serving.requests import public_message

        return public_message(exc, None)

    def close(self) -> None:
        self.closed = True


def test_create_api_serves_any_backend_and_maps_each_error_kind_to_its_status() -> None:
    from fastapi.testclient import TestClient

    from mnist_peft.service.api import create_api
    from mnist_peft.serving.metrics import ServingMetrics
    from mnist_peft.serving.requests import GENERIC_MESSAGE

    metrics = ServingMetrics()
    with TestClient(create_api(ToyBackend(), metrics=metrics, max_images=8)) as client:
        ok = client.post("/v1/predict", json={"images": [[0.0] * 784] * 2, "adapters": "anything"})
        assert ok.status_code == 200 and [p["label"] for p in ok.json()["predictions"]] == [3, 3]
        for spec, status, field in (
            ("boom", 500, None),
            ("hub-down", 502, "adapters"),
            ("changed", 409, "adapters"),
            ("missing", 404, "adapters"),
        ):
            message = assert_error(client.post("/v1/predict", json={"images": [[0.0] * 784], "adapters": spec}), status, field)
            assert "/srv/" not in message
            if status == 500:
                assert message == GENERIC_MESSAGE and "exploded" not in message
        assert "Up to 8 images per request" in client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["description"]
        text = client.get("/metrics").text
        assert "mnist_peft_cache_hits_total" not in text  # this backend holds no cache here
        assert 'mnist_peft_requests_total{endpoint="/v1/predict",code="500"} 1' in text


def test_an_error_from_a_ray_replica_keeps_the_status_message_and_field_it_has_in_one_process() -> None:
    """``ray_serve.portable``/``raised``: what crosses from a replica to the ingress is the status, the
    public message and the field the API gives the error here (no Ray needed to check the mapping)."""
    from fastapi.testclient import TestClient

    from mnist_peft.errors import AdapterShapeError, EntryNotFoundError, HubError, IntegrityError, InvalidNameError, NonFiniteError
    from mnist_peft.service.api import create_api
    from mnist_peft.service.failures import error_status
    from mnist_peft.service.ray_serve import portable, raised
    from mnist_peft.serving.metrics import ServingMetrics

    cases = [
        AdapterShapeError("digit-3's lora_A has 783 columns; the base layer takes 784", key="linear1.lora_A"),
        InvalidNameError("invalid registry name 'X'", name="X"),
        EntryNotFoundError("no registry entry 'digit-42'", name="digit-42"),
        IntegrityError("'/srv/reg/digit-3/v1/adapter_model.safetensors' does not match", path="/srv/reg"),
        HubError("the Hub is down", repo_id="me/x"),
        NonFiniteError("the stack's answer is not finite", key="logits"),
        RuntimeError("exploded at /srv/secret"),
    ]
    for exc in cases:
        crossed = raised(portable(exc, Path("/srv/reg")))
        backend = ToyBackend()
        backend.error = crossed
        with TestClient(create_api(backend, metrics=ServingMetrics(), max_images=8)) as client:
            answer = client.post("/v1/predict", json={"images": [[0.0] * 784], "adapters": "raise"})
        assert answer.status_code == error_status(exc), (exc, answer.text)
        assert "/srv/" not in answer.text and "exploded" not in answer.text
