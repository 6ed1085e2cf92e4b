"""An adapter on disk, in PEFT layout, so stock ``peft`` reads what we write and we read what it writes.

A folder holds::

    adapter_config.json          a valid peft.LoraConfig (target_modules sorted)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
                                 (DoRA, ``use_dora: true``: also .lora_magnitude_vector (out,))
    README.md                    model card with YAML front matter (library_name: peft, base_model, tags)

Extra metadata (digit, recipe, base fingerprint, ...) lives in the safetensors header as str -> str,
kept short so the file stays close to the raw tensor bytes.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mnist_peft.errors import AdapterConfigError, AdapterKeyError, CorruptFileError, FingerprintMismatchError, shown
from mnist_peft.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_regular_file
from mnist_peft.model.mlp import base_fingerprint
from mnist_peft.numerics import parse_json_config, require_bounded_updates, require_finite
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.dora.magnitude import MAGNITUDE_KEY, check_magnitudes, require_no_magnitudes
from mnist_peft.tuners.lora.config import DEFAULT_ADAPTER, LoraConfig
from mnist_peft.tuners.lora.layer import valid_adapter_name
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.state_dict import check_lora_state_dict

from .cards import digit_model_card, render_model_card
from .probe import probe_layers

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MODEL_CARD_NAME",
    "KEY_PREFIX",
    "clear_parsed_configs",
    "AdapterFiles",
    "save_adapter",
    "write_adapter",
    "read_adapter",
    "adapter_from_bytes",
    "load_adapter",
    "to_peft_config_dict",
    "from_peft_config_dict",
    "render_model_card",
    "digit_model_card",
    "load_stack",
    "check_fingerprint",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
KEY_PREFIX = "base_model.model."

# peft.LoraConfig keys we do not model. Their neutral values are accepted silently; any other
# value asks for a feature we do not implement, which is refused rather than silently ignored.
_NEUTRAL_PEFT_KEYS: dict[str, tuple[object, ...]] = {
    "peft_type": (),  # chose the reader (ADAPTER_TYPES)
    "task_type": (None,),
    "inference_mode": (True, False),
    "base_model_name_or_path": (),  # any value
    "revision": (),
    "auto_mapping": (),
    "peft_version": (),
    "fan_in_fan_out": (False,),
    "modules_to_save": (None, []),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "lora_bias": (False,),
    "megatron_config": (None,),
    "megatron_core": (),
    "loftq_config": ({}, None),
    "exclude_modules": (None,),
    "layer_replication": (None,),
    "runtime_config": (),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "use_qalora": (False,),
    "qalora_group_size": (),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "arrow_config": (None,),
    "ensure_weight_tying": (False,),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (False, None),
    "bdlora_config": (None,),
}


@dataclass
class AdapterFiles:
    """What one adapter folder holds, read into memory (nothing applied to a model yet)."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    """Keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (prefix stripped)."""
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint")


# ----------------------------------------------------------------------------- config mapping
def to_peft_config_dict(config: LoraConfig, *, base_model_name_or_path: str | None = None) -> dict[str, object]:
    """The ``adapter_config.json`` content: what ``peft.LoraConfig.from_pretrained`` expects."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
        "use_rslora": config.use_rslora,
        # "seed" is our own init; to peft the weights are what matter, so call it the default.
        "init_lora_weights": config.init_lora_weights if config.init_lora_weights != "seed" else True,
        "bias": config.bias,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": config.use_dora,
        "lora_bias": False,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def from_peft_config_dict(data: dict[str, object], *, path: str | os.PathLike[str] | None = None) -> LoraConfig:
    """The adapter config from ``adapter_config.json`` content (ours or peft's), read by the
    reader registered for its ``peft_type`` in :data:`ADAPTER_TYPES` (a config without one is LoRA).

    Raises:
        AdapterConfigError: not a JSON object, an adapter type we do not implement, a field that
            asks for a feature we do not implement, or an invalid value.
    """
    where = f" in {str(path)!r}" if path else ""
    if not isinstance(data, dict):
        raise AdapterConfigError(f"adapter config{where} must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type", "LORA")
    reader = ADAPTER_TYPES.get(peft_type) if isinstance(peft_type, str) else None
    if reader is None:
        raise AdapterConfigError(
            f"peft_type={shown(peft_type)}{where} is not supported: mnist_peft implements {sorted(ADAPTER_TYPES)}; "
            "load this adapter with peft itself"
        )
    return reader(data, where)


_LORA_KEYS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights", "bias", "use_dora"})
"""The ``adapter_config.json`` keys our LoRA reads (the fields of :class:`LoraConfig`, and ``use_dora``)."""

_LORA_VARIANTS: dict[object, type[LoraConfig]] = {False: LoraConfig, None: LoraConfig, True: DoraConfig}
"""``use_dora`` -> the config class: peft writes DoRA as ``peft_type: LORA`` with ``use_dora: true``."""


def _lora_config_from_dict(data: dict[str, object], where: str) -> LoraConfig:
    """``peft_type: LORA``: every key checked against what our LoRA models (see ``_NEUTRAL_PEFT_KEYS``)."""
    kwargs = {k: v for k, v in data.items() if k in _LORA_KEYS and k != "use_dora"}
    use_dora = data.get("use_dora", False)
    config_class = _LORA_VARIANTS.get(use_dora) if isinstance(use_dora, (bool, type(None))) else None
    if config_class is None:
        raise AdapterConfigError(f"use_dora{where} must be true or false, got {shown(use_dora)}")
    for key, value in data.items():
        if key in _LORA_KEYS:
            continue
        if key in _NEUTRAL_PEFT_KEYS:
            allowed = _NEUTRAL_PEFT_KEYS[key]
            if allowed and value not in allowed:
                raise AdapterConfigError(f"{shown(key)}={shown(value)}{where} is not supported by mnist_peft's LoRA; only {allowed} is")
        elif value not in (None, False, {}, []):  # an unset feature of a newer peft is harmless
            warnings.warn(f"ignoring unknown adapter config key {shown(key)}={shown(value)}{where} (from a newer peft?)", stacklevel=2)
    if isinstance(kwargs.get("target_modules"), str):
        raise AdapterConfigError(f"target_modules{where} is a regex string; list the module names instead")
    if "r" not in kwargs or "target_modules" not in kwargs:
        raise AdapterConfigError(f"adapter config{where} lacks 'r' or 'target_modules'; is this a LoRA adapter_config.json?")
    return config_class(**kwargs)  # type: ignore[arg-type]


# Adapter types by ``peft_type``: the reader of each one's config. A second type (IA3, DoRA) is a
# config class and layer beside ``lora`` plus its reader here; any other type is refused by name.
ADAPTER_TYPES: dict[str, Callable[[dict[str, object], str], LoraConfig]] = {"LORA": _lora_config_from_dict}


# ----------------------------------------------------------------------------- save / read / load
def save_adapter(
    model: LoraModel,
    folder: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    metadata: dict[str, str] | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    model_card: str | None = None,
) -> Path:
    """Write one adapter as a PEFT folder; every file is written atomically.

    Args:
        metadata: extra str -> str entries for the safetensors header (keep them short).
        dtype: store the tensors as e.g. ``torch.float16``/``torch.bfloat16`` (default: as trained).
        model_card: README.md text (default: a minimal card with the YAML front matter).

    Example:
        >>> save_adapter(model, "out/digit-9", metadata={"digit": "9"})
    """
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise AdapterConfigError(f"no adapter named {adapter_name!r}; adapters here: {sorted(model.peft_config)}")
    files = AdapterFiles(config, model.lora_state_dict(adapter_name), {"base_fingerprint": model.base_fingerprint(), **(metadata or {})})
    return write_adapter(files, folder, base_model_name_or_path=base_model_name_or_path, dtype=dtype, model_card=model_card)


def write_adapter(
    files: AdapterFiles,
    folder: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    model_card: str | None = None,
) -> Path:
    """Write an in-memory adapter (config, tensors, header metadata) as a PEFT folder, atomically per file."""
    folder = Path(folder)
    state = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in files.state_dict.items()}
    _require_usable(files.config, state, folder)
    tensors = {KEY_PREFIX + k: v for k, v in state.items()}
    header = {"format": "pt", **files.metadata}
    for k, v in header.items():
        if not isinstance(v, str):
            raise AdapterConfigError(f"safetensors metadata must be str -> str; {k!r} is {type(v).__name__}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / ADAPTER_WEIGHTS_NAME, st_save(tensors, metadata=header))
    atomic_write_json(folder / ADAPTER_CONFIG_NAME, to_peft_config_dict(files.config, base_model_name_or_path=base_model_name_or_path))
    if model_card is None:
        kind = files.config.adapter_type
        model_card = render_model_card(
            base_model=base_model_name_or_path,
            tags=[kind, "mnist", "mnist-peft"],
            title=f"{kind.upper() if kind != 'lora' else 'LoRA'} adapter {folder.name}",
        )
    atomic_write_text(folder / MODEL_CARD_NAME, model_card)
    return folder


_WRITE_FIX = "training diverged (lower --lr or lora_alpha) or the inputs are too large; nothing was written"


def _require_usable(config: LoraConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """The gate of every adapter written (``train-adapter``, ``combine --out``, the fleet): tensors
    finite (after any ``dtype`` narrowing) and each layer's update bounded on the probe batch, the
    checks every reader makes, so no file is written that ``load``/``registry add`` would refuse."""
    what = f"the adapter to write to {str(folder)!r}"
    require_finite(state, what=what, fix=_WRITE_FIX, path=str(folder))
    require_bounded_updates(probe_layers(state, config.scaling), what=what, fix=_WRITE_FIX, path=str(folder))
    check_magnitudes(state.items(), what=what, fix=_WRITE_FIX, path=str(folder))


def read_adapter(folder: str | os.PathLike[str]) -> AdapterFiles:
    """Read an adapter folder (ours or written by peft) into memory, checking its structure.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        AdapterConfigError: the config or the safetensors file cannot be parsed.
    """
    folder = folder if isinstance(folder, Path) else Path(folder)
    root = str(folder)
    cfg_path, w_path = f"{root}/{ADAPTER_CONFIG_NAME}", f"{root}/{ADAPTER_WEIGHTS_NAME}"
    try:  # read straight away (no stat first: loading is on a server's hot path)
        cfg_raw, raw = read_regular_file(cfg_path), read_regular_file(w_path)
    except OSError as exc:
        raise _unreadable(Path(exc.filename or w_path), folder, exc) from exc
    return adapter_from_bytes(cfg_raw, raw, folder=folder)


def adapter_from_bytes(config: bytes, weights: bytes, *, folder: str | os.PathLike[str] | None = None) -> AdapterFiles:
    """An adapter from the bytes of its two files (``adapter_config.json``, ``adapter_model.safetensors``),
    checked as :func:`read_adapter` checks a folder. For a reader that has the bytes already, e.g.
    checked against a recorded sha256 (:meth:`mnist_peft.registry.adapter_registry.AdapterRegistry.read_file`): the
    bytes parsed are then exactly the bytes checked. ``folder`` only names the files in messages.

    Raises:
        AdapterConfigError: the config or the safetensors file cannot be parsed.
    """
    folder = None if folder is None else Path(folder)
    cfg_path = ADAPTER_CONFIG_NAME if folder is None else f"{folder}/{ADAPTER_CONFIG_NAME}"
    w_path = ADAPTER_WEIGHTS_NAME if folder is None else f"{folder}/{ADAPTER_WEIGHTS_NAME}"
    cfg_raw, raw = config, weights
    config = _config_from_bytes(cfg_raw, cfg_path)
    try:
        tensors = st_load(raw)
        metadata = _read_metadata(raw)
    except (SafetensorError, ValueError) as exc:
        raise CorruptFileError(f"{w_path!r} is not a readable safetensors file ({exc}); re-save or re-download it", path=w_path) from exc
    require_no_magnitudes(tensors, use_dora=config.use_dora, where=repr(str(w_path)), error=AdapterConfigError)
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key.removeprefix(KEY_PREFIX)
        # peft drops the adapter name on save; tolerate files that kept it ("...lora_A.default.weight").
        for part in ("lora_A", "lora_B"):
            head, sep, tail = k.partition(f".{part}.")
            if sep and tail != "weight" and tail.endswith(".weight"):
                k = f"{head}.{part}.weight"
        head, sep, tail = k.partition(f".{MAGNITUDE_KEY}.")  # "...lora_magnitude_vector[.default].weight" (peft's live keys)
        if sep and tail.endswith("weight"):
            k = f"{head}.{MAGNITUDE_KEY}"
        if k in state:
            raise AdapterKeyError(
                f"{str(w_path)!r} holds two tensors for {k!r} (e.g. with and without an adapter name); keep one and re-save the file",
                key=k,
                path=w_path,
            )
        # Narrow floats (fp16, bf16, float8) are widened: the checks and the copy into the model work in float32.
        state[k] = t.to(torch.float32) if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64) else t
    return AdapterFiles(config=config, state_dict=state, metadata=metadata, path=folder)


_PARSED_CONFIGS: dict[bytes, LoraConfig] = {}
"""Configs parsed cleanly (no error, nothing warned about), by the exact bytes of their file: the
adapters of one recipe share those bytes, and a server loading many of them parses each kind once."""
_PARSED_CONFIGS_MAX = 256
_PARSED_CONFIGS_LOCK = threading.Lock()  # lookups are plain dict reads; adding and evicting take it


def clear_parsed_configs() -> None:
    """Forget every remembered config: the next load of each file parses it again (the bench's cold load)."""
    with _PARSED_CONFIGS_LOCK:
        _PARSED_CONFIGS.clear()


def _config_from_bytes(raw: bytes, path: str) -> LoraConfig:
    """The config in ``adapter_config.json``'s bytes (see :func:`from_peft_config_dict`), a fresh
    object on every call."""
    known = _PARSED_CONFIGS.get(raw) if isinstance(raw, bytes) else None  # (a bytearray is not hashable)
    if known is None:
        # Size and depth bounded before and while parsing (a 150 MB or 100,000-deep file is refused in one line).
        data = parse_json_config(raw, path=path, fix="re-save or re-download the adapter")
        config = from_peft_config_dict(data, path=path)
        # Only a LoRA config every key of which is read or known to be neutral is remembered: any
        # other is parsed again each time, so its warnings are given each time.
        if (
            isinstance(raw, bytes)
            and len(raw) <= 1 << 16
            and type(config) in (LoraConfig, DoraConfig)
            and isinstance(data, dict)
            and data.get("peft_type", "LORA") == "LORA"
            and all(k in _LORA_KEYS or k in _NEUTRAL_PEFT_KEYS for k in data)
        ):
            with _PARSED_CONFIGS_LOCK:
                while len(_PARSED_CONFIGS) >= _PARSED_CONFIGS_MAX:
                    _PARSED_CONFIGS.pop(next(iter(_PARSED_CONFIGS)))
                _PARSED_CONFIGS[raw] = config
            return _fresh_config(config)
        return config
    return _fresh_config(known)


def _fresh_config(config: LoraConfig) -> LoraConfig:
    """A copy the caller may change (its lists too), without re-running the checks it passed."""
    out = object.__new__(type(config))
    out.__dict__.update({k: copy.copy(v) if isinstance(v, (list, dict, set)) else v for k, v in config.__dict__.items()})
    return out


def _unreadable(p: Path, folder: Path, exc: OSError) -> FileNotFoundError:
    from mnist_peft.errors import ModelNotFoundError

    if not folder.exists():
        return ModelNotFoundError(f"adapter folder {str(folder)!r} does not exist; check the path or the registry name", path=folder)
    if isinstance(exc, FileNotFoundError):
        return ModelNotFoundError(f"{str(folder)!r} is not an adapter folder: {p.name} is missing", path=p)
    return ModelNotFoundError(
        f"{str(folder)!r} is not a readable adapter folder: {p.name} cannot be read ({exc.strerror or exc}); "
        "it must be a regular file you may read",
        path=p,
    )


def _read_metadata(raw: bytes) -> dict[str, str]:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__") or {}  # safetensors allows null
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("its header metadata is not a map of strings to strings")
    return dict(meta)


def check_fingerprint(files: AdapterFiles, model: LoraModel | str) -> None:
    """Refuse an adapter trained on other base weights than ``model``'s (or than the fingerprint given).

    Raises:
        FingerprintMismatchError: the fingerprints differ (an adapter without one is accepted).
    """
    expected = files.base_fingerprint
    if not expected:
        return
    actual = model if isinstance(model, str) else model.base_fingerprint()
    if actual != expected:
        raise FingerprintMismatchError(
            f"adapter {str(files.path)!r} was trained on base {expected[:12]}..., but this base is {actual[:12]}...; "
            "load it onto its own base, or force it (--force / force=True) if you know they match",
            expected=expected,
            actual=actual,
        )


def load_adapter(
    model: LoraModel,
    folder: str | os.PathLike[str] | AdapterFiles,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    force: bool = False,
    activate: bool = False,
    base_fingerprint: str | None = None,
) -> AdapterFiles:
    """Load an adapter folder into ``model`` under ``adapter_name``.

    Everything is checked before the model changes: keys, shapes, rank, finite values, and the base
    fingerprint the adapter was trained on (refused on mismatch unless ``force``). The model's
    fingerprint is a sha256 over its base tensors, computed on every call; a server that loads many
    adapters onto a base it never edits may pass ``base_fingerprint`` (computed once with
    ``model.base_fingerprint()``) and answers for it staying true.

    Raises:
        AdapterKeyError, AdapterShapeError, AdapterConfigError: the files do not fit the model.
        FingerprintMismatchError: the adapter was trained on different base weights.
    """
    files = folder if isinstance(folder, AdapterFiles) else read_adapter(folder)
    if not force:
        check_fingerprint(files, model if base_fingerprint is None else base_fingerprint)
    model.add_adapter(adapter_name, files.config, state_dict=files.state_dict, source=str(files.path) if files.path else None)
    if activate:
        model.set_adapter(adapter_name)
    return files


def _adapter_name(folder: Path) -> str:
    """``digit-9`` for ``.../digit-9`` and for a registry version folder ``.../digit-9/v2``."""
    import re

    name = folder.name
    if re.fullmatch(r"v\d+", name) and folder.parent.name:
        name = folder.parent.name
    name = name.replace(".", "_").lstrip("_") or "adapter"  # '.' and a leading '_' are not allowed in adapter names
    return name if valid_adapter_name(name) else f"{name}-adapter"  # e.g. a folder named 'keys


def load_stack(
    base: torch.nn.Module,
    folders: list[str | os.PathLike[str]],
    weights: list[float] | None = None,
    *,
    force: bool = False,
) -> LoraModel:
    """Wrap ``base`` and load several adapter folders as one active, weighted stack.

    Adapters are named after their folders (``digit-9``, also for a registry's ``digit-9/v2``;
    made unique). Everything is read
    and checked before anything is applied, so a bad folder leaves ``base`` untouched.

    Example:
        >>> model = load_stack(load_base("adapters/base"), ["adapters/digit-3", "adapters/digit-9"], [1.0, 0.5])
    """
    if weights is not None and len(weights) != len(folders):
        raise AdapterConfigError(f"got {len(weights)} weights for {len(folders)} adapters; give one --weight per --adapter")
    files = [read_adapter(f) for f in folders]
    fingerprint = None if force else base_fingerprint(base)
    for f in files:  # every check before the base is wrapped (and frozen)
        if fingerprint is not None:
            check_fingerprint(f, fingerprint)
        check_lora_state_dict(base, f.config, f.state_dict, path=str(f.path))
    model = LoraModel(base)
    names: list[str] = []
    for f in files:
        name = _adapter_name(Path(f.path or "adapter"))
        while name in names:
            name += "_"
        names.append(name)
        model.add_adapter(name, f.config, state_dict=f.state_dict)
        for p in model.parameters():
            p.requires_grad_(False)
    model.set_adapter(names, weights)
    return model.eval()
