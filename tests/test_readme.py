"""The README and every page under docs/ say what is true: their Python blocks run as written (in a
fresh Python, against the local Hub where a page pushes or pulls), every ``mnist-peft`` line of their
shell blocks parses with the real parser, the README's command table lists every command with flags
that exist, and every relative link points to a file (and heading) that exists."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
# A block that talks to a running `mnist-peft ui` needs a live app: tests/test_ui.py runs it against one.
LIVE_APP = 'Client("http://127.0.0.1:7860/"'
LIVE_SERVICE = '"http://127.0.0.1:8000/'  # docs/serving.md: tests/test_service_command.py runs it against a live server
# Files a page must leave behind, beyond running without an error.
LEAVES = {"docs/python-api.md": "out/pulled/index.db"}
# Places docs/architecture.md names for additions that do not exist yet (where they *would* go).
PLANNED = {"mnist_peft/registry/stores/postgres.py"}
SUBPACKAGES = ["model", "tuners", "io", "merging", "registry", "hub", "training", "fleet", "serving", "app", "cli", "experiments"]


def _rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block as (language, code); fences indented in a list item are dedented."""
    found = re.findall(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", text, flags=re.S | re.M)
    return [(lang, "\n".join(line[len(indent) :] for line in code.splitlines())) for indent, lang, code in found]


def _python(page: Path) -> str:
    return "\n".join(
        code for lang, code in _blocks(page.read_text()) if lang == "python" and LIVE_APP not in code and LIVE_SERVICE not in code
    )


def _commands(page: Path) -> list[str]:
    """The ``mnist-peft ...`` lines of a page's shell blocks, continuation lines joined."""
    lines = []
    for lang, code in _blocks(page.read_text()):
        if lang in SHELL:
            for line in code.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("mnist-peft "):
                    lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^( *)```.*?^\1```", "", page.read_text(), flags=re.S | re.M)  # no '#' lines of code
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_the_readme_stays_short_and_every_docs_page_is_covered() -> None:
    readme = REPO / "README.md"
    assert len(readme.read_bytes()) <= 15_000, "the README is a five-minute read: move depth to docs/"
    assert _python(readme), "the README lost its Python tour"
    assert (REPO / "docs" / "architecture.md").is_file()
    # The web app's gradio_client block is not run here: tests/test_ui.py runs it against a live app.
    assert LIVE_APP in (REPO / "docs" / "web-app.md").read_text()
    assert "docs/web-app.md" in (REPO / "tests" / "test_ui.py").read_text()
    # The service's requests block likewise: tests/test_service_command.py runs it against a live server.
    assert LIVE_SERVICE in (REPO / "docs" / "serving.md").read_text()
    assert '"docs" / "serving.md"' in (REPO / "tests" / "test_service_command.py").read_text()


@pytest.mark.parametrize("page", [p for p in PAGES if _python(p)], ids=_rel)
def test_the_python_blocks_of_a_page_run(page: Path, tmp_path: Path, data_root) -> None:
    from hub_server import HubServer

    code = _python(page)
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    env = {**os.environ, "MNIST_PEFT_DATA": str(data_root)}
    hub = HubServer.start(tmp_path / "hub") if re.search(r"\b(push_to_hub|pull_from_hub)\b", code) else None
    try:
        if hub is not None:
            env.update(hub.env(tmp_path / "hf-home"))
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if hub is not None:
            hub.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    if _rel(page) in LEAVES:
        assert (tmp_path / LEAVES[_rel(page)]).is_file()


@pytest.mark.parametrize("page", [p for p in PAGES if _commands(p)], ids=_rel)
def test_every_mnist_peft_line_of_a_page_parses(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mnist_peft.cli import build_parser

    parser = build_parser()
    for line in _commands(page):
        args = shlex.split(line, comments=True)[1:]
        if args[-1:] == ["&"]:  # run in the background by the shell: not an argument
            args = args[:-1]
        if any("..." in a for a in args):  # a placeholder for "more of the same" (`--adapter A ...`): not a real line
            continue
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            assert exc.code == 0, f"{_rel(page)}: `{line}` does not parse: {capsys.readouterr().err.strip()}"


def test_the_command_table_lists_every_command_with_flags_that_exist() -> None:
    import argparse

    from mnist_peft.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = re.findall(r"^\| `mnist-peft ([a-z-]+)([^`]*)` \|", (REPO / "README.md").read_text(), flags=re.M)
    assert sorted({name for name, _ in rows}) == sorted(sub.choices), "one row per command in the README's table"
    for name, usage in rows:
        known = {s for action in sub.choices[name]._actions for s in action.option_strings}
        assert set(re.findall(r"--[a-z][a-z-]*", usage)) <= known, f"`mnist-peft {name}`: a flag in the table it does not have"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_and_code_path_of_a_page_exists(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    # Paths of the code named in backticks (`mnist_peft/tuners/lora/fused.py`, `tests/test_fleet.py`,
    # and inside the package `tuners/lora/ledger.py`): a module that moved fails here.
    for path in re.findall(r"`((?:mnist_peft|tests)/[\w./-]*)`", text):
        if path not in PLANNED and not (REPO / path).exists():
            broken.append(f"`{path}`")
    for path in re.findall(rf"`((?:{'|'.join(SUBPACKAGES)})/[\w./-]*\.py)`", text):
        if f"mnist_peft/{path}" not in PLANNED and not (REPO / "mnist_peft" / path).exists():
            broken.append(f"`{path}`")
    assert broken == [], f"{_rel(page)}: {broken}"
