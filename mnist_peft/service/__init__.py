"""The HTTP service (``mnist-peft serve``): a JSON API over one serving engine, for programs.

``backend`` is what the API answers from (:class:`ServiceBackend`: the in-process
:class:`LocalBackend`, or the Ray Serve deployment of ``ray_serve``); ``api`` builds the FastAPI app
(:func:`create_api`: ``POST /v1/predict``, ``GET /v1/adapters``, ``/healthz``, ``/metrics``, OpenAPI
at ``/docs``); ``failures`` words every error a client gets (one JSON shape, the status by kind);
``middleware`` holds the doors (request metrics, the optional bearer key, the body limit); ``ui``
mounts the Gradio app at ``/ui`` on the same engine; ``launch`` builds, starts and spawns a server.

Importing this package imports neither FastAPI, uvicorn nor gradio (the ``[api]`` and ``[ui]``
extras): building a service does. See docs/serving.md.
"""

from __future__ import annotations

from typing import Any

from .backend import LocalBackend, ServiceBackend, entry_view
from .launch import RunningService, Service, build_service, spawn_service, start_service

__all__ = [
    "LocalBackend",
    "RunningService",
    "Service",
    "ServiceBackend",
    "build_service",
    "create_api",
    "entry_view",
    "spawn_service",
    "start_service",
]


def __getattr__(name: str) -> Any:  # create_api imports FastAPI: only on first use (PEP 562)
    if name == "create_api":
        from .api import create_api

        return create_api
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
