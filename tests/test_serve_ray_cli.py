"""``mnist-peft serve --ray --replicas 2``, the real command in a subprocess: it starts a local Ray,
serves the same answers as the in-process engine, and stops cleanly on SIGTERM (Ray with it).

Skipped only where ``CI`` is unset and Ray Serve is missing (as the fleet's Ray tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, require

from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.batched import BatchedEngine
from mnist_peft.serving.engine import Predictor


@pytest.mark.slow
def test_the_serve_command_with_ray_answers_as_the_engine_and_stops_on_sigterm(tmp_path: Path, mnist_test, data_root: Path) -> None:
    require("ray.serve")
    require("fastapi")
    import requests

    from mnist_peft.service.launch import spawn_service

    root = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", root)
    images = [p.tolist() for p in (mnist_test.x[:3] * MNIST_STD + MNIST_MEAN).clamp(0, 1)]
    specs = [None, "digit-9@1:0.5,digit-3", "digit-7"]
    reference = BatchedEngine(Predictor(AdapterRegistry(root)))
    want = {spec: reference.predict(images, spec) for spec in specs}
    reference.close()
    log = tmp_path / "serve.log"
    key = tmp_path / "key"
    key.write_text("k" * 32 + "\n")
    key.chmod(0o600)
    with spawn_service(root, args=["--ray", "--replicas", "2", "--api-key-file", str(key)], log=log, timeout=300) as url:
        assert "Ray Serve, 2 replicas" in log.read_text()
        denied = requests.post(f"{url}v1/predict", json={"images": images, "adapters": "digit-7"}, timeout=60)
        assert denied.status_code == 401 and "k" * 32 not in denied.text
        for spec in specs:
            r = requests.post(
                f"{url}v1/predict", json={"images": images, "adapters": spec}, headers={"Authorization": "Bearer " + "k" * 32}, timeout=120
            )
            assert r.status_code == 200, r.text
            got = r.json()
            assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want[spec]["predictions"]]
            torch.testing.assert_close(
                torch.tensor([p["probabilities"] for p in got["predictions"]]),
                torch.tensor([p["probabilities"] for p in want[spec]["predictions"]]),
                atol=1e-5,
                rtol=0,
            )
            assert got["adapters"] == want[spec]["adapters"]
    text = log.read_text()
    assert "stopped" in text and "k" * 32 not in text
