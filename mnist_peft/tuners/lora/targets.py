"""Which modules of a model LoRA adapts: the walk over the model, ``target_modules`` matching, and
the :class:`~mnist_peft.tuners.lora.layer.LoraLinear` layers already there."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from mnist_peft.errors import AdapterConfigError

from .config import LoraConfig
from .layer import LoraLinear

__all__ = ["check_rank", "find_targets", "lora_layers", "target_layers"]


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` order (pre-order, each module once), without descending into a
    :class:`LoraLinear`: its children (base layer, LoRA weights, dropout) are never targets, and
    skipping them makes the walk several times cheaper (loading an adapter walks the model)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if module._modules and not isinstance(module, LoraLinear):
            prefix = f"{name}." if name else ""
            stack.extend((prefix + k, m) for k, m in reversed(module._modules.items()) if m is not None)


def target_layers(model: nn.Module, config: LoraConfig, lora: list[LoraLinear] | None = None) -> dict[str, nn.Linear | LoraLinear]:
    """``{name: module}`` of the target layers in module order (see :func:`find_targets`); every
    :class:`LoraLinear` met on the way is appended to ``lora`` (one walk serves both)."""
    found: dict[str, nn.Linear | LoraLinear] = {}
    hit: set[str] = set()
    plain = {t for t in config.target_modules if "." not in t}  # matched by a name's last part
    dotted = [t for t in config.target_modules if "." in t]
    for name, module in _walk(model):
        if lora is not None and isinstance(module, LoraLinear):
            lora.append(module)
        last = name.rpartition(".")[2]
        matched = [last] if last in plain else []
        if dotted:
            matched += [t for t in dotted if name == t or name.endswith("." + t)]
        if not matched:
            continue
        if not isinstance(module, (nn.Linear, LoraLinear)):
            raise AdapterConfigError(
                f"target module {name!r} is a {type(module).__name__}, not nn.Linear; LoRA here adapts linear layers only"
            )
        found[name] = module
        hit.update(matched)
    missing = [t for t in config.target_modules if t not in hit]
    if missing:
        linear = [n for n, m in _walk(model) if isinstance(m, (nn.Linear, LoraLinear))]
        raise AdapterConfigError(f"target module(s) {missing} not found in {type(model).__name__}; its linear layers are {linear}")
    return found


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of the target linear layers, in module order.

    Raises:
        AdapterConfigError: a target module is missing or not an ``nn.Linear``.
    """
    return {name: (m.out_features, m.in_features) for name, m in target_layers(model, config).items()}


def check_rank(model: nn.Module, config: LoraConfig) -> None:
    """Refuse ``config.r`` above the highest rank any target layer's update can have (``min(in, out)``,
    the largest over the layers: the bound of ``combine --r``), before any factor is allocated: training
    at r=100,000 allocates GBs that add nothing. A layer narrower than r is allowed, as in peft, so
    :class:`~mnist_peft.tuners.lora.model.LoraModel` itself stays peft's equal; training calls this.

    Raises:
        AdapterConfigError: r is above that rank (or a target module is missing).
    """
    highest = max((min(n_out, n_in) for n_out, n_in in find_targets(model, config).values()), default=0)
    if config.r > highest:
        raise AdapterConfigError(
            f"r={config.r} (--r) is above the highest rank any target layer's update can have ({highest}: "
            f"min(in, out) over {sorted(config.target_modules)}); use --r <= {highest}"
        )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every :class:`LoraLinear` in ``model``."""
    for name, module in _walk(model):
        if isinstance(module, LoraLinear):
            yield name, module
