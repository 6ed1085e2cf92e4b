"""The web app's tab seam (``mnist_peft.app.tabs.base.Tab``): a tab written here, an object with a
``title`` and a ``build(page)``, added to the page's tab table, appears on the served page (its label,
its components, its endpoint in the page's ``/config``) and answers through ``gradio_client``; the
built-in tabs and ``/predict`` stay as they were. Nothing in ``mnist_peft`` changes for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO, registry_snapshot, require

from mnist_peft.app.handlers import UiHandlers
from mnist_peft.app.page import DEFAULT_TABS
from mnist_peft.app.tabs.base import Page, Tab
from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.engine import Predictor

ABOUT_TEXT = "mnist-peft: LoRA adapters on MNIST, served from a read-only registry."


class AboutTab:
    """A toy tab: a Markdown, a name box and a button whose handler greets the name and counts the
    registry's adapters (through the shared context the page hands every tab)."""

    title = "About"

    def build(self, page: Page) -> None:
        gr, handlers = page.gr, page.handlers
        gr.Markdown(ABOUT_TEXT, elem_id="about-text")
        name = gr.Textbox(label="your name", elem_id="about-name")
        answer = gr.Textbox(label="answer", elem_id="about-answer")

        def greet(who: str) -> str:
            if not who.strip():
                raise InvalidArgumentError("give a name to greet")
            return f"hello {who}: {len(handlers.adapter_choices())} adapters in the registry"

        gr.Button("Greet", elem_id="about-button").click(page.public(greet), [name], [answer], api_name="about")


def test_the_toy_tab_implements_the_tab_interface() -> None:
    assert isinstance(AboutTab(), Tab) and [t.title for t in DEFAULT_TABS] == ["Draw", "Test images", "Registry"]


@pytest.fixture(scope="module")
def about_app(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    """The app with the toy tab appended to the default table, served in this process on 127.0.0.1."""
    require("gradio")
    require("gradio_client")
    from mnist_peft.app.launch import serve

    root = tmp_path_factory.mktemp("tab-seam") / "adapters"
    shutil.copytree(REPO / "adapters", root)
    before = registry_snapshot(root)
    handlers = UiHandlers(Predictor(AdapterRegistry(root), data_dir=str(data_root)))
    running = serve(handlers, max_batch_size=8, tabs=[*DEFAULT_TABS, AboutTab()])
    yield running
    running.close()
    assert registry_snapshot(root) == before  # the toy tab, like the others, writes nothing


def test_a_tab_added_to_the_table_appears_in_the_served_page(about_app) -> None:
    import httpx

    config = httpx.get(about_app.url + "config", timeout=30).json()
    components = {c["id"]: c for c in config["components"]}
    tabs = [c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Draw", "Test images", "Registry", "About"]  # appended after the built-in tabs, in table order
    about = next(c for c in config["components"] if c["type"] == "tabitem" and c["props"].get("label") == "About")
    inside = _descendants(config["layout"], about["id"])
    by_elem = {components[i]["props"].get("elem_id"): components[i] for i in inside}
    assert by_elem["about-text"]["type"] == "markdown" and ABOUT_TEXT in str(by_elem["about-text"]["props"]["value"])
    assert {"about-name", "about-button", "about-answer"} <= set(by_elem)
    endpoint = next(d for d in config["dependencies"] if d.get("api_name") == "about")
    assert endpoint["targets"][0][0] == by_elem["about-button"]["id"]
    assert [components[i]["props"]["elem_id"] for i in endpoint["inputs"]] == ["about-name"]
    assert [components[i]["props"]["elem_id"] for i in endpoint["outputs"]] == ["about-answer"]


def test_the_added_tabs_endpoint_answers_through_gradio_client_and_the_rest_of_the_page_still_does(about_app, mnist_test) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(about_app.url, verbose=False, analytics_enabled=False, ssl_verify=False)
    try:
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/about", "/predict", "/draw", "/registry"} <= set(endpoints)
        adapters = len(about_app.handlers.adapter_choices())
        assert adapters >= 10  # the reference registry's ten digit adapters
        assert client.predict("Ada", api_name="/about") == f"hello Ada: {adapters} adapters in the registry"
        with pytest.raises(AppError, match="give a name to greet"):  # library errors reach the client through page.public
            client.predict("  ", api_name="/about")
        pixels = (mnist_test.x[0].reshape(28, 28) * MNIST_STD + MNIST_MEAN).clamp(0, 1).tolist()
        answer = client.predict(pixels, "digit-9@1", api_name="/predict")
        assert answer["base"]["label"] == int(mnist_test.y[0]) and answer["stack"]["adapters"] == [{"adapter": "digit-9@1", "weight": 1.0}]
    finally:
        client.close()


def _descendants(layout: dict, target: int) -> set[int]:
    """The ids of every component below ``target`` in the page's layout tree."""

    def walk(node: dict, inside: bool) -> set[int]:
        here = inside or node["id"] == target
        found = {node["id"]} if inside else set()
        for child in node.get("children", []):
            found |= walk(child, here)
        return found

    return walk(layout, False)
