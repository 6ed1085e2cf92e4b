"""What a client of the HTTP API is told when a request fails: one JSON shape for every 4xx and 5xx,
``{"error": {"message": "...", "field": "images" | "adapters" | ... | null}}``.

The status comes from the error's type (:func:`error_status`); the message from the backend's one
gate (:func:`~mnist_peft.serving.requests.public_message`: the toolkit's own words without server
paths, anything else a fixed generic line) or, for what the web framework refuses before the
engine sees it, from a fixed table here (:func:`validation_error`, :func:`http_error`): never an
exception's text, its type, a server path, or the value the client sent. No web framework is
imported here; :mod:`~mnist_peft.service.api` turns these into responses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from mnist_peft.errors import (
    EntryNotFoundError,
    FingerprintMismatchError,
    HubError,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    MnistPeftError,
    ModelLoadError,
    NonFiniteError,
    RegistryError,
)

__all__ = ["BODY_EXAMPLE", "ApiError", "error_body", "error_status", "http_error", "predict_field", "validation_error"]

BODY_EXAMPLE = '{"images": [[784 numbers in [0, 1]]], "adapters": "digit-9@1:0.5,digit-3"}'

# First match wins: InvalidNameError is a RegistryError, and every class is a MnistPeftError.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidNameError, 422),
    (InvalidArgumentError, 422),
    (NonFiniteError, 422),
    (EntryNotFoundError, 404),
    (HubError, 502),
    (RegistryError, 409),
    (IntegrityError, 409),
    (FingerprintMismatchError, 409),
    (ModelLoadError, 409),
    (MnistPeftError, 409),  # the rest of the toolkit's errors are about an adapter's files (config, keys, shapes)
)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")


@dataclass(eq=False)
class ApiError(Exception):
    """A refusal the API words itself (an oversize body, a missing key): its status, its fixed
    message, the field it names, and any headers (``WWW-Authenticate``)."""

    status: int
    message: str
    field: str | None = None
    headers: Mapping[str, str] | None = None


def error_body(message: str, field: str | None) -> dict[str, Any]:
    """The one JSON shape of every error the API answers."""
    return {"error": {"message": message, "field": field}}


def error_status(exc: BaseException) -> int:
    """The HTTP status of an error the engine or the registry raised: 422 bad input, 404 no such
    entry, 409 an entry or its files cannot serve, 502 the Hub failed, 500 anything else."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def predict_field(exc: BaseException, message: str) -> str | None:
    """Which field of a ``/v1/predict`` body an error is about: the error's own ``field`` where it
    carries one, ``images`` for what the image gate says (its messages start with ``'images'`` or
    ``images[i]``), ``adapters`` for the rest of the toolkit's errors (the spec, its entries, their
    files, their answer), none for an unexpected error."""
    field = getattr(exc, "field", None)
    if field in ("images", "adapters"):
        return field
    if not isinstance(exc, MnistPeftError):
        return None
    return "images" if message.startswith(("'images'", "images[")) else "adapters"


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 422 for what the web framework's schema check refused (the body's shape, before the engine):
    the first problem, worded here from its kind and place, never quoting the value that was sent."""
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if isinstance(part, (str, int))]
    kind = str(first.get("type", ""))
    where, name = (loc[0] if loc else None), (loc[1] if len(loc) > 1 else None)
    if kind == "json_invalid":
        at = f" at character {name:,}" if isinstance(name, int) else ""
        return ApiError(422, f"the body is not valid JSON{at}: send a JSON object such as {BODY_EXAMPLE}", "body")
    if where != "body":  # a path or query parameter
        field = str(name if name is not None else where)
        return ApiError(422, f"the {where} parameter {field!r} is not valid: see the API description at /docs", field)
    if kind == "extra_forbidden":
        key = f" ({name!r})" if isinstance(name, str) and _FIELD_NAME.fullmatch(name) else ""
        return ApiError(422, f"the body has a field this endpoint does not take{key}: it takes 'images' and 'adapters'", "body")
    if name == "images":
        if kind == "missing":
            return ApiError(422, f"the body has no 'images' field: send {BODY_EXAMPLE}", "images")
        return ApiError(422, "'images' must be a list of images, each 784 numbers in [0, 1] or a base64 PNG string", "images")
    if name == "adapters":
        return ApiError(
            422,
            "'adapters' must be an adapter spec such as 'digit-9@1:0.5,digit-3', a list of [name, weight] pairs, or null (the base alone)",
            "adapters",
        )
    if kind == "missing":
        return ApiError(422, f"the request has no body: send a JSON object such as {BODY_EXAMPLE}", "body")
    return ApiError(422, f"the body must be a JSON object such as {BODY_EXAMPLE}", "body")


_HTTP_MESSAGES = {
    400: ("the body could not be parsed (nested too deep, or not text): send a JSON object such as " + BODY_EXAMPLE, "body"),
    404: ("no such endpoint: the API is described at /docs", None),
    405: ("this endpoint does not take that method: the API is described at /docs", None),
}


def http_error(status: int, headers: Mapping[str, str] | None = None) -> ApiError:
    """What the web framework's own refusals (no such route, wrong method, an unreadable body) are
    told as: a fixed line per status, never the framework's ``detail``."""
    message, field = _HTTP_MESSAGES.get(status, (None, None))
    if message is None:
        try:
            message = HTTPStatus(status).phrase.lower()
        except ValueError:
            message = "the request could not be answered"
    return ApiError(status, message, field, headers)
