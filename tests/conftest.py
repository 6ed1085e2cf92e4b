"""Shared fixtures: a data root with the bundled MNIST unpacked, seeded models, the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_peft.model.data import ensure_mnist, load_mnist
from mnist_peft.model.mlp import MnistMLP

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data root, filled from the bundled files, used by the library and the CLI alike."""
    root = tmp_path_factory.mktemp("mnist-data")
    ensure_mnist(root)
    os.environ["MNIST_PEFT_DATA"] = str(root)
    return root


@pytest.fixture(scope="session")
def mnist_test(data_root: Path):
    return load_mnist(train=False, data_dir=str(data_root))


@pytest.fixture(scope="session")
def mnist_train(data_root: Path):
    return load_mnist(train=True, data_dir=str(data_root))


@pytest.fixture()
def random_base() -> MnistMLP:
    torch.manual_seed(0)
    return MnistMLP().eval()


@pytest.fixture(scope="session")
def trained_base_dir(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A briefly trained base (1/2 epoch of the default recipe), saved with save_pretrained."""
    from mnist_peft.training.recipes import train_base

    model, _ = train_base("default", data_dir=str(data_root), epochs=0.5)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    return out


def exact_forward(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in exact mode (peft's float ops) under ``no_grad``, the model left in ``auto`` mode."""
    from mnist_peft.tuners.lora.model import set_forward_mode

    set_forward_mode(model, "exact")
    try:
        with torch.no_grad():
            return model(x)
    finally:
        set_forward_mode(model, "auto")


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real ``mnist-peft`` in a subprocess (``python -m mnist_peft``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mnist_peft", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- the web app (test_ui*.py)
def require(module: str):
    """Import an optional test dependency: skipped without it locally, but a failure when ``CI`` is
    set (CI installs the ``[dev]`` extra, so a missing module there is a broken install, not a skip)."""
    import importlib

    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def registry_snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes): equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


class UiServer:
    """``mnist-peft ui`` running in a subprocess on a copy of ``adapters/``."""

    def __init__(self, url: str, root: Path, before: dict[str, bytes], log: Path) -> None:
        self.url, self.root, self.before, self.log = url, root, before, log


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    """The real command, ``python -m mnist_peft ui --root COPY``, on a free 127.0.0.1 port, started
    once for the session in its own process (so the load test's clients do not share the server's
    interpreter) and stopped after. ``before`` is the registry copy's files before the app started."""
    import shutil

    require("gradio")
    require("gradio_client")
    from mnist_peft.app.launch import spawn_app

    work = tmp_path_factory.mktemp("ui-server")
    root = work / "adapters"
    shutil.copytree(REPO / "adapters", root)
    before = registry_snapshot(root)
    log = work / "server.log"
    with spawn_app(root, env={"MNIST_PEFT_DATA": str(data_root)}, log=log) as url:
        yield UiServer(url, root, before, log)
