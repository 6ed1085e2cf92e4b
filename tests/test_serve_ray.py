"""The HTTP API on Ray Serve, for real: a local Ray (2 CPUs), the ``Api`` ingress and 2
``StackReplica`` replicas (multiplexed by resolved stack, batched with ``@serve.batch``), answering
over HTTP exactly what the in-process engine answers, with the same errors and statuses.

Skipped only where ``CI`` is unset and Ray Serve is missing (as the fleet's Ray tests)."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, require

from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.batched import BatchedEngine
from mnist_peft.serving.engine import Predictor

SPECS = [
    "digit-9",
    "digit-3@1:0.5",
    "digit-9@1:0.5,digit-3",
    "digit-0:-1,digit-1:2",
    "digit-7@1",
    "digit-2,digit-4,digit-6",
    "digit-5:0.25",
    "digit-8,digit-1:0.5",
    "digit-6:1.5",
    "digit-4@1,digit-0@1:0.3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    require("ray")
    require("ray.serve")
    require("fastapi")
    import ray

    from mnist_peft.service.ray_serve import RayOptions, run_ray, shutdown

    root = tmp_path_factory.mktemp("ray-serve") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        url = run_ray(RayOptions(root=str(root), replicas=2, data_dir=str(data_root)), port=_free_port())
        yield url, AdapterRegistry(root)
    finally:
        shutdown()


def test_ray_serve_with_two_replicas_answers_as_the_in_process_engine_for_10_stacks(ray_service, mnist_test) -> None:
    import requests
    from ray import serve

    url, registry = ray_service
    pixels = (mnist_test.x[:6] * MNIST_STD + MNIST_MEAN).clamp(0, 1)
    images = [p.tolist() for p in pixels]
    reference = BatchedEngine(Predictor(registry))
    want = {spec: reference.predict(images, spec) for spec in [None, *SPECS]}
    reference.close()

    def ask(spec: str | None) -> tuple[str | None, int, dict]:
        r = requests.post(f"{url}v1/predict", json={"images": images, "adapters": spec}, timeout=120)
        return spec, r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [None, *SPECS] * 3))
    for spec, status, answer in answers:
        assert status == 200, (spec, answer)
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in want[spec]["predictions"]]
        got = torch.tensor([p["probabilities"] for p in answer["predictions"]])
        torch.testing.assert_close(got, torch.tensor([p["probabilities"] for p in want[spec]["predictions"]]), atol=1e-5, rtol=0)
        assert answer["adapters"] == want[spec]["adapters"]  # the same name@version, weights and sha256
    replicas = serve.status().applications["mnist-peft"].deployments["StackReplica"].replica_states
    assert replicas.get("RUNNING") == 2

    # errors cross from the replicas with their status, and name no server path
    bad = requests.post(f"{url}v1/predict", json={"images": images[:1], "adapters": "digit-42"}, timeout=60)
    assert bad.status_code == 404 and "digit-42" in bad.text and str(registry.root) not in bad.text
    bad = requests.post(f"{url}v1/predict", json={"images": [[2.0] * 784], "adapters": "digit-9"}, timeout=60)
    assert bad.status_code == 422 and "images" in bad.text
    listed = requests.get(f"{url}v1/adapters", timeout=60).json()
    assert "digit-9@1" in str(listed) and str(registry.root) not in str(listed)


def replica_stats(times: int = 40) -> dict[str, dict]:
    """Each StackReplica's cache numbers, asked through a handle until both answered (``times`` at most)."""
    from ray import serve

    handle = serve.get_deployment_handle("StackReplica", app_name="mnist-peft")
    seen: dict[str, dict] = {}
    for _ in range(times):
        s = handle.stats.remote().result(timeout_s=60)
        seen[s["replica"]] = s
        if len(seen) == 2:
            break
    return seen


def test_requests_for_one_stack_go_to_the_replica_that_holds_it(ray_service, mnist_test) -> None:
    """``@serve.multiplexed``: 20 requests in a row for a stack no replica holds yet load it once, on
    one replica (routing at random would load it on both with probability 1 - 2**-19). A replica tells
    Ray's routers which stacks it holds every few tenths of a second, so the test waits 2 s after the
    first request (a request that comes sooner may load it on the other replica too, once)."""
    import requests

    url, _ = ray_service
    image = (mnist_test.x[0] * MNIST_STD + MNIST_MEAN).clamp(0, 1).tolist()
    before = replica_stats()
    assert len(before) == 2
    for i in range(20):
        if i == 1:
            time.sleep(2.0)
        r = requests.post(f"{url}v1/predict", json={"images": [image], "adapters": "digit-5:0.75,digit-6:0.5"}, timeout=60)
        assert r.status_code == 200, r.text
    after = replica_stats()
    loaded = {k: after[k]["misses"] - before[k]["misses"] for k in after}
    used = {k: after[k]["hits"] - before[k]["hits"] for k in after}  # one hit per request (the load's own included)
    assert sorted(loaded.values()) == [0, 1]
    holder = max(loaded, key=loaded.__getitem__)
    assert used[holder] >= 20 and sum(used.values()) == used[holder]  # every request went to the replica that holds it
