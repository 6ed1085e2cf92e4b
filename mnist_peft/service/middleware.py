"""The API's doors, as ASGI middleware around the app, outermost first: :class:`RequestMetrics`
(every request counted under its route's template), :class:`BearerAuth` (the optional API key,
compared in constant time before anything of the request is read) and :class:`BodyLimit` (a body
over the limit is refused from its ``Content-Length``, or as it arrives when chunked, before a byte
of it is parsed). Each answers a refusal with the API's one error shape
(:func:`~mnist_peft.service.failures.error_body`).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mnist_peft.serving.metrics import ServingMetrics

from .failures import ApiError, error_body

__all__ = ["OPEN_PATHS", "UI_PATH", "ApiKey", "BearerAuth", "BodyLimit", "RequestMetrics", "route_template", "send_error"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
"""What a client reaches without the API key when the server has one: the health check and the API's description."""
UI_PATH = "/ui"


async def send_error(send: Send, error: ApiError) -> None:
    """Answer with ``error`` in the API's one shape (a whole response, from outside the app)."""
    body = json.dumps(error_body(error.message, error.field)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_template(router: Any, scope: Scope) -> str:
    """The template of the route ``scope`` goes to (``/v1/adapters/{name}``, the mount ``/ui``), never
    the raw path a client sent (a label per raw path would let clients grow the metrics without bound);
    ``unmatched`` for a path no route takes."""
    from starlette.routing import Match

    partial = None
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:  # the path, another method
            partial = route.path
    return partial or "unmatched"


class RequestMetrics:
    """Counts every HTTP request in ``metrics`` under its route's template, with its status and the
    time to the end of its answer."""

    def __init__(self, app: App, *, metrics: ServingMetrics, router: Any) -> None:
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        template, status, start = route_template(self.router, scope), 500, time.perf_counter()

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(template, status, time.perf_counter() - start)


class ApiKey:
    """A bearer key held so that no repr, log line or traceback shows it; :meth:`matches` compares
    in constant time (:func:`hmac.compare_digest`)."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(presented, self._key)

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer <token>`` header, else ``None``."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class BearerAuth:
    """Every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer <key>`` (the app at ``/ui``
    included: it predicts too); a missing or wrong key is a 401 with ``WWW-Authenticate: Bearer``,
    before the request's body is read. The key is never logged or echoed."""

    def __init__(self, app: App, *, api_key: ApiKey, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app, self._key, self.open_paths = app, api_key, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        presented = _bearer(scope.get("headers", []))
        if presented is not None and self._key.matches(presented):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await receive()  # the connect message; closing before accepting refuses it
            return await send({"type": "websocket.close", "code": 1008})
        if presented is None:
            error = ApiError(
                401,
                "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                "authorization",
                {"WWW-Authenticate": "Bearer"},
            )
        else:
            error = ApiError(
                401,
                "the API key sent is not this server's: send 'Authorization: Bearer <key>' with the key it was started with",
                "authorization",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        await send_error(send, error)


class BodyLimit:
    """A request body over ``max_bytes`` (``ui_max_bytes`` under ``/ui``, whose uploads gradio limits
    itself) is a 413: from its ``Content-Length`` before reading any of it, or, sent chunked, as soon as
    the bytes received pass the limit. A body within the limit is read whole and handed on."""

    def __init__(self, app: App, *, max_bytes: int, ui_max_bytes: int) -> None:
        self.app, self.max_bytes, self.ui_max_bytes = app, max_bytes, ui_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.ui_max_bytes if path == UI_PATH or path.startswith(UI_PATH + "/") else self.max_bytes
        declared = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        if declared and (not declared[0].strip().isdigit() or len(declared[0]) > 20):
            return await send_error(send, ApiError(400, "the Content-Length header is not a number", "body"))
        if declared and int(declared[0]) > limit:
            return await send_error(send, _too_large(limit))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await send_error(send, _too_large(limit))
        await self.app(scope, _replay(bytes(body), receive), send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit:,} bytes: send fewer images per request", "body")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
