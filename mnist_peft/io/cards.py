"""Model cards: the ``README.md`` the Hub shows for a base model or an adapter.

A card is YAML front matter the Hub reads (``library_name``, ``base_model``, ``tags``, metrics),
then markdown. Every card this package writes is made here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnist_peft.tuners.lora.config import LoraConfig

__all__ = ["render_model_card", "digit_model_card", "base_model_card", "hub_adapter_card", "stack_model_card", "card_body"]


def _is_repo_id(name: str) -> bool:
    """``owner/name`` that is not a local path: what a card's ``base_model`` may hold."""
    import re

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def render_model_card(
    *,
    base_model: str | None,
    tags: list[str],
    title: str,
    body: str = "",
    extra_yaml: dict[str, object] | None = None,
) -> str:
    """A model card: YAML front matter the Hub reads, then markdown."""
    lines = ["---", "library_name: peft"]
    if base_model and _is_repo_id(base_model):  # the Hub checks base_model names a model repo
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    for key, value in (extra_yaml or {}).items():
        lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", "", f"# {title}", ""]
    if body:
        lines.append(body.rstrip() + "\n")
    return "\n".join(lines)


def digit_model_card(digit: int, result, *, base_model: str | None, config: LoraConfig) -> str:
    """The model card of a per-digit adapter: YAML metadata, then before/after per-digit table."""
    before, after = result.before, result.after
    rows = ["| digit | wrong before | wrong after | error rate before | error rate after |", "|---|---|---|---|---|"]
    for d in range(10):
        mark = " **(target)**" if d == digit else ""
        rows.append(
            f"| {d}{mark} | {before.wrong_per_digit[d]} | {after.wrong_per_digit[d]} | "
            f"{before.error_rate_per_digit[d]:.4f} | {after.error_rate_per_digit[d]:.4f} |"
        )
    kind = _type_title(config.adapter_type)
    body = (
        f"{kind} adapter (r={config.r}, lora_alpha={config.lora_alpha:g}, target_modules={config.target_modules}) trained "
        f"with mnist-peft's `{result.recipe}` recipe to fix digit {digit} of an MNIST MLP.\n\n"
        f"Test accuracy {before.accuracy:.4f} -> {after.accuracy:.4f}; digit {digit} wrong "
        f"{before.wrong_per_digit[digit]} -> {after.wrong_per_digit[digit]} ({result.steps} steps).\n\n"
        + "\n".join(rows)
        + "\n\n```python\nfrom peft import PeftModel\nfrom mnist_peft import MnistMLP\n"
        "model = PeftModel.from_pretrained(MnistMLP.from_pretrained(BASE), ADAPTER)\n```\n"
    )
    extra = {
        "digit": digit,
        "recipe": result.recipe,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "wrong_per_digit_before": before.wrong_per_digit,
        "wrong_per_digit_after": after.wrong_per_digit,
    }
    return render_model_card(
        base_model=base_model,
        tags=[*_type_tags(config.adapter_type), "mnist", f"digit-{digit}", "mnist-peft"],
        title=f"digit-{digit} {kind} adapter",
        body=body,
        extra_yaml=extra,
    )


def base_model_card(recipe: str, result, steps: int, fingerprint: str) -> str:
    """The model card of a trained base: YAML metadata, test accuracy and wrong counts per digit."""
    rows = [
        "| digit | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---" * 11 + "|",
        "| wrong | " + " | ".join(str(w) for w in result.wrong_per_digit) + " |",
    ]
    body = (
        f"The seed's MNIST MLP (784-1000-2000-10, `linear1..3`) trained with mnist-peft's `{recipe}` recipe "
        f"({steps} steps). Test accuracy **{result.accuracy:.4f}** on {result.n} images.\n\n"
        + "\n".join(rows)
        + f"\n\nBase fingerprint: `{fingerprint}`\n\n```python\nfrom mnist_peft import MnistMLP\nmodel = MnistMLP.from_pretrained(REPO_OR_FOLDER)\n```\n"
    )
    card = render_model_card(
        base_model=None,
        tags=["mnist", "image-classification", "mnist-peft"],
        title="MNIST MLP base model",
        body=body,
        extra_yaml={"accuracy": result.accuracy, "wrong_per_digit": result.wrong_per_digit, "recipe": recipe},
    )
    return card.replace("library_name: peft", "library_name: mnist-peft")


def stack_model_card(name: str, members: list[tuple[str, float, str]], *, base_fingerprint: str | None) -> str:
    """The card of a named stack (a registry entry of kind ``stack``): its members, ``(name@version,
    weight, adapter type)`` each, as a table, and how it is served and checked."""
    rows = ["| adapter | type | weight |", "|---|---|---|"]
    rows += [f"| `{ref}` | {_type_title(kind)} | {weight:g} |" for ref, weight, kind in members]
    body = (
        "A named stack of registry adapters (in the manner of AdapterHub's adapter setups): the serving engine answers "
        f"the adapter spec `{name}` with the weighted sum of these adapters, each pinned by version and sha256 in "
        "`stack.json`.\n\n"
        + "\n".join(rows)
        + f"\n\nBase model fingerprint: `{base_fingerprint or 'not recorded'}`. `mnist-peft registry verify` checks that every "
        "member is present and unchanged; a stack pulled without its members names the `mnist-peft pull` that gets them.\n"
    )
    card = render_model_card(base_model=None, tags=["mnist", "mnist-peft", "adapter-stack"], title=f"Adapter stack `{name}`", body=body)
    return card.replace("library_name: peft", "library_name: mnist-peft")


def card_body(card: str) -> str:
    """A card's markdown without its YAML front matter."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


def _type_title(adapter_type: str) -> str:
    """How a card names an adapter type: ``LoRA``, ``DoRA``."""
    return {"lora": "LoRA", "dora": "DoRA"}.get(adapter_type, adapter_type)


def _type_tags(adapter_type: str) -> list[str]:
    """A card's tags for an adapter type: ``lora``; a DoRA adapter is ``lora`` and ``dora`` (peft's
    ``LoraConfig(use_dora=True)``, the tag the Hub lists DoRA adapters under)."""
    return ["lora"] if adapter_type == "lora" else ["lora", adapter_type]


def hub_adapter_card(
    *,
    repo_id: str,
    base_repo_id: str,
    name: str,
    version: int,
    digit: int | None,
    metrics: dict[str, object],
    body: str,
    adapter_type: str = "lora",
) -> str:
    """The card of an adapter published as its own Hub repo, in the metadata the Hub reads: the base
    model and the adapter relation (so the repo shows in the base's adapter tree), ``library_name:
    peft``, the pipeline, tags (``dora`` too for a DoRA adapter), and the test accuracy as
    ``model-index`` eval results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = []
    accuracy = metrics.get("accuracy")
    if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool):
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type="mnist",
                dataset_name="MNIST",
                dataset_split="test",
                metric_type="accuracy",
                metric_value=float(accuracy),
            )
        )
    tags = [*_type_tags(adapter_type), "mnist", "mnist-peft"] + ([f"digit-{digit}"] if digit is not None else [])
    data = ModelCardData(
        base_model=base_repo_id,
        base_model_relation="adapter",
        library_name="peft",
        pipeline_tag="image-classification",
        tags=tags,
        model_name=repo_id,
        eval_results=results or None,
    )
    intro = (
        f"{_type_title(adapter_type)} adapter `{name}` (registry version {version}, git tag `v{version}`) for [{base_repo_id}](../{base_repo_id}).\n\n"
        "```python\nfrom peft import PeftModel\nfrom mnist_peft import MnistMLP\n"
        f'model = PeftModel.from_pretrained(MnistMLP.from_pretrained("{base_repo_id}"), "{repo_id}", revision="v{version}")\n```\n'
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\n{intro}\n{body}"))
