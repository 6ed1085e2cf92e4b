"""The house is as docs/architecture.md says: imports flow one way between the subpackages, no module
imports another in a circle (lazy and typing-only imports included), and the public names resolve."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mnist_peft"

# Lowest first. A module may import from its own layer or the ones below, never from above.
LAYERS = [
    ["errors", "fileio", "numerics", "progress", "lazy"],
    ["model"],
    ["tuners"],
    ["io"],
    ["registry", "merging", "training"],
    ["serving", "fleet", "hub"],
    ["cli", "app", "service", "experiments", "__main__", "__init__"],
]
RANK = {top: i for i, layer in enumerate(LAYERS) for top in layer}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body (every import counts)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
            found |= subs | ({target} if len(subs) < len(node.names) else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in mods and m != name}


def _top(name: str) -> str:
    """The subpackage (or top-level module) a dotted module name belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_subpackage_has_a_layer_and_imports_nothing_above_it() -> None:
    mods = _modules()
    tops = {_top(m) for m in mods}
    assert sorted(tops - set(RANK)) == []  # a new subpackage gets a row in LAYERS and in docs/architecture.md
    upward = [
        f"{m} imports {t}"
        for m, path in mods.items()
        for t in sorted(_imports(m, path, mods))
        if RANK[_top(t)] > RANK[_top(m)] and _top(m) != "__init__"
    ]
    assert upward == []


def test_no_module_imports_another_in_a_circle() -> None:
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    # a package's __init__ handing on its own modules' names is not a circle; two modules are
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start and sum(1 for m in trail if mods[m].name != "__init__.py") >= 2:
                    cycles.append(trail)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert cycles == []


def test_names_come_from_their_own_module_and_no_subpackage_takes_anothers_private_names() -> None:
    """Inside the package a name is imported from the module that defines it, not from a subpackage's
    ``__init__`` (only an ``__init__`` hands on its own modules' names), and a ``_private`` name is
    imported only within its own subpackage."""
    mods = _modules()
    wrong = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("mnist_peft")):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = [a.name for a in node.names if f"{target}.{a.name}" not in mods]  # names, not submodules
            handed_on = [n for n in names if not n.startswith("__")]  # the package's own __version__ is its to give
            if handed_on and target in mods and mods[target].name == "__init__.py" and path.name != "__init__.py":
                wrong.append(f"{name} imports {handed_on} from the package {target}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _top(target) != _top(name):
                wrong.append(f"{name} imports {private} from {target}")
    assert wrong == []


def test_the_architecture_page_names_every_subpackage() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert [s for s in subpackages if f"`{s}/`" not in page] == []


def test_every_public_name_resolves() -> None:
    import mnist_peft

    missing = [n for n in mnist_peft.__all__ if getattr(mnist_peft, n, None) is None]
    assert missing == []
    assert {"AdapterJob", "train_batched", "run_fleet"} <= set(mnist_peft.__all__)
