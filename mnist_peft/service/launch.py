"""Starting the service: :func:`build_service` opens a registry (read-only), loads its base into one
serving engine and builds the API over it (and the Gradio app at ``/ui``, on the same engine);
:func:`start_service` serves it with uvicorn on 127.0.0.1 in a background thread (tests, ``mnist-peft
bench``); :func:`serve_forever` is ``mnist-peft serve`` in the foreground; :func:`spawn_service` runs
the real command in a subprocess. FastAPI, uvicorn and gradio are imported only when a service is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_peft.errors import MnistPeftError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.batched import DEFAULT_MAX_IMAGES, BatchedEngine
from mnist_peft.serving.cache import DEFAULT_CACHE_BYTES
from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.metrics import ServingMetrics
from mnist_peft.serving.resolvers import HubResolver, RegistryResolver, Resolver

from .backend import LocalBackend

__all__ = [
    "DEFAULT_PORT",
    "MAX_CONNECTIONS",
    "RunningService",
    "Service",
    "build_service",
    "default_hub_cache",
    "listen",
    "require_api",
    "serve_forever",
    "spawn_service",
    "start_service",
]

DEFAULT_PORT = 8000
MAX_CONNECTIONS = 1024  # connections and requests in flight; beyond, uvicorn answers 503 instead of holding them in memory


def require_api() -> None:
    """Refuse to start without the ``[api]`` extra (FastAPI and uvicorn), saying how to install it.

    Raises:
        MnistPeftError: naming what is missing and ``pip install -e '.[api]'``.
    """
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MnistPeftError(f"mnist-peft serve needs {' and '.join(missing)}, which are not installed: pip install -e '.[api]'")


def default_hub_cache() -> Path:
    """Where ``--allow-hub`` keeps the adapters it pulls: ``$XDG_CACHE_HOME/mnist_peft/hub-adapters``
    (``~/.cache/mnist_peft/hub-adapters``), beside the MNIST data root's default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist_peft" / "hub-adapters"


@dataclass
class Service:
    """A built service, not yet serving: the FastAPI ``app``, its ``backend`` (engine), the ``metrics``
    both count in, and whether the Gradio app is mounted at ``/ui``."""

    app: Any
    backend: LocalBackend
    metrics: ServingMetrics
    ui: bool

    @property
    def registry(self) -> AdapterRegistry:
        return self.backend.registry


def build_service(
    root: str | os.PathLike[str] | None = None,
    *,
    base: str = "base",
    api_key: str | None = None,
    ui: bool = True,
    allow_hub: bool = False,
    hub_cache: str | os.PathLike[str] | None = None,
    hub_owners: Sequence[str] | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 2.0,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_body_bytes: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    data_dir: str | None = None,
) -> Service:
    """Open the registry at ``root`` (read-only), load ``base`` into one :class:`Predictor` behind a
    :class:`BatchedEngine`, and build the API over it (:func:`~mnist_peft.service.api.create_api`),
    with the Gradio app at ``/ui`` on the same engine when ``ui`` and gradio is installed.

    With ``allow_hub``, a ``hub:OWNER/REPO@vN`` reference is pulled once into ``hub_cache`` (default
    :func:`default_hub_cache`), without a token (public repos only: a server's token would let every
    client read what it can), from ``hub_owners`` only when given.

    Raises:
        MnistPeftError: the ``[api]`` extra is missing; the registry or its base is missing or bad.
        InvalidArgumentError: a batch size, wait or cache budget out of range.
    """
    require_api()
    from .api import create_api
    from .ui import build_ui, gradio_available

    registry = AdapterRegistry(root)
    registry.list()  # a missing or invalid registry is an error now, not on the first request
    resolvers: list[Resolver] = [RegistryResolver(registry)]
    if allow_hub:
        resolvers.append(HubResolver(hub_cache if hub_cache is not None else default_hub_cache(), owners=hub_owners))
    predictor = Predictor(registry, base, cache_bytes=cache_bytes, data_dir=data_dir, resolvers=resolvers)
    metrics = ServingMetrics()
    engine = BatchedEngine(predictor, max_batch=max_batch_size, max_wait_s=max_wait_ms / 1000, max_images=max_images, metrics=metrics)
    backend = LocalBackend(engine)
    try:
        blocks = build_ui(predictor, max_batch_size=max_batch_size) if ui and gradio_available() else None
        app = create_api(backend, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes, max_images=max_images, ui=blocks)
    except BaseException:
        backend.close()
        raise
    return Service(app, backend, metrics, blocks is not None)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: a free one), for uvicorn to serve on.

    Raises:
        MnistPeftError: the address cannot be bound (taken, or not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from now on a client waits in the backlog until the server accepts it
    except OSError as exc:
        sock.close()
        raise MnistPeftError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port or --host") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # /metrics counts requests; no line per request (and never a header)
        proxy_headers=False,  # X-Forwarded-* are trusted for nothing
        server_header=False,
        lifespan="on",  # the Gradio app starts its queue in the lifespan
        limit_concurrency=MAX_CONNECTIONS,
        timeout_graceful_shutdown=3,  # the app's event streams do not hold a stop
    )
    return uvicorn.Server(config)


@dataclass
class RunningService:
    """A service serving in a background thread: its URL, and :meth:`close` to stop it."""

    url: str
    service: Service
    server: Any
    thread: threading.Thread

    @property
    def app(self) -> Any:
        return self.service.app

    @property
    def backend(self) -> LocalBackend:
        return self.service.backend

    def close(self) -> None:
        """Stop serving, then stop the engine's batcher (answering what it holds)."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.backend.close()


def start_service(root: str | os.PathLike[str] | None = None, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> RunningService:
    """:func:`build_service` (``options`` are its keywords), served on ``host:port`` (default: a free
    port of 127.0.0.1) in a background thread; returns once it accepts requests.

    Example:
        >>> running = start_service("adapters", ui=False)
        >>> requests.get(running.url + "healthz").json()
        {'status': 'ok'}
        >>> running.close()
    """
    service = build_service(root, **options)
    try:
        sock = listen(host, port)
    except BaseException:
        service.backend.close()
        raise
    server = _uvicorn_server(service.app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mnist-peft-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            service.backend.close()
            raise MnistPeftError("the service did not start within 60 s; see the log above")
        time.sleep(0.01)
    return RunningService(url_of(sock), service, server, thread)


def serve_forever(service: Service, sock: socket.socket) -> None:
    """Serve ``service`` on ``sock`` in this (the main) thread until Ctrl-C or SIGTERM, then stop
    cleanly: requests in flight are answered, the engine's batcher is stopped."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # uvicorn raises the signal again after its graceful stop: end here, not killed

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _uvicorn_server(service.app).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.backend.close()
        sock.close()


@contextlib.contextmanager
def spawn_service(
    root: str | os.PathLike[str],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """``mnist-peft serve --root ROOT`` in a subprocess on 127.0.0.1 and a free port; yields its URL
    once it serves, and stops it (SIGTERM) afterwards: the real command, in a process of its own
    (:func:`~mnist_peft.app.launch.spawn_command`). Its output goes to ``log`` (default: a temporary file).

    Raises:
        MnistPeftError: it exited or did not serve within ``timeout`` seconds (with its output's tail).
    """
    from mnist_peft.app.launch import spawn_command

    with spawn_command("serve", root, args=args, env=env, log=log, timeout=timeout) as url:
        yield url
