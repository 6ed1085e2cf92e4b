"""Native LoRA, from scratch in plain PyTorch (no ``peft`` import here).

The LoRA equation, for a linear layer with weight W (out, in) and bias b::

    y = x W^T + b + ((dropout(x) A^T) B^T) * scaling        A: (r, in), B: (out, r)
    scaling = lora_alpha / r        (or lora_alpha / sqrt(r) with rsLoRA)

Several adapters can live on one layer, held per name as in PEFT. Active adapters stack with
per-adapter weights w_i: y = x W^T + b + sum_i w_i * scaling_i * B_i A_i x.

Two forward paths compute the same equation:
- *exact*: the same float operations, in the same order, as ``peft``'s LoRA layer (bit-identical
  outputs and gradients). Used whenever autograd is recording LoRA parameters, with active
  dropout, or when asked for with :func:`set_forward_mode`.
- *fused* (inference): one GEMM against ``[W; A_1; ...; A_k]`` with the bias in the same call,
  then the rank-R update added in place into the base output. It never materialises a full-size
  temporary and is cached on the tensors' version counters, so it stays correct when weights,
  scaling, stack weights or the active set change. It reorders float sums, so it agrees with the
  exact path to float rounding (see ``peft_compat.FUSED_TOLERANCE``), not bit for bit.

Merge is out of place and the original weight tensor is kept, so ``unmerge`` restores the base
weight bit-exactly by putting that tensor back: no subtraction, no drift, any number of cycles.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterConfigError, AdapterKeyError, AdapterShapeError, AdapterStateError, MergeError

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "compute_scaling",
    "get_delta_weight",
    "lora_forward",
    "init_lora_weights_",
    "inject_adapter",
    "check_lora_state_dict",
    "find_targets",
    "lora_layers",
    "set_forward_mode",
]

InitKind = bool | Literal["gaussian", "seed"]
DEFAULT_ADAPTER = "default"


# ----------------------------------------------------------------------------- config
@dataclass
class LoraConfig:
    """LoRA hyper-parameters; fields mirror ``peft.LoraConfig`` where they overlap."""

    r: int = 8
    """Rank of the update: ``lora_A`` is (r, in), ``lora_B`` is (out, r)."""
    lora_alpha: float = 8
    """Scale numerator: scaling = lora_alpha / r (or / sqrt(r) with ``use_rslora``)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["linear1", "linear2", "linear3"])
    """Names (or name suffixes) of the ``nn.Linear`` modules to adapt."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    init_lora_weights: InitKind = True
    """True: A kaiming-uniform(a=sqrt(5)), B zeros (peft's default); "gaussian": A ~ N(0, 1/r), B zeros;
    "seed": A ~ N(0, 1), B zeros (the seed notebook); False: A and B both random (non-zero)."""
    bias: str = "none"
    """Only "none" is supported: biases are never adapted."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterConfigError(f"r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise AdapterConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian", "seed"):
            raise AdapterConfigError(
                f"init_lora_weights must be True, False, 'gaussian' or 'seed', got {self.init_lora_weights!r}"
            )
        if self.bias != "none":
            raise AdapterConfigError(f"bias={self.bias!r} is not supported; use bias='none'")
        if not self.target_modules:
            raise AdapterConfigError("target_modules is empty; name at least one linear layer, e.g. ['linear1']")

    @property
    def scaling(self) -> float:
        return compute_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ----------------------------------------------------------------------------- pure math
def compute_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (the same float as peft)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def get_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``(B @ A) * scaling``, (out, in); the same float ops as peft's."""
    return (lora_B @ lora_A) * scaling


def lora_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA branch ``((x A^T) B^T) * scaling``, (N, out); the same float ops as peft's."""
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def init_lora_weights_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: InitKind) -> None:
    """Initialise A and B in place, drawing from the global RNG in peft's order.

    peft builds ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each draws a kaiming-uniform
    weight) and then re-initialises; replaying those draws makes a seeded native adapter
    bit-identical to peft's. The seed notebook's init draws only A ~ N(0, 1).
    """
    with torch.no_grad():
        if init == "seed":
            lora_A.normal_(0.0, 1.0)
            lora_B.zero_()
            return
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # nn.Linear(in, r).reset_parameters()
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))  # nn.Linear(r, out).reset_parameters()
        if init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            lora_B.zero_()
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
            lora_B.zero_()


# ----------------------------------------------------------------------------- the layer
ForwardMode = Literal["auto", "exact"]


class LoraLinear(nn.Module):
    """An ``nn.Linear`` (kept as ``base_layer``) with named LoRA adapters."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise AdapterConfigError(f"LoRA targets nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.adapter_weights: dict[str, float] = {}  # stack weight w_i per active adapter
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.forward_mode: ForwardMode = "auto"
        self.mixed_batch: tuple[list[str], torch.Tensor] | None = None  # (adapters, (N, R) column scales)
        self._unmerged_weight: torch.Tensor | None = None  # the original base weight while merged
        self._merge_buffer: torch.Tensor | None = None  # reused output of merged_weight()
        self._delta_buffer: torch.Tensor | None = None  # reused scratch for B @ A
        self._fused_key: tuple | None = None
        self._fused: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self._fused_pins: list[torch.Tensor | None] = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- adapters
    def update_layer(
        self, adapter_name: str, config: LoraConfig, weights: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Add (or re-create) adapter ``adapter_name``: fresh weights drawn per ``config``, or
        ``weights=(A, B)`` copied in (no random draws)."""
        w = self.base_layer.weight
        if weights is None:
            A = torch.empty(config.r, self.in_features, dtype=w.dtype, device=w.device)
            B = torch.empty(self.out_features, config.r, dtype=w.dtype, device=w.device)
            init_lora_weights_(A, B, config.init_lora_weights)
        else:
            A = weights[0].to(dtype=w.dtype, device=w.device, copy=True)
            B = weights[1].to(dtype=w.dtype, device=w.device, copy=True)
        self.lora_A[adapter_name] = nn.Parameter(A)
        self.lora_B[adapter_name] = nn.Parameter(B)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.adapter_weights):
            d.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_adapter(self, adapter_names: Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Make ``adapter_names`` the active stack, with optional per-adapter weights (default 1)."""
        weights = [1.0] * len(adapter_names) if weights is None else list(weights)
        self.active_adapters = list(adapter_names)
        self.adapter_weights = {n: float(w) for n, w in zip(adapter_names, weights, strict=True)}

    def effective_scaling(self, adapter_name: str) -> float:
        """scaling * stack weight; exactly ``scaling`` when the stack weight is 1."""
        w = self.adapter_weights.get(adapter_name, 1.0)
        s = self.scaling[adapter_name]
        return s if w == 1.0 else s * w

    # -- merge / unmerge
    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The current weight plus the named adapters' deltas, as a tensor that is not the live one.

        Each delta is :func:`get_delta_weight`'s float ops, so a merged weight has the same bits
        as peft's. Scratch buffers are reused across merges (no fresh 8 MB allocations per swap);
        the live weight and the kept original are never written.
        """
        weight = self.base_layer.weight.detach()
        out = self._merge_buffer
        if out is None or out.shape != weight.shape or out.dtype != weight.dtype or out.data_ptr() == weight.data_ptr():
            out = torch.empty_like(weight)
        self._merge_buffer = out
        delta = self._delta_buffer
        if delta is None or delta.shape != weight.shape or delta.dtype != weight.dtype:
            delta = self._delta_buffer = torch.empty_like(weight)
        src = weight
        for name in adapter_names:
            A, B, s = self.lora_A[name].detach(), self.lora_B[name].detach(), self.effective_scaling(name)
            if _is_power_of_two(s):
                # Scaling by 2^k commutes with rounding, so (s B) @ A has the bits of (B @ A) * s
                # and saves a pass over the (out, in) delta. (s == 1 is the common case.)
                torch.matmul(B * s if s != 1.0 else B, A, out=delta)
            else:
                torch.matmul(B, A, out=delta)  # (out, in)
                delta.mul_(s)
            torch.add(src, delta, out=out)
            src = out
        return out

    def _commit_merge(self, adapter_names: Sequence[str], new_weight: torch.Tensor) -> None:
        if self._unmerged_weight is None:
            self._unmerged_weight = self.base_layer.weight.data
        self.base_layer.weight.data = new_weight
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the original weight tensor back: bit-exact, idempotent."""
        if self._unmerged_weight is not None:
            self.base_layer.weight.data = self._unmerged_weight
            self._unmerged_weight = None
        self.merged_adapters.clear()

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed_batch is not None:  # set for one call by serving.mixed_forward
            names, column_scale = self.mixed_batch
            return self._forward_fused(x, names, column_scale) if names else self.base_layer(x)
        if self.disable_adapters:
            if self._unmerged_weight is not None:  # merged but switched off: use the original weight
                return F.linear(x, self._unmerged_weight, self.base_layer.bias)
            return self.base_layer(x)
        active = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        if not active:
            return self.base_layer(x)
        if self.forward_mode == "exact" or self._needs_exact(active):
            return self._forward_exact(x, active)
        return self._forward_fused(x, active)

    def _needs_exact(self, active: list[str]) -> bool:
        if self.training and any(isinstance(self.lora_dropout[n], nn.Dropout) for n in active):
            return True
        if torch.is_grad_enabled() and (
            self.base_layer.weight.requires_grad or any(self.lora_A[n].requires_grad or self.lora_B[n].requires_grad for n in active)
        ):
            return True
        return _fused_unsupported(self.base_layer.weight)

    def _forward_exact(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        result = self.base_layer(x)
        for name in active:
            result = result + lora_forward(self.lora_dropout[name](x), self.lora_A[name], self.lora_B[name], self.effective_scaling(name))
        return result

    def _fused_operands(self, active: list[str], *, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(``[W; A_1; ...]^T`` (in, out + R), ``[b; 0]``, ``[s_1 B_1 | ...]^T`` (R, out)), cached on versions.

        ``scaled=False`` leaves the scalings out of B (the mixed-batch path applies them per sample).
        """
        w, b = self.base_layer.weight, self.base_layer.bias
        key = (
            scaled, w.data_ptr(), w._version,
            None if b is None else (b.data_ptr(), b._version),
            tuple((n, self.lora_A[n].data_ptr(), self.lora_A[n]._version, self.lora_B[n].data_ptr(),
                   self.lora_B[n]._version, self.effective_scaling(n) if scaled else 1.0) for n in active),
        )  # fmt: skip
        if key != self._fused_key:
            with torch.no_grad():
                A = torch.cat([self.lora_A[n] for n in active])  # (R, in)
                weight_t = torch.cat([w, A]).t()  # (in, out + R): one GEMM gives base and x A^T
                bias = None if b is None else torch.cat([b, b.new_zeros(A.shape[0])])
                # (R, out): the (scaled) B's side by side, transposed for the in-place addmm
                B_t = torch.cat([self.lora_B[n] * self.effective_scaling(n) if scaled else self.lora_B[n] for n in active], dim=1).t()
            self._fused, self._fused_key = (weight_t, bias, B_t), key
            # Hold the source storages so their addresses (part of the key) cannot be reused.
            self._fused_pins = [w.data, None if b is None else b.data] + [self.lora_A[n].data for n in active] + [self.lora_B[n].data for n in active]
        assert self._fused is not None
        return self._fused

    def _forward_fused(self, x: torch.Tensor, active: list[str], column_scale: torch.Tensor | None = None) -> torch.Tensor:
        """One GEMM for base + x A^T, then the rank-R update added in place.

        ``column_scale`` (N, R) scales each sample's low-rank activations (mixed batches: the
        scaling of the sample's own adapter on its columns, zeros elsewhere).
        """
        weight_t, bias, B_t = self._fused_operands(active, scaled=column_scale is None)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight_t if bias is None else torch.addmm(bias, x2, weight_t)  # (N, out + R)
        out = self.out_features
        result = y[:, :out]  # (N, out) view, row stride out + R
        low = y[:, out:]  # (N, R) = x A^T
        if column_scale is not None:
            low = low * column_scale
        result.addmm_(low, B_t)  # += (x A^T) (s B)^T, in place
        return result.reshape(*shape, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.lora_A)}"


def _is_power_of_two(s: float) -> bool:
    m, _ = math.frexp(s)
    return s > 0 and m == 0.5 and s >= 2.0**-100  # far from the subnormal range of the products


def _fused_unsupported(weight: torch.Tensor) -> bool:
    """The fused path is for dense fp32/fp64 weights; anything else takes the exact path."""
    return weight.dtype not in (torch.float32, torch.float64) or weight.layout != torch.strided


# ----------------------------------------------------------------------------- injection
def _match(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of the target linear layers, in module order.

    Raises:
        AdapterConfigError: a target module is missing or not an ``nn.Linear``.
    """
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer") or not _match(name, config.target_modules):
            continue
        if isinstance(module, (nn.Linear, LoraLinear)):
            found[name] = (module.out_features, module.in_features)
        else:
            raise AdapterConfigError(
                f"target module {name!r} is a {type(module).__name__}, not nn.Linear; LoRA here adapts linear layers only"
            )
    missing = [t for t in config.target_modules if not any(_match(n, [t]) for n in found)]
    if missing:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("base_layer")]
        raise AdapterConfigError(f"target module(s) {missing} not found in {type(model).__name__}; its linear layers are {linear}")
    return found


def check_lora_state_dict(
    model: nn.Module, config: LoraConfig, state_dict: dict[str, torch.Tensor], *, path: str | None = None
) -> None:
    """Check ``state_dict`` (keys ``<module>.lora_A.weight`` / ``.lora_B.weight``) against the model.

    Raises:
        AdapterKeyError: a key is missing or unexpected (named in the message and as ``.key``).
        AdapterShapeError: a tensor has the wrong shape, e.g. a rank other than ``config.r``.
    """
    where = f" in {path!r}" if path else ""
    expected: dict[str, tuple[int, int]] = {}
    for name, (out_f, in_f) in find_targets(model, config).items():
        expected[f"{name}.lora_A.weight"] = (config.r, in_f)
        expected[f"{name}.lora_B.weight"] = (out_f, config.r)
    for key in expected:
        if key not in state_dict:
            raise AdapterKeyError(f"adapter weights{where} lack key {key!r} required by target_modules {config.target_modules}", key=key, path=path)
    for key, tensor in state_dict.items():
        if key not in expected:
            raise AdapterKeyError(
                f"unexpected key {key!r}{where}: it matches no target module {config.target_modules} of the model", key=key, path=path
            )
        if tuple(tensor.shape) != expected[key]:
            hint = f" (config says r={config.r})" if config.r in expected[key] else ""
            raise AdapterShapeError(
                f"tensor {key!r}{where} has shape {tuple(tensor.shape)}, expected {expected[key]}{hint}", key=key, path=path
            )
        if not tensor.is_floating_point():
            raise AdapterShapeError(f"tensor {key!r}{where} has dtype {tensor.dtype}; LoRA weights must be floating point", key=key, path=path)


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoraLinear` and add an adapter.

    Layers already wrapped get the new adapter added. Targets are visited in ``named_modules``
    order (as peft does), so seeded inits match peft's. With ``state_dict`` the weights are
    checked first (nothing changes if they do not fit) and copied in. Returns the adapted names.

    Raises:
        AdapterConfigError, AdapterKeyError, AdapterShapeError: see :func:`check_lora_state_dict`.
    """
    targets = find_targets(model, config)
    if state_dict is not None:
        check_lora_state_dict(model, config, state_dict)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            setattr(parent, child, layer)
        weights = None if state_dict is None else (state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"])
        layer.update_layer(adapter_name, config, weights)
    return list(targets)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every :class:`LoraLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def set_forward_mode(model: nn.Module, mode: ForwardMode) -> None:
    """``"exact"``: always peft's float ops; ``"auto"``: the fused path for inference."""
    if mode not in ("auto", "exact"):
        raise ValueError(f"forward mode must be 'auto' or 'exact', got {mode!r}")
    for _, layer in lora_layers(model):
        layer.forward_mode = mode


# ----------------------------------------------------------------------------- the model
class LoraModel(nn.Module):
    """A base model with named LoRA adapters: add, activate, stack, merge, unmerge, unload.

    Example:
        >>> model = LoraModel(MnistMLP(), LoraConfig(r=4, lora_alpha=4))
        >>> model.merge(); model.unmerge()   # the base weight comes back bit-exactly
        >>> plain = model.merge_and_unload()  # a plain MnistMLP again
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        for p in model.parameters():  # only LoRA weights train
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- bookkeeping
    def _layers(self) -> list[LoraLinear]:
        return [layer for _, layer in lora_layers(self.model)]

    @property
    def active_adapters(self) -> list[str]:
        layers = self._layers()
        return list(layers[0].active_adapters) if layers else []

    @property
    def merged_adapters(self) -> list[str]:
        layers = self._layers()
        return list(layers[0].merged_adapters) if layers else []

    def _require(self, names: Iterable[str]) -> None:
        for n in names:
            if n not in self.peft_config:
                raise AdapterStateError(f"no adapter named {n!r}; adapters here: {sorted(self.peft_config)}")

    # -- adapters
    def add_adapter(self, adapter_name: str, config: LoraConfig, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Add a new adapter, with fresh weights or ``state_dict``'s; the first one added becomes active.

        Raises:
            AdapterStateError: the name is taken, or adapters are merged.
            AdapterConfigError, AdapterKeyError, AdapterShapeError: ``state_dict`` does not fit
                (the model is left unchanged).
        """
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        if self.merged_adapters:
            raise AdapterStateError("cannot add an adapter while adapters are merged; call unmerge() first")
        inject_adapter(self.model, config, adapter_name, state_dict=state_dict)
        self.peft_config[adapter_name] = config
        for layer in self._layers():
            if adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].requires_grad_(True)
                layer.lora_B[adapter_name].requires_grad_(True)
        if not self.active_adapters:
            self.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require([adapter_name])
        for layer in self._layers():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]

    def set_adapter(self, adapter_names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Activate one adapter, or a stack of several with optional per-adapter weights."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require(names)
        if weights is not None and len(weights) != len(names):
            raise AdapterStateError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
        if self.merged_adapters:
            raise AdapterStateError("cannot change the active adapters while merged; call unmerge() first")
        for layer in self._layers():
            layer.set_adapter([n for n in names if n in layer.lora_A], None if weights is None else [w for n, w in zip(names, weights) if n in layer.lora_A])

    def enable_adapter_layers(self) -> None:
        for layer in self._layers():
            layer.disable_adapters = False

    def disable_adapter_layers(self) -> None:
        """The seed's switch: the model computes the bare base (merged or not), nothing is lost."""
        for layer in self._layers():
            layer.disable_adapters = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the bare base model."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # -- merge
    def merge(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Add the (active, or named) adapters' deltas into the base weights.

        Idempotent: adapters already merged are skipped. With ``safe_merge``, every new weight is
        checked for NaN/Inf first and nothing changes if one is found.

        Raises:
            MergeError: ``safe_merge`` found a non-finite merged weight (the model is untouched).
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._require(names)
        plan = []
        for lname, layer in lora_layers(self.model):
            todo = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
            if todo:
                plan.append((lname, layer, todo, layer.merged_weight(todo)))
        if safe_merge:
            for lname, _, todo, weight in plan:
                if not torch.isfinite(weight).all():
                    raise MergeError(
                        f"merging adapter(s) {todo} into {lname!r} gives NaN/Inf weights; the model was left "
                        "unchanged. Check the adapter's weights (or lower its stack weight)"
                    )
        for _, layer, todo, weight in plan:
            layer._commit_merge(todo, weight)

    def unmerge(self) -> None:
        """Restore every base weight bit-exactly; idempotent."""
        for layer in self._layers():
            layer.unmerge()

    def _unwrap(self, merge: bool) -> nn.Module:
        if merge:
            self.merge()
        for name, layer in list(lora_layers(self.model)):
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer._unmerged_weight = None  # the merged weight stays
            layer._merge_buffer = layer._delta_buffer = None
            setattr(parent, child, layer.base_layer)
        self.peft_config.clear()
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain base model (e.g. an ``MnistMLP``)."""
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        """Drop every adapter (unmerging first) and return the plain base model."""
        self.unmerge()
        return self._unwrap(merge=False)

    # -- state
    def lora_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` for one adapter."""
        self._require([adapter_name])
        out: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(self.model):
            if adapter_name in layer.lora_A:
                out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach()
                out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach()
        return out

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare base's tensors under their plain names, with original (unmerged) weights."""
        state = {k.replace("base_layer.", ""): v for k, v in self.model.state_dict().items() if "lora_" not in k}
        for name, layer in lora_layers(self.model):
            if layer._unmerged_weight is not None:
                state[f"{name}.weight"] = layer._unmerged_weight
        return state

    def base_fingerprint(self) -> str:
        """:func:`mnist_peft.model.base_fingerprint` of the bare base, cached on tensor versions."""
        from .model import base_fingerprint

        state = self.base_state_dict()
        key = tuple((k, v.data_ptr(), v._version) for k, v in sorted(state.items()))
        if getattr(self, "_fingerprint_key", None) != key:
            self._fingerprint = base_fingerprint(state)
            self._fingerprint_key = key
            self._fingerprint_pins = list(state.values())  # keep the addresses in the key unique
        return self._fingerprint

    def num_lora_parameters(self, adapter_name: str = DEFAULT_ADAPTER) -> int:
        return sum(t.numel() for t in self.lora_state_dict(adapter_name).values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
