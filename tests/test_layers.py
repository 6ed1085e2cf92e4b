"""The README's layer table is true: a module imports only from its own layer or the ones below."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

LAYERS = [
    ["errors", "fileio"],
    ["data", "model"],
    ["lora", "fused"],
    ["peft_compat"],
    ["cards", "adapters", "combine"],
    ["train", "recipes", "analysis", "svd_sweep", "merge_study"],
    ["index_store", "registry", "hub", "refs"],
    ["serving"],
    ["fleet"],
    ["bench", "demo", "plots", "ui", "cli", "__main__", "__init__"],
]


def test_every_module_has_a_layer_and_imports_nothing_above_it() -> None:
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    modules = sorted(p.stem for p in (REPO / "mnist_peft").glob("*.py"))
    assert [m for m in modules if m not in rank] == []  # a new module gets a row in the README table
    upward = []
    for m in modules:
        text = Path(REPO / "mnist_peft" / f"{m}.py").read_text()
        for imp in set(re.findall(r"from \.(\w+) import", text)):
            if rank[imp] > rank[m]:
                upward.append(f"{m} imports {imp}")
    assert upward == []
    readme = (REPO / "README.md").read_text()
    for layer in LAYERS[:-1]:
        assert all(f"`{m}`" in readme for m in layer)


def test_every_public_name_resolves() -> None:
    import mnist_peft

    missing = [n for n in mnist_peft.__all__ if getattr(mnist_peft, n, None) is None]
    assert missing == []
    assert {"AdapterJob", "train_batched", "run_fleet"} <= set(mnist_peft.__all__)
