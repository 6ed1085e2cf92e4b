"""What the service tests share (tests/test_service*.py): the library's offline answer for an image and
a stack, the images the API takes, and the checks of an answer and of an error body."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from mnist_peft.io.adapters import load_stack
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.registry.adapter_registry import AdapterRegistry

# The served path folds stack weights into one `cat` adapter and runs a mixed batch; load_stack applies
# them at forward time: the same math in another float32 order, measured up to 1.2e-7 apart on
# probabilities (tests/test_ui.py); 1e-5 is the bar. Labels must agree unless the top two
# logits are within LOGIT_TIE of each other (then either is the argmax within float rounding).
PROB_ATOL = 1e-5
LOGIT_TIE = 1e-4

# Specs that exercise the engine: the base, one adapter, weighted stacks, a negative weight, the list form.
SPECS: list[object] = [
    None,
    "digit-9",
    "digit-9@1:0.5,digit-3@1",
    "digit-7@1:-1",
    "none",
    "digit-3@1:0.5,digit-8@1:0.5,digit-1@1:0.25",
    [["digit-4@1", 0.75], ["digit-2", 1]],
    "digit-0@1:2,digit-6@1:-0.5",
]


def stack_items(spec: object) -> list[tuple[str, float]]:
    """A test spec as ``(ref, weight)`` pairs, parsed by the test itself (not the server's parser)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "base")):
        return []
    if isinstance(spec, list):
        return [(str(ref), float(w)) for ref, w in spec]
    items = []
    for part in str(spec).split(","):
        ref, _, weight = part.strip().partition(":")
        items.append((ref, float(weight) if weight else 1.0))
    return items


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


def u8(mnist_test, indices: list[int]) -> torch.Tensor:
    """Test images back to their (N, 28, 28) uint8 bytes (exact: normalisation round-trips)."""
    x = mnist_test.x[indices].reshape(-1, 28, 28)
    return (x * MNIST_STD + MNIST_MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def pixels(image: torch.Tensor) -> list[float]:
    """A uint8 (28, 28) image as the API takes it: 784 numbers in [0, 1]."""
    return (image.to(torch.float64) / 255).flatten().tolist()


def png_b64(image: torch.Tensor, *, size: tuple[int, int] | None = None) -> str:
    """A uint8 (28, 28) image as a base64 PNG (resized to ``size`` when given)."""
    from PIL import Image

    img = Image.fromarray(image.numpy(), mode="L")
    if size is not None:
        img = img.resize(size)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def assert_answer(answer: dict, x: torch.Tensor, spec: object, offline: Offline) -> None:
    """A ``/v1/predict`` answer for the rows ``x`` (K, 784, normalised) against the library's, and its
    ``adapters`` against the registry's entries (name@version, weight, sha256 of the weights file)."""
    items = stack_items(spec)
    reference = offline.logits(x, items)
    assert len(answer["predictions"]) == len(reference)
    for got, ref in zip(answer["predictions"], reference, strict=True):
        torch.testing.assert_close(torch.tensor(got["probabilities"]), ref.softmax(0), atol=PROB_ATOL, rtol=0)
        top2 = ref.topk(2)
        if float(top2.values[0] - top2.values[1]) > LOGIT_TIE:
            assert got["label"] == int(top2.indices[0])
        else:
            assert got["label"] in top2.indices.tolist()
    entries = [offline.registry.get(ref) for ref, _ in items]
    expected = [
        {"adapter": e.ref, "weight": w, "sha256": e.files["adapter_model.safetensors"]["sha256"]}
        for e, (_, w) in zip(entries, items, strict=True)
    ]
    assert answer["adapters"] == expected


def assert_error(response, status: int, field: str | None, *, root: Path | None = None, sent: str = "") -> str:
    """``response`` is the API's one error shape with ``status`` and ``field``, and its message
    reveals nothing of the server (no path, no exception type or text) nor more than 60 characters
    of ``sent`` (what the client sent). Returns the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "field"}, body
    message = body["error"]["message"]
    assert body["error"]["field"] == field, body
    assert isinstance(message, str) and 10 < len(message) <= 1000, message
    assert_clean(message, root=root)
    if len(sent) > 60:
        assert sent[:60] not in message, message
    return message


SERVER_WORDS = re.compile(
    r"Traceback|File \"|\b\w+(Error|Exception)\b|pydantic|starlette|fastapi|uvicorn|site-packages|/tmp/|/home/|/root/|/work/|\bat 0x"
)


def assert_clean(text: str, *, root: Path | None = None) -> None:
    """No server path, exception class name, traceback or framework name in ``text``."""
    assert not SERVER_WORDS.search(text), text
    if root is not None:
        for form in {str(root), str(root.resolve())}:
            assert form not in text, text


def raw_request(url: str, head: str, body_parts: list[bytes] = (), *, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers, CRLF-joined, without the blank line) and ``body_parts``
    over a plain socket to ``url``'s server, and read one response: (status, headers, body). What no
    HTTP client library lets a test send: a lying Content-Length, a body cut short, a chunked flood."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n")
        try:
            for part in body_parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed first: read its answer
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest[:length]


def error_of(body: bytes) -> dict:
    """The ``error`` object of a raw response's JSON body."""
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, parsed
    return parsed["error"]
