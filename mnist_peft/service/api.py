"""The HTTP API (FastAPI) over a :class:`~mnist_peft.service.backend.ServiceBackend`: :func:`create_api`.

``POST /v1/predict`` answers images under an adapter stack; ``GET /v1/adapters`` and
``/v1/adapters/{name}`` list the registry (no server paths); ``GET /healthz``; ``GET /metrics``
(Prometheus text); the OpenAPI description at ``/docs`` and ``/openapi.json``; the Gradio app at
``/ui`` when given. Every failure is ``{"error": {"message", "field"}}`` with the status of its kind
(:mod:`~mnist_peft.service.failures`), every message through the backend's one gate. Importing this
module imports FastAPI (the ``[api]`` extra); nothing else in ``mnist_peft.service`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnist_peft import __version__
from mnist_peft.serving.batched import DEFAULT_MAX_IMAGES
from mnist_peft.serving.metrics import ServingMetrics
from mnist_peft.serving.stacks import MAX_SPEC_CHARS, MAX_STACK, MAX_WEIGHT

from .backend import ServiceBackend, entry_view
from .failures import ApiError, error_body, error_status, http_error, predict_field, validation_error
from .middleware import UI_PATH, ApiKey, BearerAuth, BodyLimit, RequestMetrics

__all__ = ["UI_MAX_BODY_BYTES", "body_limit", "create_api"]

UI_MAX_BODY_BYTES = 11 << 20  # the app's uploads: gradio refuses a file over 10 MB itself (mount_ui)
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
_log = logging.getLogger("mnist_peft.service")


def body_limit(max_images: int) -> int:
    """The default body limit for ``max_images`` images a request: 32 bytes per pixel (JSON writes a
    float in at most ~25 characters and a comma) and 64 KiB for the rest; 1.6 MB for 64 images."""
    return max_images * 784 * 32 + (64 << 10)


# ----------------------------------------------------------------------------- the schema (/docs)
class PredictRequest(BaseModel):
    """The body of ``POST /v1/predict``; the values are checked by the engine's gate, not here."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"images": [[0.0] * 784], "adapters": "digit-9@1:0.5,digit-3"}]}
    )
    images: list[Any] = Field(
        description="Images, each 784 numbers in [0, 1] (28 x 28, row by row, ink 1.0 on black 0.0 as MNIST; "
        "28 lists of 28 also do) or a base64-encoded 28 x 28 PNG (a data:image/png;base64, prefix is allowed)."
    )
    adapters: str | list[Any] | None = Field(
        default=None,
        description="The adapter stack: a spec 'name[@version][:weight],...' (registry entries or named stacks; a Hub "
        "reference hub:OWNER/REPO@vN where the server allows the Hub), a list of [name, weight] pairs, or null for the base.",
    )


class Prediction(BaseModel):
    label: int = Field(description="The predicted digit.")
    probabilities: list[float] = Field(description="The ten digits' probabilities (softmax of the logits).")


class AdapterUsed(BaseModel):
    adapter: str = Field(description="name@version of the entry that answered (hub:OWNER/REPO@<commit>/name@version from the Hub).")
    weight: float
    sha256: str = Field(description="sha256 of its adapter_model.safetensors.")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="One per image, in order.")
    adapters: list[AdapterUsed] = Field(description="The resolved stack (empty for the base).")


class ErrorDetail(BaseModel):
    message: str
    field: str | None = Field(description="The request's field the error is about (images, adapters, body, name, authorization).")


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "No API key, or a wrong one (servers started with --api-key-file)."),
        (404, "An adapter or named stack the request names is not in the registry."),
        (409, "An entry cannot serve: its files changed since it was registered, or it is for another base."),
        (413, "The body is over the server's limit."),
        (415, "The body is not sent as application/json."),
        (422, "A field is not valid: the message says which and why."),
        (502, "The Hub could not give a hub: reference (servers started with --allow-hub)."),
    )
}


# ----------------------------------------------------------------------------- the app
def create_api(
    backend: ServiceBackend,
    *,
    metrics: ServingMetrics,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    max_images: int | None = None,
    ui: Any | None = None,
) -> FastAPI:
    """The API over ``backend``.

    Args:
        backend: answers, the registry's listing, the cache's numbers, the error gate.
        metrics: where requests are counted (give the engine the same one for its batches).
        api_key: when given, every route but ``/healthz``, ``/docs`` and ``/openapi.json`` needs
            ``Authorization: Bearer <api_key>`` (``/ui`` too).
        max_body_bytes: the largest request body (default :func:`body_limit` of ``max_images``).
        max_images: the backend's image limit, for the API's description (default: the backend's own).
        ui: a Gradio Blocks app (built over the same engine) to mount at ``/ui``.
    """
    images = max_images or _backend_max_images(backend)
    limit = max_body_bytes if max_body_bytes is not None else body_limit(images)
    app = FastAPI(
        title="mnist-peft serve",
        version=__version__,
        description=_description(images, limit, ui is not None, api_key is not None),
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _add_error_handlers(app)
    guard = [Security(HTTPBearer(auto_error=False, description="The server's API key."))] if api_key else []
    _add_predict(app, backend, guard, images)
    _add_reads(app, backend, metrics, guard)
    if ui is not None:
        from .ui import mount_ui

        mount_ui(app, ui, path=UI_PATH)
    app.add_middleware(BodyLimit, max_bytes=limit, ui_max_bytes=UI_MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(BearerAuth, api_key=ApiKey(api_key))
    app.add_middleware(RequestMetrics, metrics=metrics, router=app.router)  # the last added is the outermost: every request counted
    return app


def _backend_max_images(backend: ServiceBackend) -> int:
    engine = getattr(backend, "engine", None)
    return int(getattr(backend, "max_images", None) or getattr(engine, "max_images", None) or DEFAULT_MAX_IMAGES)


def _description(max_images: int, max_body_bytes: int, ui: bool, auth: bool) -> str:
    return (
        "Predictions for MNIST digits under a weighted stack of LoRA adapters from the server's registry, concurrent "
        "requests answered together in one mixed-adapter forward.\n\n"
        f"**Limits**: at most {max_images} images per request; a body of at most {max_body_bytes:,} bytes; a stack of at "
        f"most {MAX_STACK} adapters, each weight a finite number within +-{MAX_WEIGHT:g}; a spec of at most "
        f"{MAX_SPEC_CHARS:,} characters.\n\n"
        '**Errors**: every 4xx and 5xx answer is `{"error": {"message": "...", "field": "images"}}`, naming the '
        "field at fault (or null): 401 no or wrong API key, 404 an unknown adapter, 409 an entry that cannot serve, 413 a "
        "body over the limit, 415 not JSON, 422 an invalid field, 502 the Hub failed, 500 anything else.\n\n"
        + (
            "**Auth**: this server needs `Authorization: Bearer <key>` on every route but /healthz, /docs and /openapi.json.\n\n"
            if auth
            else ""
        )
        + ("The web app is at [/ui](/ui)." if ui else "")
    )


def _failure(backend: ServiceBackend, exc: BaseException, field: Callable[[BaseException, str], str | None]) -> JSONResponse:
    """``exc`` as the API's error answer: its status by kind, its message through the backend's gate
    (an :class:`ApiError` a backend raised, the Ray ingress's, is already worded)."""
    if isinstance(exc, ApiError):
        return _error_response(exc)
    status, message = error_status(exc), backend.public_message(exc)
    if status == 500:  # the client gets the generic line; the server's log keeps the traceback
        _log.error("unexpected error answering a request", exc_info=exc)
    return JSONResponse(error_body(message, field(exc, message)), status_code=status)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.field), status_code=error.status, headers=dict(error.headers or {}))


def _add_error_handlers(app: FastAPI) -> None:
    """What the framework refuses before a route runs, in the API's one error shape and words."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc if isinstance(exc, ApiError) else http_error(500))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return _error_response(validation_error(errors))  # never FastAPI's default, which echoes the input

    async def framework(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            return _error_response(http_error(500))
        return _error_response(http_error(exc.status_code, exc.headers))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.error("unexpected error answering a request", exc_info=exc)
        return _error_response(http_error(500))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, framework)
    app.add_exception_handler(Exception, unexpected)


def require_json(request: Request) -> None:
    """A ``/v1/predict`` body must be sent as JSON (``Content-Type: application/json``).

    Raises:
        ApiError: 415 naming the header to send.
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, "send the body as JSON, with the header 'Content-Type: application/json'", "body")


def _add_predict(app: FastAPI, backend: ServiceBackend, guard: list[Any], max_images: int) -> None:
    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        dependencies=[*guard, Depends(require_json)],
        summary="Predict digits under an adapter stack",
        description=f"Up to {max_images} images per request, each answered by the same stack: a label and ten "
        "probabilities per image, and the resolved name@version and sha256 of each adapter. A request that fails "
        "gets its own error; the requests batched with it get their answers.",
        tags=["predict"],
    )
    async def predict(body: PredictRequest) -> Any:
        try:
            answer = await backend.predict(body.images, body.adapters)
        except Exception as exc:  # every failure of one request is its own answer, through the gate
            return _failure(backend, exc, predict_field)
        return JSONResponse(answer)


def _add_reads(app: FastAPI, backend: ServiceBackend, metrics: ServingMetrics, guard: list[Any]) -> None:
    def name_field(exc: BaseException, message: str) -> str | None:
        return "name" if error_status(exc) in (404, 422) else None

    @app.get("/v1/adapters", dependencies=guard, responses=_ERRORS, summary="Every registry entry", tags=["registry"])
    def adapters() -> Any:
        """Every entry of the registry, every version: what it is and the sha256 of its files (no server paths)."""
        try:
            return {"adapters": [entry_view(e) for e in backend.entries()]}
        except Exception as exc:
            return _failure(backend, exc, name_field)

    @app.get("/v1/adapters/{name}", dependencies=guard, responses=_ERRORS, summary="Every version of one entry", tags=["registry"])
    def adapter(name: str) -> Any:
        """Every version of entry ``name``: 404 if the registry has none, 422 if ``name`` is not a registry name."""
        try:
            return {"adapters": [entry_view(e) for e in backend.entries(name)]}
        except Exception as exc:
            return _failure(backend, exc, name_field)

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness", tags=["server"])
    async def healthz() -> dict[str, str]:
        """``{"status": "ok"}`` while the server answers (no API key needed)."""
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guard, response_class=PlainTextResponse, summary="Prometheus metrics", tags=["server"])
    def prometheus() -> PlainTextResponse:
        """Requests by route and status, their latency, the engine's batch sizes, and its stack cache's
        hits, misses and evictions, in Prometheus' text format (version 0.0.4)."""
        return PlainTextResponse(metrics.render(backend.cache_info()), media_type=PROMETHEUS_TEXT)
