"""The serving engine resolving Hub references (``hub:OWNER/REPO@vN``, ``@<commit>``) against the real
local Hub (olah + ``mnist_peft.hub.local_hub``): an adapter pushed from a copy of the reference
registry answers as the local one does, pulled once and then served with no network; a tampered file
and an adapter of another base are refused with the error that names the problem; a missing or
hostile repo fails its own request and no other.

The engine runs in this process, so ``huggingface_hub``'s endpoint (read from ``HF_ENDPOINT`` when it
was imported) is pointed at the local Hub the way ``HF_ENDPOINT`` would have set it, with no token
of the machine's user anywhere near it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, registry_snapshot, require
from hub_server import HubServer, free_port

from mnist_peft.errors import FingerprintMismatchError, HubError, IntegrityError, RegistryError
from mnist_peft.io.adapters import save_adapter
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving import BatchedEngine, HubResolver, Predictor, RegistryResolver
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

OWNER = "team/ref"  # the reference registry's per-adapter push: the base here, digit-N at team/ref-digit-N
ALIEN = "team/alien"  # a registry with another (random) base and a digit-9 trained on it
# A request answered in a batch with others agrees with its answer alone to float32 rounding (the
# mixed forward adds each row's update in another order; see docs/benchmarks.md): probabilities to 1e-6.
BATCH_ATOL = 1e-6


# ----------------------------------------------------------------------------- the Hub and what is on it
def _point_hub_client_at(mp: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """``huggingface_hub`` in this process talks to ``endpoint`` (as ``HF_ENDPOINT`` set before its import
    would make it) and finds no token of the machine's user."""
    from huggingface_hub import constants

    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    server = HubServer.start(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as mp:
        _point_hub_client_at(mp, server.endpoint, tmp_path_factory.mktemp("hf-home"))
        yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> AdapterRegistry:
    """A copy of the reference registry (``adapters/``): the server's own registry."""
    root = tmp_path_factory.mktemp("serve-hub") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    return AdapterRegistry(root)


@pytest.fixture(scope="module")
def pushed(hub: HubServer, reference: AdapterRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The reference digit-9 and digit-3 pushed as per-adapter repos (``mnist-peft push --per-adapter``'s
    function), and an adapter of another base pushed the same way. Returns repo id -> the commit of v1."""
    from mnist_peft.hub.push import push_adapters_to_hub

    results = push_adapters_to_hub(OWNER, registry=reference, names=["digit-9", "digit-3"])
    alien = AdapterRegistry(tmp_path_factory.mktemp("alien") / "adapters")
    torch.manual_seed(1)
    other_base = MnistMLP().eval()
    other_base.save_pretrained(alien.root.parent / "base")
    alien.add("base", alien.root.parent / "base")
    torch.manual_seed(2)
    model = LoraModel(other_base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    alien.add("digit-9", save_adapter(model, alien.root.parent / "digit-9", metadata={"digit": "9"}), digit=9)
    results += push_adapters_to_hub(ALIEN, registry=alien, names=["digit-9"])
    commits = {r.repo_id: r.commit for r in results if r.repo_id != OWNER and r.repo_id != ALIEN}
    assert set(commits) == {f"{OWNER}-digit-9", f"{OWNER}-digit-3", f"{ALIEN}-digit-9"}
    return commits


@pytest.fixture()
def engine(reference: AdapterRegistry, tmp_path: Path, data_root: Path):
    """A fresh engine: the registry first, then the Hub (a cache of its own in ``tmp_path``)."""
    predictor = Predictor(reference, data_dir=str(data_root), resolvers=[RegistryResolver(reference), HubResolver(tmp_path / "hub-cache")])
    batched = BatchedEngine(predictor)
    yield batched
    batched.close()


@pytest.fixture(scope="module")
def images(mnist_test) -> list[list[float]]:
    """Eight test images as a client sends them: 784 numbers in [0, 1]."""
    return (mnist_test.x[:8] * MNIST_STD + MNIST_MEAN).clamp(0, 1).tolist()


def _probabilities(answer: dict) -> list[list[float]]:
    return [p["probabilities"] for p in answer["predictions"]]


def _publish(hub: HubServer, repo_id: str, files: dict[str, bytes]) -> None:
    """Files put straight into a repo on the test Hub, as a stranger could (no push checks them)."""
    hub.create_repo(repo_id)
    lines = [{"key": "header", "value": {"summary": "hostile"}}]
    lines += [
        {"key": "file", "value": {"path": p, "content": base64.b64encode(b).decode(), "encoding": "base64"}} for p, b in files.items()
    ]
    hub.commit(repo_id, lines)


# ----------------------------------------------------------------------------- served from the Hub
def test_a_hub_adapter_answers_as_the_local_one_and_a_second_request_reads_no_network(
    hub: HubServer, pushed: dict[str, str], engine: BatchedEngine, reference: AdapterRegistry, images, monkeypatch, tmp_path: Path
) -> None:
    """``hub:team/ref-digit-9@v1`` answers every image with the local ``digit-9@1``'s probabilities (which
    differ from the base's: the adapter matters), names the commit it was pulled at, and the second
    request for it is answered with the Hub unreachable and not one byte more sent by the Hub."""
    repo = f"{OWNER}-digit-9"
    commit = pushed[repo]
    local = engine.predict(images, "digit-9@1")
    base = engine.predict(images, None)
    assert _probabilities(local) != _probabilities(base)

    first = engine.predict(images, f"hub:{repo}@v1")
    assert _probabilities(first) == _probabilities(local)
    sha = reference.get("digit-9@1").files["adapter_model.safetensors"]["sha256"]
    assert first["adapters"] == [{"adapter": f"hub:{repo}@{commit}/digit-9@1", "weight": 1.0, "sha256": sha}]
    snapshot = AdapterRegistry(tmp_path / "hub-cache" / repo.replace("/", "--") / commit)  # pinned to the commit it read
    assert [e.ref for e in snapshot.list()] == ["digit-9@1"] and snapshot.get("digit-9").source["revision"] == commit

    sent = dict(hub.sent)
    from huggingface_hub import constants

    dead = f"http://127.0.0.1:{free_port()}"  # the Hub gone: any read of the network now fails
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    again = engine.predict(images[:3], f"hub:{repo}@v1:0.5,digit-3@1")  # a new stack of the pulled adapter
    assert again["adapters"][0]["adapter"] == f"hub:{repo}@{commit}/digit-9@1" and again["adapters"][0]["weight"] == 0.5
    assert _probabilities(again) == _probabilities(engine.predict(images[:3], "digit-9@1:0.5,digit-3@1"))
    assert hub.sent == sent
    with pytest.raises(HubError, match="cannot reach the Hub"):  # the endpoint is dead indeed: a new reference fails
        engine.predict(images[:1], f"hub:{OWNER}-digit-3@v1")


def test_a_hub_adapter_named_by_its_commit_answers_the_same_and_says_that_commit(
    hub: HubServer, pushed: dict[str, str], engine: BatchedEngine, images
) -> None:
    repo = f"{OWNER}-digit-9"
    commit = hub.head(repo)
    assert commit == pushed[repo]  # v1 is the head: the same bytes by tag and by commit
    by_commit = engine.predict(images, f"hub:{repo}@{commit}")
    assert _probabilities(by_commit) == _probabilities(engine.predict(images, "digit-9@1"))
    assert by_commit["adapters"][0]["adapter"] == f"hub:{repo}@{commit}/digit-9@1"
    with pytest.raises(HubError):  # a commit the repo does not have
        engine.predict(images[:1], f"hub:{repo}@{'0' * 40}")


# ----------------------------------------------------------------------------- refused
def test_a_tampered_hub_file_is_refused_by_sha256_and_the_cache_is_unchanged(
    hub: HubServer, pushed: dict[str, str], engine: BatchedEngine, reference: AdapterRegistry, images, tmp_path: Path
) -> None:
    """One byte of digit-3's weights flipped in the Hub's LFS store (the index still records the true
    sha256): the pull refuses it, nothing is added to the cache, the next request is refused again
    (a failed pull is not remembered as an answer), and the server answers everything else."""
    repo = f"{OWNER}-digit-3"
    oid = str(reference.get("digit-3@1").files["adapter_model.safetensors"]["sha256"])
    obj = hub.lfs_object_path(repo, oid)
    good = obj.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0xFF
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    before = registry_snapshot(cache)
    try:
        obj.write_bytes(bytes(data))
        for _ in range(2):
            with pytest.raises(IntegrityError, match=r"digit-3/adapter_model.safetensors .* does not match the sha256 in its index"):
                engine.predict(images[:1], f"hub:{repo}@v1")
            assert registry_snapshot(cache) == before
            assert not any((cache / repo.replace("/", "--")).glob("*/index.db"))
    finally:
        obj.write_bytes(good)  # the module's other tests use this repo's bytes as pushed
    assert engine.predict(images[:1], "digit-3@1")["adapters"][0]["adapter"] == "digit-3@1"


def test_a_hub_adapter_of_another_base_is_refused_naming_both_fingerprints(
    pushed: dict[str, str], engine: BatchedEngine, images, reference: AdapterRegistry
) -> None:
    """The alien adapter's files are intact (its pull succeeds), but it was trained on another base:
    loading it is refused with the two fingerprints, through the engine and through ``answer``, whose
    message names no server path."""
    ref = f"hub:{ALIEN}-digit-9@v1"
    ours = engine.predictor.fingerprint
    with pytest.raises(FingerprintMismatchError) as refused:
        engine.predict(images[:2], ref)
    assert refused.value.actual == ours and refused.value.expected not in ("", ours)
    assert f"trained on base {refused.value.expected[:12]}..., but this server's base is {ours[:12]}..." in str(refused.value)
    assert "hub:team/alien-digit-9@" in str(refused.value)  # named as the request named it, not by its cache folder
    [answer] = engine.predictor.answer([images[0]], [ref])
    assert "trained on base" in answer["error"] and str(engine.predictor.registry.root) not in answer["error"]
    assert "hub-cache" not in answer["error"]
    assert engine.predictor.cache_info().entries == 0  # nothing of it was added to the model


def test_a_missing_or_hostile_repo_or_another_bases_adapter_fails_only_its_own_request(
    hub: HubServer, pushed: dict[str, str], engine: BatchedEngine, images, tmp_path: Path
) -> None:
    """Four clients at once: a good Hub adapter, one of another base (pulled fine, refused when its
    batch loads it), a repo that does not exist and a repo whose index names a path outside its layout.
    The good one and the other base's run in one batch of two; each bad request gets its own error and
    the good one the answer it gets alone."""
    hostile = "stranger/traversal"
    files = {"adapter_model.safetensors": b"x" * 10, "adapter_config.json": b"{}"}
    entry = {
        "name": "digit-7",
        "version": 1,
        "kind": "lora",
        "path": "../../outside",
        "digit": 7,
        "r": 2,
        "lora_alpha": 4,
        "base_fingerprint": None,
        "created": "",
        "metrics": {},
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in files.items()},
    }
    _publish(hub, hostile, {**files, "index.json": json.dumps({"format": 1, "layout": "adapter", "entries": [entry]}).encode()})
    good, alien = f"hub:{OWNER}-digit-9@v1", f"hub:{ALIEN}-digit-9@v1"
    alone = engine.predict(images[:2], good)
    engine.predictor.resolve(alien)  # pulled now, so that both reach the batcher together below

    solo = BatchedEngine(engine.predictor, max_batch=2, max_wait_s=5.0)  # a batch waits for its second request
    specs = {"good": good, "alien": alien, "missing": "hub:team/no-such-repo@v1", "hostile": f"hub:{hostile}@{hub.head(hostile)}"}
    outcomes: dict[str, object] = {}

    def ask(key: str) -> None:
        try:
            outcomes[key] = solo.predict(images[:2], specs[key])
        except Exception as exc:
            outcomes[key] = exc

    threads = [threading.Thread(target=ask, args=(k,)) for k in specs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        solo.close()
    good_answer = outcomes["good"]
    assert isinstance(good_answer, dict) and good_answer["adapters"] == alone["adapters"]
    assert torch.allclose(torch.tensor(_probabilities(good_answer)), torch.tensor(_probabilities(alone)), rtol=0, atol=BATCH_ATOL)
    assert isinstance(outcomes["alien"], FingerprintMismatchError)
    assert isinstance(outcomes["missing"], HubError) and "team/no-such-repo" in str(outcomes["missing"])
    assert isinstance(outcomes["hostile"], RegistryError) and "not the repo layout's" in str(outcomes["hostile"])
    assert solo.metrics.batch_requests.count == 1 and solo.metrics.batch_requests.counts[1] == 1  # one batch, of two
    cache = tmp_path / "hub-cache"  # only the two good pulls were added; the hostile index wrote nothing anywhere
    assert sorted(p.relative_to(cache).parts[0] for p in cache.glob("*/*/index.db")) == ["team--alien-digit-9", "team--ref-digit-9"]
    assert not any(p.name == "outside" for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- through the HTTP API
def test_the_http_api_serves_a_hub_adapter_only_with_allow_hub_and_words_each_refusal(
    pushed: dict[str, str], reference: AdapterRegistry, images, tmp_path: Path, data_root: Path
) -> None:
    """``mnist-peft serve --allow-hub``'s service (built by the same function, served by uvicorn on
    127.0.0.1 in this process, where the Hub client points at the local Hub): the Hub adapter's
    answer over HTTP is the local adapter's, naming the commit; the other base's adapter is a 409 and a
    missing repo a 502, each naming the field and no server path. Without ``--allow-hub`` the same
    reference is a 404 that names the flag, and nothing is pulled."""
    httpx = require("httpx")
    from mnist_peft.service.launch import start_service

    repo = f"{OWNER}-digit-9"
    cache = tmp_path / "hub-cache"
    running = start_service(reference.root, ui=False, allow_hub=True, hub_cache=cache, data_dir=str(data_root))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            local = client.post("/v1/predict", json={"images": images, "adapters": "digit-9@1"})
            served = client.post("/v1/predict", json={"images": images, "adapters": f"hub:{repo}@v1"})
            alien = client.post("/v1/predict", json={"images": images[:1], "adapters": f"hub:{ALIEN}-digit-9@v1"})
            missing = client.post("/v1/predict", json={"images": images[:1], "adapters": "hub:team/no-such-repo@v1"})
    finally:
        running.close()
    assert local.status_code == 200 and served.status_code == 200, served.text
    assert _probabilities(served.json()) == _probabilities(local.json())
    assert served.json()["adapters"][0]["adapter"] == f"hub:{repo}@{pushed[repo]}/digit-9@1"
    assert alien.status_code == 409 and alien.json()["error"]["field"] == "adapters"
    assert "trained on base" in alien.json()["error"]["message"]
    assert missing.status_code == 502 and "team/no-such-repo" in missing.json()["error"]["message"]
    for refused in (alien, missing):
        assert str(tmp_path) not in refused.text and str(reference.root) not in refused.text

    closed = start_service(reference.root, ui=False, hub_cache=tmp_path / "unused", data_dir=str(data_root))
    try:
        with httpx.Client(base_url=closed.url, timeout=60) as client:
            no_hub = client.post("/v1/predict", json={"images": images[:1], "adapters": f"hub:{repo}@v1"})
    finally:
        closed.close()
    assert no_hub.status_code == 404 and "--allow-hub" in no_hub.json()["error"]["message"]
    assert not (tmp_path / "unused").exists()


def test_a_reference_to_a_bundle_or_a_base_is_refused_from_the_index_before_any_download(
    engine: BatchedEngine, pushed: dict[str, str], tmp_path: Path, images: list[list[float]]
) -> None:
    """A bundle (the base, digit-9 and digit-3): naming the repo alone, or its base, is refused from its
    index, with nothing downloaded into the cache; ``/digit-9`` names one entry of it."""
    from mnist_peft.errors import InvalidArgumentError
    from mnist_peft.hub.push import push_to_hub

    bundle = "team/bundle"
    commit = push_to_hub(bundle, registry=reference_of(engine), names=["base", "digit-9", "digit-3"]).commit
    for ref, why in (
        (f"hub:{bundle}@{commit}", f"holds 3 entries .*name one: hub:{bundle}/NAME@"),
        (f"hub:{bundle}/base@{commit}", "is a base"),
    ):
        with pytest.raises(InvalidArgumentError, match=why):
            engine.predict(images[:1], ref)
    cache = tmp_path / "hub-cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]  # refused before a byte was fetched
    answer = engine.predict(images[:1], f"hub:{bundle}/digit-9@{commit}")
    assert [a["adapter"] for a in answer["adapters"]] == [f"hub:{bundle}@{commit}/digit-9@1"]


def reference_of(engine: BatchedEngine) -> AdapterRegistry:
    return engine.predictor.registry
