"""Error types of mnist_peft.

Every error the library raises on bad input derives from :class:`MnistPeftError` and also from the
built-in a caller would already catch (``ValueError``, ``KeyError``, ``FileNotFoundError``). The
offending name or path is kept as an attribute. The CLI alone turns these into one-line messages.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MnistPeftError",
    "DataNotFoundError",
    "DataIntegrityError",
    "ModelLoadError",
    "ModelNotFoundError",
    "CorruptFileError",
    "ConfigMismatchError",
    "InvalidArgumentError",
    "AmbiguousReferenceError",
    "AdapterConfigError",
    "AdapterKeyError",
    "AdapterShapeError",
    "AdapterStateError",
    "FingerprintMismatchError",
    "MergeError",
    "NonFiniteError",
    "TrainConfigError",
    "RegistryError",
    "InvalidNameError",
    "EntryNotFoundError",
    "IntegrityError",
    "HubError",
]


class MnistPeftError(Exception):
    """Base class of every error raised by mnist_peft on bad input or state."""


class DataNotFoundError(MnistPeftError, FileNotFoundError):
    """MNIST files are neither bundled nor downloadable."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:  # FileNotFoundError would otherwise print errno-style tuples
        return self.args[0]


class DataIntegrityError(MnistPeftError, ValueError):
    """An MNIST file is corrupt or truncated (its sha256 does not match)."""

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = Path(path)


class ModelLoadError(MnistPeftError):
    """A base model or adapter cannot be loaded; the subclasses say why (missing, corrupt, mismatched)."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # FileNotFoundError would otherwise print errno-style tuples
        return self.args[0]


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The folder, file or repo is not there."""


class CorruptFileError(ModelLoadError, ValueError):
    """A file is there but unreadable: bad JSON, a broken safetensors header, a tensor missing."""


class ConfigMismatchError(ModelLoadError, ValueError):
    """A config disagrees with the weights it sits beside (e.g. sizes vs the safetensors shapes)."""


class InvalidArgumentError(MnistPeftError, ValueError):
    """An argument is out of range or names nothing known (a digit of 12, an unknown figure...)."""


class AmbiguousReferenceError(InvalidArgumentError):
    """A name matches both a folder and a registry entry; ``ref`` is the name."""

    def __init__(self, message: str, *, ref: str) -> None:
        super().__init__(message)
        self.ref = ref


class AdapterConfigError(MnistPeftError, ValueError):
    """An adapter configuration is invalid (bad rank, unknown init, missing target module...)."""


class _TensorKeyError(MnistPeftError):
    """An error about one tensor of a file: ``key`` names it, ``path`` the file (if known)."""

    def __init__(self, message: str, *, key: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


class AdapterKeyError(_TensorKeyError, KeyError):
    """A state dict misses a key or has an unexpected one; ``key`` names it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class AdapterShapeError(_TensorKeyError, ValueError):
    """A tensor in an adapter file has the wrong shape; ``key`` names it."""


class AdapterStateError(MnistPeftError, ValueError):
    """An operation does not fit the model's adapter state (unknown name, already merged...)."""


class FingerprintMismatchError(MnistPeftError, ValueError):
    """An adapter was trained on other base weights than the ones it is being loaded onto."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class MergeError(MnistPeftError, ValueError):
    """A safe merge would produce NaN or Inf weights; the model was left untouched."""


class NonFiniteError(_TensorKeyError, ValueError):
    """A tensor read from outside (an adapter or base file) holds NaN or Inf; ``key`` names it."""


class TrainConfigError(MnistPeftError, ValueError):
    """A training configuration or recipe field is invalid (non-finite lr, bad batch size...)."""


class RegistryError(MnistPeftError, ValueError):
    """The adapter registry cannot do what was asked."""


class InvalidNameError(RegistryError):
    """A registry name does not match ``[a-z0-9][a-z0-9._-]*`` or could escape the root."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class EntryNotFoundError(MnistPeftError, KeyError):
    """No registry entry has this name (or version)."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:
        return self.args[0]


class IntegrityError(MnistPeftError, ValueError):
    """A file's sha256 or size does not match what the registry recorded."""

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = Path(path)


class HubError(MnistPeftError, OSError):
    """Talking to the Hugging Face Hub failed; ``repo_id`` names the repository."""

    def __init__(self, message: str, *, repo_id: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id

    def __str__(self) -> str:
        return self.args[0]
