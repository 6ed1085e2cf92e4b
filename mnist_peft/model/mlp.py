"""The seed's MNIST MLP as a Hub-loadable, PEFT-compatible module, and its base fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from mnist_peft.errors import ConfigMismatchError, CorruptFileError, ModelLoadError, ModelNotFoundError, NonFiniteError, hub_error
from mnist_peft.numerics import MAX_CONFIG_BYTES, parse_json_config, probe_batch, require_bounded, require_finite

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

__all__ = ["MnistMLP", "base_fingerprint", "load_base", "count_parameters"]


class MnistMLP(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mnist-peft",
    tags=["mnist", "image-classification", "mnist-peft"],
    license="mit",
):
    """784 -> hidden1 -> ReLU -> hidden2 -> ReLU -> 10, modules ``linear1``, ``linear2``, ``linear3``.

    The default sizes are the seed's (2,807,010 parameters). ``save_pretrained`` writes
    ``config.json`` + ``model.safetensors`` + ``README.md``; ``from_pretrained`` reads a local folder
    or a Hub repo id.

    Example:
        >>> model = MnistMLP()
        >>> model(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
    """

    LAYER_NAMES: ClassVar[tuple[str, ...]] = ("linear1", "linear2", "linear3")
    """The linear layers in the order ``forward`` runs them (a ReLU between each two)."""

    def __init__(self, hidden_size_1: int = 1000, hidden_size_2: int = 2000, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden_size_1)
        self.linear2 = nn.Linear(hidden_size_1, hidden_size_2)
        self.linear3 = nn.Linear(hidden_size_2, num_classes)
        self.relu = nn.ReLU()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: object, **kwargs: object) -> MnistMLP:  # type: ignore[override]
        """The mixin's loader, with a local folder's ``config.json`` bounded first (size, JSON depth):
        the mixin would parse a 150 MB or 100,000-deep file itself and fail with a raw message."""
        config = Path(pretrained_model_name_or_path) / CONFIG_NAME
        if config.is_file():
            _read_config(config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[return-value]

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: object,
    ) -> MnistMLP:
        # The mixin's own version prints to stdout, loads non-strictly (missing tensors would stay
        # random) and falls back to pickle; ours is quiet, strict and safetensors-only.
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_model

        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, WEIGHTS_NAME)
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        # config.json is outside input: check it against the weights' header before allocating.
        _check_config_against_header(model_kwargs, model_file)
        model = cls(**model_kwargs)  # type: ignore[arg-type]
        load_model(model, model_file, strict=True, device=map_location)
        # A NaN weight would not stop a forward: every answer would silently be garbage (eval: 0.098).
        require_finite(
            model.state_dict(),
            what=f"base model {model_file!r}",
            fix=_BASE_FIX,
            path=model_file,
        )
        probe_base(model, what=f"base model {model_file!r}", path=model_file)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 784); accepts (B, 1, 28, 28) too, and an empty batch
        x = self.relu(self.linear1(x))  # (B, hidden1)
        x = self.relu(self.linear2(x))  # (B, hidden2)
        return self.linear3(x)  # (B, 10) logits


_SIZE_FIELDS = ("hidden_size_1", "hidden_size_2", "in_features", "num_classes")


def expected_shapes(
    hidden_size_1: int = 1000, hidden_size_2: int = 2000, in_features: int = 784, num_classes: int = 10
) -> dict[str, tuple[int, ...]]:
    """The tensor shapes an :class:`MnistMLP` of these sizes has, by state-dict name."""
    sizes = [(1, in_features, hidden_size_1), (2, hidden_size_1, hidden_size_2), (3, hidden_size_2, num_classes)]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, n_in, n_out in sizes:
        shapes[f"linear{i}.weight"] = (n_out, n_in)
        shapes[f"linear{i}.bias"] = (n_out,)
    return shapes


_BASE_FIX = "the file is corrupt or training diverged; re-train the base (`mnist-peft train-base`) or re-download it"


def _read_config(path: Path) -> object:
    """``config.json`` parsed within the bounds of :func:`~mnist_peft.numerics.parse_json_config`
    (at most one byte past the limit is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot read {str(path)!r} ({exc.strerror or exc}); it must be a regular file you may read", path=path
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:  # name the file's real size, not the bytes read
        raise CorruptFileError(
            f"{str(path)!r} is {size:,} bytes, above the {MAX_CONFIG_BYTES:,} a config may have; re-save or re-download the base", path=path
        )
    return parse_json_config(raw, path=str(path), fix="re-save or re-download the base")


@torch.no_grad()
def probe_base(model: nn.Module, *, what: str, path: str | None = None) -> None:
    """Refuse a base whose logits on the fixed probe batch (:func:`~mnist_peft.numerics.probe_batch`,
    8 unit-RMS rows) are not finite or exceed :data:`~mnist_peft.numerics.MAX_ABS_OUTPUT`: finite
    weights of 1e30 pass the NaN check, yet every answer is NaN (eval would report 0.098)."""
    linear1 = getattr(model, "linear1", None)
    in_features = getattr(linear1, "in_features", None) or getattr(getattr(linear1, "base_layer", None), "in_features", 784)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.from_numpy(probe_batch(in_features).copy()).to(dtype)
    try:
        require_bounded({"logits": model(x)}, what=f"{what}'s outputs on the probe batch", fix=_BASE_FIX)
    except NonFiniteError as exc:
        raise NonFiniteError(str(exc), key=exc.key, path=path) from None


def _check_config_against_header(config: dict[str, object], model_file: str) -> None:
    """Refuse a config whose sizes are not positive integers or disagree with the weights file.

    Reads only the safetensors header (a few hundred bytes), so an edited ``config.json`` asking
    for a 400,000-wide layer is refused before anything is allocated.
    """
    unknown = sorted(set(config) - set(_SIZE_FIELDS))
    if unknown:
        raise ConfigMismatchError(
            f"config.json has unknown field(s) {unknown}; an MnistMLP config has {list(_SIZE_FIELDS)}", path=model_file
        )
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigMismatchError(f"config.json field {key}={value!r} must be a positive integer", path=model_file)
    header = read_safetensors_header(model_file)
    actual = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    expected = expected_shapes(**config)  # type: ignore[arg-type]
    if actual != expected:
        diff = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
        shown = ", ".join(f"{k}: file {actual.get(k)} vs config {expected.get(k)}" for k in diff[:3])
        raise ConfigMismatchError(
            f"config.json does not match {WEIGHTS_NAME} ({shown}); the folder is corrupt or mixed up: re-save or re-download it",
            path=model_file,
        )


def read_safetensors_header(path: str | os.PathLike[str], *, max_bytes: int = 1 << 24) -> dict[str, dict]:
    """The JSON header of a safetensors file, read without loading any tensor.

    Raises:
        ModelLoadError: the file is too short, or its header is not valid JSON of a sane size.
    """
    import json

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptFileError(f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)", path=path)
        n = int.from_bytes(head, "little")
        if n > max_bytes:
            raise CorruptFileError(f"{str(path)!r} declares a {n:,}-byte header; not a safetensors file we accept", path=path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{str(path)!r} has a corrupt safetensors header ({exc})", path=path) from exc
    except RecursionError:  # a header nested 100,000 deep
        raise CorruptFileError(f"{str(path)!r} has a safetensors header nested too deeply; re-save or re-download it", path=path) from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) and "shape" in v for k, v in header.items() if k != "__metadata__"):
        raise CorruptFileError(f"{str(path)!r} has a safetensors header of the wrong form", path=path)
    return header


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def base_fingerprint(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the base tensors' names, dtypes, shapes and bytes, in sorted name order.

    LoRA tensors (``lora_`` in the name) are left out and ``base_layer.`` is dropped from names,
    so a model with adapters injected has the same fingerprint as its bare base.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {}
    for name, t in state.items():
        if "lora_" in name:
            continue
        tensors[name.replace("base_layer.", "")] = t
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` reads as a folder path rather than a Hub repo id (``owner/name``): absolute,
    starting with ``.`` or ``~``, or with more than one ``/``."""
    return Path(ref).is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def load_base(path_or_repo: str | os.PathLike[str], **kwargs: object) -> MnistMLP:
    """Load a base model from a folder or Hub repo id, with a clear error when it is not one."""
    p = Path(path_or_repo)
    if p.exists() and not (p / WEIGHTS_NAME).is_file():
        raise ModelNotFoundError(
            f"{str(p)!r} is not a base model folder (no model.safetensors); create one with `mnist-peft train-base --out DIR`",
            path=p,
        )
    if not p.exists() and looks_like_path(str(path_or_repo)):
        raise ModelNotFoundError(
            f"base model folder {str(p)!r} does not exist; create one with `mnist-peft train-base --out DIR`",
            path=p,
        )
    try:
        model = MnistMLP.from_pretrained(str(path_or_repo), **kwargs)
    except (ModelLoadError, NonFiniteError):
        raise
    except Exception as exc:
        if not p.exists():  # a Hub repo id: one line of the failure's kind, never the server's body
            raise hub_error(exc, str(path_or_repo), "loading the base") from exc
        # A local folder whose files are there but unusable (e.g. a tensor missing from the file).
        raise CorruptFileError(f"cannot load base model {str(path_or_repo)!r}: {' '.join(str(exc).split())[:300]}", path=p) from exc
    model.eval()
    return model
