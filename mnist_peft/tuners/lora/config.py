"""LoRA's configuration: :class:`LoraConfig`, its scaling, and the adapter names every layer knows.

Plain Python (no torch): a config is read from ``adapter_config.json`` (outside input), so every
field is type-checked here, once, for every door that makes one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from mnist_peft.errors import AdapterConfigError

__all__ = ["BASE_ADAPTER", "DEFAULT_ADAPTER", "MAX_LORA_ALPHA", "InitKind", "LoraConfig", "compute_scaling"]

InitKind = bool | Literal["gaussian", "seed"]
DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
MAX_LORA_ALPHA = 1e6
"""The largest ``lora_alpha``. peft takes any number (its type is ``int``, unchecked); in use it is
r to 2r (8 to 512). The scaling ``lora_alpha / r`` multiplies every update and its gradient: at
1e30 one Adam step turns the adapter into NaN, so a bound far above any real value is set here."""


def _check_finite(value: object, what: str) -> float:
    """``value`` as a float; a named error if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterConfigError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise AdapterConfigError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; fields mirror ``peft.LoraConfig`` where they overlap.

    Every field is type-checked (a config file is outside input): ``use_rslora: "false"`` is an
    error, not a truthy string.
    """

    peft_type: ClassVar[str] = "LORA"
    """The ``peft_type`` of ``adapter_config.json`` (a class constant, not a field: ``to_dict`` omits it)."""
    use_dora: ClassVar[bool] = False
    """peft's ``use_dora`` (a class constant: DoRA is its own config, :class:`mnist_peft.tuners.dora.config.DoraConfig`)."""
    adapter_type: ClassVar[str] = "lora"
    """The adapter type's name, as the registry and the CLI show it ("lora", "dora")."""

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
        if not isinstance(self.target_modules, (list, tuple, set)) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterConfigError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterConfigError(f"r must be a positive integer, got {self.r!r}")
        if not 0 < _check_finite(self.lora_alpha, "lora_alpha") <= MAX_LORA_ALPHA:
            raise AdapterConfigError(f"lora_alpha must be > 0 and at most {MAX_LORA_ALPHA:g} (--lora-alpha), got {self.lora_alpha!r}")
        if not 0.0 <= _check_finite(self.lora_dropout, "lora_dropout") < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise AdapterConfigError(f"use_rslora must be true or false, got {self.use_rslora!r} ({type(self.use_rslora).__name__})")
        if not any(self.init_lora_weights is v for v in (True, False)) and self.init_lora_weights not in ("gaussian", "seed"):
            raise AdapterConfigError(f"init_lora_weights must be True, False, 'gaussian' or 'seed', got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise AdapterConfigError(f"bias={self.bias!r} is not supported; use bias='none'")
        if not self.target_modules:
            raise AdapterConfigError("target_modules is empty; name at least one linear layer, e.g. ['linear1']")

    @property
    def scaling(self) -> float:
        return compute_scaling(self.r, self.lora_alpha, self.use_rslora)

    def layer_variant(self) -> object | None:
        """What a layer runs for an adapter of this config: None is plain LoRA; an adapter type that
        shares LoRA's A and B returns its :class:`~mnist_peft.tuners.lora.layer.LoraVariant` (DoRA)."""
        return None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compute_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (the same float as peft)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
