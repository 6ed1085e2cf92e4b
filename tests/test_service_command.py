"""The real ``mnist-peft serve`` in a subprocess (``spawn_service``, one server for the module) with
``requests`` clients: 200 requests from 20 clients all answered as the library does, /metrics, the
listing, /healthz, /docs, the web app at /ui on the same engine, the docs' curl and requests
examples; the command's option checks, its API key file and a clean stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, registry_snapshot, require
from service_support import SPECS, Offline, assert_answer, assert_clean, pixels, u8

from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import resolve_base

DOC = REPO / "docs" / "serving.md"
DOC_URL = "http://127.0.0.1:8000/"


class Served:
    """``mnist-peft serve`` running in a subprocess on a copy of ``adapters/``."""

    def __init__(self, url: str, root: Path, before: dict[str, bytes], log: Path) -> None:
        self.url, self.root, self.before, self.log = url, root, before, log


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    require("fastapi")
    require("uvicorn")
    require("gradio")
    from mnist_peft.service.launch import spawn_service

    work = tmp_path_factory.mktemp("serve-command")
    root = work / "adapters"
    shutil.copytree(REPO / "adapters", root)
    before = registry_snapshot(root)
    log = work / "server.log"
    with spawn_service(root, env={"MNIST_PEFT_DATA": str(data_root)}, log=log) as url:
        yield Served(url, root, before, log)


@pytest.fixture(scope="module")
def offline(served: Served) -> Offline:
    registry = AdapterRegistry(served.root)
    return Offline(resolve_base("base", registry).eval(), registry)


def metric_values(url: str) -> dict[str, float]:
    requests = require("requests")
    text = requests.get(url + "metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


# ----------------------------------------------------------------------------- load
def test_200_requests_from_20_clients_are_all_answered_as_the_library_does(served, offline, mnist_test) -> None:
    """200 requests of 1 to 3 test images each, over the base, single adapters, weighted stacks and the
    list form, from 20 concurrent clients: every answer equals the library's (labels, probabilities
    within 1e-5, the adapters' name@version and sha256); the server batched requests together; the
    registry's files are byte-identical afterwards."""
    requests = require("requests")
    g = torch.Generator().manual_seed(24)
    picks = [torch.randperm(len(mnist_test.y), generator=g)[: 1 + k % 3].tolist() for k in range(200)]
    bodies = [{"images": [pixels(i) for i in u8(mnist_test, idx)], "adapters": SPECS[k % len(SPECS)]} for k, idx in enumerate(picks)]
    before = metric_values(served.url)

    def client(c: int) -> list[tuple[int, dict]]:
        with requests.Session() as session:
            return [(k, session.post(served.url + "v1/predict", json=bodies[k], timeout=120).json()) for k in range(c, 200, 20)]

    with ThreadPoolExecutor(20) as pool:
        answers = dict(pair for share in pool.map(client, range(20)) for pair in share)
    assert sorted(answers) == list(range(200))
    for k, answer in answers.items():
        assert_answer(answer, mnist_test.x[picks[k]], bodies[k]["adapters"], offline)
    after = metric_values(served.url)
    ok = 'mnist_peft_requests_total{endpoint="/v1/predict",code="200"}'
    assert after[ok] - before.get(ok, 0) == 200
    batches = after["mnist_peft_batch_requests_count"] - before.get("mnist_peft_batch_requests_count", 0)
    batched = after["mnist_peft_batch_requests_sum"] - before.get("mnist_peft_batch_requests_sum", 0)
    assert batched == 200 and batches < 200  # some forwards answered several clients' requests
    assert after["mnist_peft_batch_rows_sum"] - before.get("mnist_peft_batch_rows_sum", 0) == sum(len(p) for p in picks)
    assert registry_snapshot(served.root) == served.before  # served read-only: no file added, removed or changed


# ----------------------------------------------------------------------------- the routes around /v1/predict
def test_the_listing_health_and_docs_are_served_without_server_paths(served) -> None:
    requests = require("requests")
    listing = requests.get(served.url + "v1/adapters", timeout=30)
    assert listing.status_code == 200
    refs = [e["ref"] for e in listing.json()["adapters"]]
    assert refs == [e.ref for e in AdapterRegistry(served.root).list()] and "digit-9@1" in refs
    assert_clean(listing.text, root=served.root)
    assert requests.get(served.url + "healthz", timeout=30).json() == {"status": "ok"}
    assert "swagger" in requests.get(served.url + "docs", timeout=30).text.lower()
    assert "/v1/predict" in requests.get(served.url + "openapi.json", timeout=30).json()["paths"]


def test_the_web_app_at_ui_is_served_on_the_same_engine(served, offline, mnist_test) -> None:
    """/ui is the Gradio page; a prediction through its /predict endpoint loads a new stack into the
    engine's cache (a miss on /metrics), and the API's request for that stack then finds it there (a hit)."""
    requests = require("requests")
    gradio_client = require("gradio_client")
    page = requests.get(served.url + "ui/", timeout=60)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    spec = "digit-4@1:0.7,digit-2@1:0.3"  # in no other test: its first use loads it
    image = u8(mnist_test, [11])[0]
    before = metric_values(served.url)
    client = gradio_client.Client(served.url + "ui/", verbose=False, analytics_enabled=False, ssl_verify=False)
    try:
        answer = client.predict((image.to(torch.float64) / 255).tolist(), spec, api_name="/predict")
    finally:
        client.close()
    middle = metric_values(served.url)
    assert middle["mnist_peft_cache_misses_total"] == before["mnist_peft_cache_misses_total"] + 1
    api = requests.post(served.url + "v1/predict", json={"images": [pixels(image)], "adapters": spec}, timeout=60).json()
    after = metric_values(served.url)
    assert after["mnist_peft_cache_misses_total"] == middle["mnist_peft_cache_misses_total"]
    assert after["mnist_peft_cache_hits_total"] >= middle["mnist_peft_cache_hits_total"] + 1
    assert_answer(api, mnist_test.x[[11]], spec, offline)
    torch.testing.assert_close(
        torch.tensor(answer["stack"]["probabilities"]), torch.tensor(api["predictions"][0]["probabilities"]), atol=1e-6, rtol=0
    )
    assert 'endpoint="/ui"' in requests.get(served.url + "metrics", timeout=30).text


# ----------------------------------------------------------------------------- the docs' examples
def _section_blocks(lang: str) -> list[str]:
    section = DOC.read_text().split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{lang}\n(.*?)^```", section, flags=re.S | re.M)


def _matches(shown: str, printed: str) -> bool:
    """A line the docs show against the line printed: equal, or, where the docs cut it short with
    ``...``, the shown pieces in order."""
    return re.fullmatch(".*?".join(re.escape(piece) for piece in shown.split("...")), printed) is not None


def test_the_docs_curl_and_requests_examples_run_against_a_live_server(served, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None and not os.environ.get("CI"):
        pytest.skip("curl is not installed")
    (shell,) = [b for b in _section_blocks("bash") if "curl -s " + DOC_URL in b]
    (python,) = [b for b in _section_blocks("python") if DOC_URL in b]
    shown_shell, shown_python = _section_blocks("text")[:2]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3: this venv's
    run = subprocess.run(
        ["bash", "-e", "-c", shell.replace(DOC_URL, served.url)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout.splitlines()
    assert len(printed) == len(shown_shell.splitlines()) == 3, run.stdout
    for shown, line in zip(shown_shell.splitlines(), printed, strict=True):
        assert _matches(shown, line), (shown, line)
    assert json.loads(printed[1])["predictions"][0]["label"] in range(10)
    run = subprocess.run(
        [sys.executable, "-c", python.replace(DOC_URL, served.url)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == shown_python, run.stdout  # exactly what the page shows


# ----------------------------------------------------------------------------- the command
def test_serve_with_an_api_key_file_needs_the_key_and_stops_cleanly_on_sigterm(served, tmp_path: Path, data_root: Path) -> None:
    requests = require("requests")
    from mnist_peft.service.launch import spawn_service

    key = "s3cret-key-of-the-test-0123456789"
    key_file = tmp_path / "key.txt"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    log = tmp_path / "server.log"
    body = {"images": [[0.0] * 784], "adapters": "digit-9"}
    with spawn_service(
        served.root, args=["--no-ui", "--api-key-file", str(key_file)], env={"MNIST_PEFT_DATA": str(data_root)}, log=log
    ) as url:
        assert requests.post(url + "v1/predict", json=body, timeout=60).status_code == 401
        assert requests.post(url + "v1/predict", json=body, headers={"Authorization": f"Bearer {key}x"}, timeout=60).status_code == 401
        assert requests.post(url + "v1/predict", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
        assert requests.get(url + "healthz", timeout=30).status_code == 200
        assert requests.get(url + "ui/", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 404  # --no-ui
    text = log.read_text()
    assert "an API key is required" in text and "no app at /ui (--no-ui)" in text
    assert re.search(r"stopped after 5 requests\n\Z", text), text  # SIGTERM: served what it had, then stopped
    assert key not in text and "Traceback" not in text


def test_serve_checks_every_option_before_loading_anything(tmp_path: Path) -> None:
    """Each bad option is named as a usage error (exit 2) before the registry is opened (it does not
    exist here: with good options, that is the error, exit 1). The real ``main``, in one subprocess."""
    nowhere = str(tmp_path / "nowhere")
    empty, short, loose = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "loose.txt"
    empty.write_text("\n")
    short.write_text("hunter2\n")
    loose.write_text("a-good-long-key-in-a-loose-file-0123\n")
    loose.chmod(0o644)
    runs = [
        (["--port", "0"], "error: --port 0 is not a port number"),
        (["--max-batch-size", "0"], "error: --max-batch-size 0 is not a batch size"),
        (["--max-wait-ms", "nan"], "error: --max-wait-ms nan is not a wait"),
        (["--max-images", "0"], "error: --max-images 0 is out of range: give an integer in [1, 1024]"),
        (["--max-images", "5000"], "error: --max-images 5000 is out of range"),
        (["--cache-mb", "-1"], "error: --cache-mb -1.0 is not a memory budget"),
        (["--hub-cache", str(tmp_path)], "error: --hub-cache is where --allow-hub keeps what it pulls"),
        (["--replicas", "2"], "error: --replicas sets the Ray Serve deployment's replicas: give --ray too"),
        (["--ray", "--replicas", "0"], "error: --replicas 0 is not a number of replicas"),
        (["--api-key-file", str(tmp_path / "missing.txt")], "cannot be read (No such file or directory)"),
        (["--api-key-file", str(empty)], "is empty: put a key of 16 or more characters in it"),
        (["--api-key-file", str(short)], "does not hold one key: one line of 16 to 4,096 printable ASCII characters"),
        (["--api-key-file", str(loose)], "error: no registry at"),
    ]
    code = (
        "from mnist_peft.cli.main import main\n"
        f"for extra in {[r[0] for r in runs]!r}:\n"
        "    try:\n"
        f"        code = main(['serve', '--root', {nowhere!r}, *extra])\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "    print('exit', code, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.splitlines() == ["exit 2"] * (len(runs) - 1) + ["exit 1"], proc.stdout + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    warning = f"warning: --api-key-file {str(loose)!r} can be read by other users (mode 644): chmod 600 it"
    assert warning in lines and "Traceback" not in proc.stderr
    errors = [line for line in lines if line != warning]
    assert len(errors) == len(runs), lines
    for (_, expected), line in zip(runs, errors, strict=True):
        assert line.startswith("error: ") and expected in line, (expected, line)
    assert "a-good-long-key" not in proc.stderr and stat.S_IMODE(loose.stat().st_mode) == 0o644


def test_serve_without_the_api_extra_says_how_to_install_it(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    code = f"import sys; sys.modules['fastapi'] = None; from mnist_peft.cli.main import main; sys.exit(main(['serve', '--root', {str(root)!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "pip install -e '.[api]'" in proc.stderr and "fastapi" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_service_package_imports_without_fastapi_uvicorn_or_gradio() -> None:
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'gradio', 'starlette'): sys.modules[m] = None\n"
        "import mnist_peft.service, mnist_peft.service.launch, mnist_peft.service.backend, mnist_peft.service.failures\n"
        "import mnist_peft.cli.serve\n"
        "from mnist_peft.service import build_service, start_service, spawn_service, LocalBackend\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-2000:]


def test_serve_help_explains_the_command() -> None:
    from mnist_peft.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = " ".join(sub.choices["serve"].format_help().split())
    for flag in ("--root", "--base", "--host", "--port", "--allow-hub", "--hub-cache", "--api-key-file", "--max-batch-size",
                 "--max-wait-ms", "--max-images", "--cache-mb", "--no-ui", "--ray", "--replicas", "--data-dir"):  # fmt: skip
        assert flag in text, flag
    assert "POST /v1/predict" in text and "docs/serving.md" in text and "pip install -e '.[api]'" in text
