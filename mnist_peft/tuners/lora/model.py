"""The LoRA model: :class:`LoraModel` (add, activate, stack, merge, unmerge, unload) and
:func:`inject_adapter`, which wraps a model's target ``nn.Linear`` layers in
:class:`~mnist_peft.tuners.lora.layer.LoraLinear`.

The model owns the adapter state (:class:`~mnist_peft.tuners.lora.layer.AdapterState`); every
layer reads that one object. Which layers are targets is :mod:`~mnist_peft.tuners.lora.targets`'
business, checking weights before they load is :mod:`~mnist_peft.tuners.lora.state_dict`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from mnist_peft.errors import AdapterConfigError, AdapterStateError, InvalidArgumentError, MergeError
from mnist_peft.numerics import MAX_WEIGHT, first_non_finite, require_finite_number

from .config import BASE_ADAPTER, DEFAULT_ADAPTER, LoraConfig
from .layer import AdapterState, ForwardMode, LoraLinear, release_layer, valid_adapter_name, variant_of
from .state_dict import adapter_state_dict, base_state_dict, check_bounded_updates, check_fits_dtypes, check_lora_state_dict
from .targets import lora_layers, target_layers

__all__ = ["LoraModel", "inject_adapter", "set_forward_mode"]


# ----------------------------------------------------------------------------- injection
def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    state: AdapterState | None = None,
    source: str | None = None,
) -> list[str]:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoraLinear` and add an adapter.

    Layers already wrapped get the new adapter added. Targets are visited in ``named_modules``
    order (as peft does), so seeded inits match peft's. With ``state_dict`` the weights are
    checked first (nothing changes if they do not fit) and copied in. New layers share ``state``
    (default: the state of the model's existing LoRA layers, else a new one); ``source`` names where
    ``state_dict`` came from, in error messages. Returns the adapted names.

    Raises:
        AdapterConfigError, AdapterKeyError, AdapterShapeError, NonFiniteError: see :func:`check_lora_state_dict`.
    """
    if not valid_adapter_name(adapter_name):
        raise AdapterStateError(f"adapter name {adapter_name!r} is not allowed; see valid_adapter_name()")
    return _inject(model, target_layers(model, config), config, adapter_name, state_dict=state_dict, state=state, source=source)


def _inject(
    model: nn.Module,
    modules: dict[str, nn.Linear | LoraLinear],
    config: LoraConfig,
    adapter_name: str,
    *,
    state_dict: dict[str, torch.Tensor] | None,
    state: AdapterState | None,
    source: str | None,
) -> list[str]:
    if state_dict is not None:
        check_lora_state_dict(
            model, config, state_dict, path=source, targets={n: (m.out_features, m.in_features) for n, m in modules.items()}
        )
        check_fits_dtypes(state_dict, modules, source)
        check_bounded_updates(config, state_dict, source)  # finite values of 1e19 would still overflow the outputs
    if state is None:
        state = next((layer.state for _, layer in lora_layers(model)), None) or AdapterState()
    variant = variant_of(config)
    per_layer = {name: None if state_dict is None else _layer_weights(state_dict, name) for name in modules}
    for name, module in modules.items():  # every layer checked before any changes
        base = module.base_layer if isinstance(module, LoraLinear) else module
        variant.check_base(base, config, per_layer[name], layer_name=name, path=source)
    for name, module in modules.items():
        layer = module
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(module, state)
            _replace_module(model, name, layer)
        layer.update_layer(adapter_name, config, per_layer[name])
    return list(modules)


def _layer_weights(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Layer ``name``'s tensors of ``state_dict`` by key suffix (``lora_A.weight``, ...)."""
    return {k[len(name) + 1 :]: t for k, t in state_dict.items() if k.startswith(f"{name}.")}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def set_forward_mode(model: nn.Module, mode: ForwardMode) -> None:
    """``"exact"``: always peft's float ops; ``"auto"``: the fused path for inference."""
    if mode not in ("auto", "exact"):
        raise InvalidArgumentError(f"forward mode must be 'auto' or 'exact', got {mode!r}")
    for _, layer in lora_layers(model):
        layer.state.forward_mode = mode


# ----------------------------------------------------------------------------- the model's checks
def _check_new_name(adapter_name: str, taken: Iterable[str]) -> None:
    """Raise :class:`AdapterStateError` unless ``adapter_name`` is allowed and not in ``taken``."""
    if not valid_adapter_name(adapter_name):
        raise AdapterStateError(
            f"adapter name {adapter_name!r} is not allowed; use a non-empty name without '.' that does not start with '_', "
            f"other than {BASE_ADAPTER!r} and the attribute names of a parameter dict ('keys', 'training', ...)"
        )
    if adapter_name in taken:
        raise AdapterStateError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")


def _stack_weights(names: list[str], weights: Sequence[float] | None) -> list[float]:
    """One checked, finite stack weight per name (default 1); refuses a repeated name or a count mismatch."""
    if len(set(names)) != len(names):
        raise AdapterStateError(f"adapter names {names} repeat a name; give each adapter once (use its weight to scale it)")
    if weights is not None and len(weights) != len(names):
        raise AdapterStateError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
    if weights is None:
        return [1.0] * len(names)
    fix = f"give each adapter a finite weight within +-{MAX_WEIGHT:g} (--weight)"
    try:  # the bound of combine's weights: one bound for every door that takes a weight
        return [
            require_finite_number(w, name=f"stack weight of {n!r}", fix=fix, max_abs=MAX_WEIGHT)
            for n, w in zip(names, weights, strict=True)
        ]
    except InvalidArgumentError as exc:
        raise AdapterConfigError(str(exc)) from None


def _merge_plan(model: nn.Module, names: list[str], safe_merge: bool) -> list[tuple[LoraLinear, list[str], torch.Tensor]]:
    """``(layer, adapters to merge there, merged weight)`` for each layer with work to do; nothing is
    live yet. With ``safe_merge`` a non-finite merged weight raises :class:`MergeError` (the check is
    the finiteness gate of :mod:`mnist_peft.numerics`)."""
    plan = []
    for lname, layer in lora_layers(model):
        todo = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
        if todo:
            plan.append((lname, layer, todo, layer.merged_weight(todo)))
    if safe_merge:
        for lname, _, todo, weight in plan:
            if first_non_finite([(lname, weight)]) is not None:
                raise MergeError(
                    f"merging adapter(s) {todo} into {lname!r} gives NaN/Inf weights; the model was left "
                    "unchanged. Check the adapter's weights (or lower its stack weight)"
                )
    return [(layer, todo, weight) for _, layer, todo, weight in plan]


def _require_stack_prefix(layers: list[LoraLinear], active: list[str], merged: list[str], names: list[str]) -> None:
    """With an adapter whose term rescales the output so far (DoRA) in play, merging must take the
    active stack in order (``merged`` so far, then ``names``: a prefix of it); merging out of order would
    change what the model computes."""
    in_play = set(names) | set(active)
    if not any(layer.variants[n].rescales for layer in layers for n in in_play if n in layer.variants):
        return
    wanted = merged + [n for n in names if n not in merged]
    if wanted != active[: len(wanted)]:
        raise AdapterStateError(
            f"cannot merge {names} with {merged or 'nothing'} merged: with a DoRA adapter in play (its term rescales "
            f"the output so far), a merge must take the active stack {active} in order; merge the whole stack "
            "(merge()), or unmerge() first"
        )


# ----------------------------------------------------------------------------- the model
class LoraModel(nn.Module):
    """A base model with named LoRA adapters: add, activate, stack, merge, unmerge, unload.

    The model owns the adapter state (:class:`AdapterState`); its layers read it. Adapters may sit
    on different subsets of the target layers: every operation takes each layer's share.

    Example:
        >>> model = LoraModel(MnistMLP(), LoraConfig(r=4, lora_alpha=4))
        >>> model.merge(); model.unmerge()   # the base weight comes back bit-exactly
        >>> plain = model.merge_and_unload()  # a plain MnistMLP again
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        existing = [layer for _, layer in lora_layers(model)]
        self.state = existing[0].state if existing else AdapterState()
        for layer in existing:
            layer.state = self.state
        for p in model.parameters():  # only LoRA weights train
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- bookkeeping
    def _layers(self) -> list[LoraLinear]:
        return [layer for _, layer in lora_layers(self.model)]

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in stack order (a copy)."""
        return list(self.state.active)

    @property
    def adapter_weights(self) -> dict[str, float]:
        """The stack weight of each active adapter (a copy)."""
        return {n: self.state.weight(n) for n in self.state.active}

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters merged into at least one layer's weight (the union over layers, in merge order)."""
        seen: list[str] = []
        for layer in self._layers():
            seen += [n for n in layer.merged_adapters if n not in seen]
        return seen

    def require_adapters(self, names: Iterable[str]) -> None:
        """Raise :class:`AdapterStateError` naming the first of ``names`` that is not loaded."""
        for n in names:
            if n not in self.peft_config:
                raise AdapterStateError(f"no adapter named {n!r}; adapters here: {sorted(self.peft_config)}")

    # -- adapters
    def add_adapter(
        self, adapter_name: str, config: LoraConfig, *, state_dict: dict[str, torch.Tensor] | None = None, source: str | None = None
    ) -> None:
        """Add a new adapter, with fresh weights or ``state_dict``'s; the first one added becomes active.

        ``source`` names where ``state_dict`` came from (a file), for error messages.

        Raises:
            AdapterStateError: the name is taken or reserved, or adapters are merged.
            AdapterConfigError, AdapterKeyError, AdapterShapeError, NonFiniteError: ``state_dict``
                does not fit (the model is left unchanged).
        """
        _check_new_name(adapter_name, self.peft_config)
        lora: list[LoraLinear] = []
        modules = target_layers(self.model, config, lora)
        if any(layer.merged_adapters for layer in lora):
            raise AdapterStateError("cannot add an adapter while adapters are merged; call unmerge() first")
        _inject(self.model, modules, config, adapter_name, state_dict=state_dict, state=self.state, source=source)
        self.peft_config[adapter_name] = config  # its weights are new Parameters, trainable
        if not self.state.active:  # what set_adapter(adapter_name) does; its checks were just made
            self.state.active, self.state.weights = [adapter_name], {adapter_name: 1.0}

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (refused while it is merged)."""
        self.require_adapters([adapter_name])
        layers = [layer for layer in self._layers() if adapter_name in layer.lora_A]
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for layer in layers:
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self.state.active:
            self.state.active = [n for n in self.state.active if n != adapter_name]
            self.state.weights.pop(adapter_name, None)

    def set_adapter(self, adapter_names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Activate one adapter, or a stack of several with optional per-adapter weights (default 1).

        Raises:
            AdapterStateError: an unknown or repeated name, a weight count that does not match,
                or merged adapters.
            AdapterConfigError: a weight that is not a finite number.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.require_adapters(names)
        values = _stack_weights(names, weights)
        if any(layer.merged_adapters for _, layer in lora_layers(self.model)):
            raise AdapterStateError("cannot change the active adapters while merged; call unmerge() first")
        self.state.active = names
        self.state.weights = dict(zip(names, values, strict=True))

    def enable_adapter_layers(self) -> None:
        self.state.disabled = False

    def disable_adapter_layers(self) -> None:
        """The seed's switch: the model computes the bare base (merged or not), nothing is lost."""
        self.state.disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the bare base model."""
        was = self.state.disabled
        self.state.disabled = True
        try:
            yield
        finally:
            self.state.disabled = was

    # -- merge
    def merge(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = True) -> None:
        """Add the (active, or named) adapters' deltas into the base weights of the layers holding them.

        Idempotent: adapters already merged are skipped. With ``safe_merge`` (the default, as the
        CLI's ``merge``), every new weight is checked for NaN/Inf first and nothing changes if one is
        found; ``safe_merge=False`` skips that check (peft's default: the caller vouches for the
        weights). Works inside ``torch.inference_mode()`` and ``torch.no_grad()``: the merged weights
        are ordinary tensors, so the model trains afterwards.

        Raises:
            MergeError: ``safe_merge`` found a non-finite merged weight (the model is untouched).
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self.require_adapters(names)
        if len(set(names)) != len(names):
            raise AdapterStateError(f"adapter names {names} repeat a name; merge each adapter once")
        _require_stack_prefix(self._layers(), self.state.active, self.merged_adapters, names)
        # Outside inference mode: a tensor made inside it and put into a Parameter would make the
        # model untrainable ("Setting requires_grad=True on inference tensor...").
        with torch.inference_mode(False), torch.no_grad():
            for layer, todo, weight in _merge_plan(self.model, names, safe_merge):
                layer.commit_merge(todo, weight)

    def unmerge(self) -> None:
        """Restore every base weight bit-exactly (keeping edits made while merged); idempotent."""
        for layer in self._layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = True) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge)
        for name, layer in list(lora_layers(self.model)):
            _replace_module(self.model, name, release_layer(layer))
        self.peft_config.clear()
        self.state.active, self.state.weights = [], {}
        return self.model

    def merge_and_unload(self, *, safe_merge: bool = True) -> nn.Module:
        """Merge the active adapters and return the plain base model (e.g. an ``MnistMLP``); ``safe_merge``
        as in :meth:`merge` (on by default: a non-finite merged weight is refused).

        Raises:
            MergeError: ``safe_merge`` found a non-finite merged weight (the model is untouched).
        """
        return self._unwrap(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Drop every adapter (unmerging first) and return the plain base model."""
        self.unmerge()
        return self._unwrap(merge=False)

    # -- state
    def lora_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` for one adapter (copies)."""
        self.require_adapters([adapter_name])
        return adapter_state_dict(self.model, adapter_name)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare base's tensors under their plain names, with unmerged weights."""
        return base_state_dict(self.model)

    def base_fingerprint(self) -> str:
        """:func:`mnist_peft.model.mlp.base_fingerprint` of the bare base, computed now (never cached:
        an in-place edit through ``.data`` leaves no trace a cache could key on)."""
        from mnist_peft.model.mlp import base_fingerprint

        return base_fingerprint(self.base_state_dict())

    def num_lora_parameters(self, adapter_name: str = DEFAULT_ADAPTER) -> int:
        return sum(t.numel() for t in self.lora_state_dict(adapter_name).values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
