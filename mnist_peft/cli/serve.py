"""``serve``: the HTTP JSON API over the registry (FastAPI), with the web app at ``/ui``."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .common import UsageError, add_common, add_root
from .table import command

__all__ = ["cmd_serve", "read_api_key"]

MAX_IMAGES_LIMIT = 1024  # images in one request: the engine's rows per forward
API_KEY = re.compile(r"[\x21-\x7e]{16,4096}")  # one header-safe token: printable ASCII, no spaces
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE"


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    add_root(p)
    p.add_argument("--base", default="base", metavar="REF", help="the base model: registry name, folder or Hub repo id (default: base)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; see docs/serving.md for a reverse proxy)",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--allow-hub", action="store_true", help="resolve hub:OWNER/REPO@vN (or @COMMIT) references by pulling them once from the Hub"
    )
    p.add_argument(
        "--hub-owner",
        action="append",
        metavar="OWNER",
        help="with --allow-hub: serve Hub adapters of these owners only (repeat; default: any public repo)",
    )
    p.add_argument("--hub-cache", metavar="DIR", help="where --allow-hub keeps pulled adapters (default: ~/.cache/mnist_peft/hub-adapters)")
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'Authorization: Bearer KEY' on every route but /healthz and /docs; FILE holds KEY (one line, 16+ characters)",
    )
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="requests answered together in one forward (default 32)")
    p.add_argument(
        "--max-wait-ms", type=float, default=2.0, metavar="MS", help="how long a request waits for others to share its forward (default 2)"
    )
    p.add_argument("--max-images", type=int, default=64, metavar="N", help=f"images in one request, 1..{MAX_IMAGES_LIMIT} (default 64)")
    p.add_argument("--cache-mb", type=float, default=64.0, metavar="MB", help="memory budget of the loaded adapter stacks (default 64)")
    p.add_argument("--no-ui", action="store_true", help="do not mount the web app at /ui")
    p.add_argument("--ray", action="store_true", help="run the same API as a Ray Serve deployment (the serve extra)")
    p.add_argument("--replicas", type=int, metavar="N", help="with --ray: replicas of the model deployment (default 2)")
    add_common(p, json_flag=False)


@command(
    "serve",
    help="the HTTP JSON API: predictions under adapter stacks for programs, /metrics, the web app at /ui",
    description="Serve the registry (read-only) over HTTP: POST /v1/predict answers images (784 numbers in [0, 1] "
    "or base64 PNGs) under an adapter stack ('digit-9@1:0.5,digit-3'), concurrent requests batched into one "
    "mixed-adapter forward; GET /v1/adapters lists the entries; /healthz; /metrics (Prometheus); the OpenAPI "
    "description at /docs; the web app of `mnist-peft ui` at /ui, on the same engine. Listens on 127.0.0.1 "
    "unless --host says otherwise. Every error is a JSON body naming the field at fault. Needs the api extra "
    "(pip install -e '.[api]'). Ctrl-C or SIGTERM stops it. See docs/serving.md.",
    arguments=_serve_arguments,
)
def cmd_serve(args: argparse.Namespace) -> int:
    _check_options(args)  # every option before anything loads
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    if args.ray:
        return _run_ray(args, api_key)
    from mnist_peft.service.launch import build_service, listen, require_api, serve_forever, url_of

    require_api()
    service = build_service(
        args.root,
        base=args.base,
        api_key=api_key,
        ui=not args.no_ui,
        allow_hub=args.allow_hub,
        hub_cache=args.hub_cache,
        hub_owners=args.hub_owner,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_images=args.max_images,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        data_dir=args.data_dir,
    )
    try:
        sock = listen(args.host, args.port)
    except BaseException:
        service.backend.close()
        raise
    notes = ["API docs at /docs", _ui_note(args, service.ui)]
    if api_key:
        notes.append("an API key is required")
    print(f"mnist-peft serve: serving {url_of(sock)} (registry {service.registry.root}, {', '.join(notes)}; Ctrl-C stops it)", flush=True)
    serve_forever(service, sock)
    print(f"stopped after {service.metrics.requests_total():,} requests", file=sys.stderr)
    return 0


def _ui_note(args: argparse.Namespace, mounted: bool) -> str:
    if mounted:
        return "the app at /ui"
    return "no app at /ui (--no-ui)" if args.no_ui else "no app at /ui: it needs gradio (pip install -e '.[ui]')"


def _check_options(args: argparse.Namespace) -> None:
    """Every flag in range, said as a usage error (exit 2) before anything is imported or loaded."""
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port number (1..65535)")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size {args.max_batch_size} is not a batch size: give an integer >= 1 (default 32)")
    if not (math.isfinite(args.max_wait_ms) and 0 <= args.max_wait_ms <= 1000):
        raise UsageError(f"--max-wait-ms {args.max_wait_ms} is not a wait: give milliseconds in [0, 1000] (default 2)")
    if not 1 <= args.max_images <= MAX_IMAGES_LIMIT:
        raise UsageError(f"--max-images {args.max_images} is out of range: give an integer in [1, {MAX_IMAGES_LIMIT}] (default 64)")
    if not (math.isfinite(args.cache_mb) and args.cache_mb >= 0):
        raise UsageError(f"--cache-mb {args.cache_mb} is not a memory budget: give a finite number of MB >= 0 (default 64)")
    if args.hub_owner and not args.allow_hub:
        raise UsageError("--hub-owner limits what --allow-hub pulls: give --allow-hub too, or drop --hub-owner")
    if args.hub_cache and not args.allow_hub:
        raise UsageError("--hub-cache is where --allow-hub keeps what it pulls: give --allow-hub too, or drop --hub-cache")
    if args.replicas is not None and not args.ray:
        raise UsageError("--replicas sets the Ray Serve deployment's replicas: give --ray too, or drop --replicas")
    if args.replicas is not None and args.replicas < 1:
        raise UsageError(f"--replicas {args.replicas} is not a number of replicas: give an integer >= 1")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: --host {args.host} takes requests from other machines, over plain HTTP: "
            "keep 127.0.0.1 behind a reverse proxy that terminates TLS (docs/serving.md)",
            file=sys.stderr,
        )


def read_api_key(path: str) -> str:
    """The API key in ``path``: one line of 16 to 4,096 printable ASCII characters without spaces (a
    trailing newline is dropped). A file others can read is used with a warning. The key is never printed.

    Raises:
        UsageError: the file cannot be read, is empty, or does not hold one such line.
    """
    file = Path(path)
    try:
        if file.stat().st_size > 8192:
            raise UsageError(f"--api-key-file {path!r} is {file.stat().st_size:,} bytes; a key file holds one line: {KEY_HINT}")
        raw = file.read_bytes()
    except OSError as exc:
        raise UsageError(f"--api-key-file {path!r} cannot be read ({exc.strerror or exc})") from None
    key = raw.decode("latin-1").rstrip("\r\n")
    if not key:
        raise UsageError(f"--api-key-file {path!r} is empty: put a key of 16 or more characters in it: {KEY_HINT}")
    if not API_KEY.fullmatch(key):
        raise UsageError(
            f"--api-key-file {path!r} does not hold one key: one line of 16 to 4,096 printable ASCII characters, no spaces: {KEY_HINT}"
        )
    mode = file.stat().st_mode & 0o777
    if mode & 0o044:
        print(f"warning: --api-key-file {path!r} can be read by other users (mode {mode:o}): chmod 600 it", file=sys.stderr)
    return key


def _run_ray(args: argparse.Namespace, api_key: str | None) -> int:
    """``--ray``: the same API as a Ray Serve deployment (:mod:`mnist_peft.service.ray_serve`), in the
    foreground until Ctrl-C or SIGTERM, then Serve and the Ray it started are stopped."""
    import signal
    import threading

    from mnist_peft.registry.adapter_registry import AdapterRegistry
    from mnist_peft.service.launch import default_hub_cache, require_api
    from mnist_peft.service.ray_serve import RayOptions, run_ray, shutdown

    require_api()
    registry = AdapterRegistry(args.root)
    registry.list()  # a missing or invalid registry is said now, before Ray starts
    options = RayOptions(
        root=str(registry.root.absolute()),
        base=args.base,
        data_dir=args.data_dir,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        allow_hub=args.allow_hub,
        hub_cache=str(args.hub_cache or default_hub_cache()),
        hub_owners=tuple(args.hub_owner) if args.hub_owner else None,
        replicas=args.replicas or RayOptions.replicas,
        max_batch=args.max_batch_size,
        max_wait_s=args.max_wait_ms / 1000,
        max_images=args.max_images,
        api_key=api_key,
    )
    stop, url, previous = threading.Event(), None, None
    try:
        url = run_ray(options, host=args.host, port=args.port)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())  # after ray.init, which sets its own
        notes = f"Ray Serve, {options.replicas} replica{'s' if options.replicas != 1 else ''}, API docs at /docs, no app at /ui" + (
            ", an API key is required" if api_key else ""
        )
        print(f"mnist-peft serve: serving {url} (registry {registry.root}, {notes}; Ctrl-C stops it)", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if url is not None:  # Ray and Serve started: stop them
            shutdown()
    print("stopped", file=sys.stderr)
    return 0
