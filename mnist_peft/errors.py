"""Error types of mnist_peft.

Every error the library raises on bad input derives from :class:`MnistPeftError` and also from the
built-in a caller would already catch (``ValueError``, ``KeyError``, ``FileNotFoundError``). The
offending name or path is kept as an attribute. The CLI alone turns these into one-line messages.
"""

from __future__ import annotations

import os
import re
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
    "FleetError",
    "http_status",
    "hub_error",
    "redact_secrets",
    "shown",
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


class FleetError(MnistPeftError, RuntimeError):
    """Jobs of an adapter fleet failed for good; ``failed`` maps each job's name to its error."""

    def __init__(self, message: str, *, failed: dict[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)


class HubError(MnistPeftError, OSError):
    """Talking to the Hugging Face Hub failed; ``repo_id`` names the repository."""

    def __init__(self, message: str, *, repo_id: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id

    def __str__(self) -> str:
        return self.args[0]


def shown(text: object, limit: int = 60) -> str:
    """``repr(text)`` cut to about ``limit`` characters: outside input named in a one-line message
    (a 150 MB config value must not become a 150 MB warning)."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[:limit]}...' ({len(str(text)):,} characters)"


# ----------------------------------------------------------------------------- secrets and Hub failures
_SECRET = re.compile(r"\b(?i:bearer)\s+[^\s\"',;]+|(?<![A-Za-z0-9])hf_[A-Za-z0-9]{8,}")
"""``Bearer <anything>`` and Hugging Face tokens (``hf_`` and letters; a real one has 34)."""

_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def redact_secrets(text: str) -> str:
    """``text`` with every token in it replaced by ``<redacted>``: ``Bearer ...``, ``hf_...`` and the
    configured token itself (``HF_TOKEN``, or the one ``hf auth login`` stored), whatever its form.

    The one redaction of the package: every error line and traceback the CLI prints, and every Hub
    error message, goes through it (a hostile server can echo a token into its error body).
    """
    configured = {os.environ.get(v, "") for v in _TOKEN_VARIABLES}
    try:
        from huggingface_hub import get_token

        configured.add(get_token() or "")
    except Exception:  # no huggingface_hub, or an unreadable token file: the patterns still apply
        pass
    for token in sorted((t.strip() for t in configured if len(t.strip()) >= 8), key=len, reverse=True):
        text = text.replace(token, "<redacted>")
    return _SECRET.sub(lambda m: "Bearer <redacted>" if m[0][:1] in "bB" else "<redacted>", text)


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_network_error(exc: BaseException) -> bool:
    """A connection that could not be made or was cut (no HTTP answer at all)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names
        & {
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "TransportError",
            "NetworkError",
            "ConnectionError",
            "Timeout",
            "TimeoutException",
        }
    )


def hub_error(exc: BaseException, repo_id: str, action: str) -> HubError:
    """A :class:`HubError` of the failure's kind (credentials, not found, conflict, server error,
    network), one line naming the fix. Never a server body: it may echo the token."""
    from huggingface_hub import constants

    where = f"{repo_id!r} at {constants.ENDPOINT}"
    message = _hub_message(exc, where, action)
    return HubError(redact_secrets(message), repo_id=repo_id)  # an endpoint URL may carry credentials


def _hub_message(exc: BaseException, where: str, action: str) -> str:
    """The one line of :func:`hub_error`, by the failure's kind."""
    from huggingface_hub import constants
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cause: BaseException | None = exc  # downloads wrap the HTTP failure (e.g. in LocalEntryNotFoundError)
    while cause is not None and http_status(cause) is None and not isinstance(cause, (RepositoryNotFoundError, RevisionNotFoundError)):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        exc = cause
    status = http_status(exc)
    if isinstance(exc, RevisionNotFoundError):
        return f"{action} failed: revision not found in {where}; check --revision"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{action} failed: a file listed in the repo's index is missing from {where}; the repo is incomplete, push it again"
    if isinstance(exc, RepositoryNotFoundError) and status == 401:  # the Hub's answer to an unknown repo without a token
        return (
            f"{action} failed: repository {where} is missing, or private (HTTP 401): check the repo id, or set HF_TOKEN "
            "(or run `hf auth login`) to a token with access to it"
        )
    if status in (401, 403):
        return (
            f"{action} failed: the Hub refused the credentials for {where} (HTTP {status}); set HF_TOKEN (or run `hf auth login`) "
            "to a token with access to this repo"
        )
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return f"{action} failed: repository {where} not found; check the repo id (and HF_TOKEN for a private repo)"
    if status in (409, 412):
        return f"{action} failed: {where} changed while pushing (HTTP {status}, a conflict); run the command again"
    if status is not None and status >= 500:
        return f"{action} failed: the Hub at {constants.ENDPOINT} had a server error (HTTP {status}); try again later"
    if _is_network_error(exc):
        return f"{action} failed: cannot reach the Hub at {constants.ENDPOINT}; check the network and HF_ENDPOINT"
    code = f" (HTTP {status})" if status is not None else ""  # never the exception's type: a server tells this line to its clients
    return f"{action} failed for {where}{code}; rerun with MNIST_PEFT_DEBUG=1 for details"
