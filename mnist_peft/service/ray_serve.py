"""The HTTP API on Ray Serve (``mnist-peft serve --ray``): the same FastAPI app, its forwards on
replicas that each hold a serving engine.

Two deployments:

- ``Api`` (one replica): ``@serve.ingress`` over the app of :func:`~mnist_peft.service.api.create_api`,
  built on the replica (``__serve_build_asgi_app__``) over a :class:`RayBackend`. It checks the images
  and resolves each spec with the registry and Hub resolvers, then calls the model deployment with
  the resolved stack as the **multiplexed model id** (its pinned references and weights, so two specs
  naming the same adapters at the same weights are one id).
- ``StackReplica`` (``--replicas N``): a :class:`~mnist_peft.serving.engine.Predictor`;
  ``@serve.multiplexed`` loads a stack on first use (Ray then routes that id's requests to a replica
  that holds it), ``@serve.batch`` gathers concurrent requests into one mixed-adapter forward
  (:func:`~mnist_peft.serving.batched.run_prepared`: a bad request fails alone).

An error crosses from a replica to the ingress as the status, public one-line message and field the
API gives it in one process (:func:`portable`), and is answered with them (:func:`raised`). Ray itself
is imported only here.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from mnist_peft.errors import MnistPeftError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.serving.batched import PreparePools
from mnist_peft.serving.cache import CacheInfo
from mnist_peft.serving.requests import images_to_input, public_message
from mnist_peft.serving.resolvers import HubResolver, RegistryResolver, Resolver
from mnist_peft.serving.stacks import Stack, resolve_items, resolve_stack

from .backend import list_entries

__all__ = ["RayOptions", "RayBackend", "build_application", "portable", "raised", "run_ray", "shutdown"]

MAX_STACKS_PER_REPLICA = 64  # multiplexed ids a replica keeps; its engine's byte budget bounds the memory


@dataclass(frozen=True)
class RayOptions:
    """What every replica needs to build its part (plain values: they travel to Ray's workers)."""

    root: str
    base: str = "base"
    data_dir: str | None = None
    cache_bytes: int = 64 << 20
    allow_hub: bool = False
    hub_cache: str | None = None
    hub_owners: tuple[str, ...] | None = None
    replicas: int = 2
    max_batch: int = 32
    max_wait_s: float = 0.002
    max_images: int = 64
    api_key: str | None = None
    max_body_bytes: int | None = None

    def __repr__(self) -> str:  # never the API key
        shown = {k: v for k, v in asdict(self).items() if k != "api_key"}
        return f"RayOptions({shown}, api_key={'<set>' if self.api_key else None})"

    def resolvers(self, registry: AdapterRegistry) -> list[Resolver]:
        """The registry, then (only with ``allow_hub``) the Hub, as ``mnist-peft serve`` asks them."""
        found: list[Resolver] = [RegistryResolver(registry)]
        if self.allow_hub:
            from .launch import default_hub_cache

            found.append(HubResolver(self.hub_cache or default_hub_cache(), owners=self.hub_owners))
        return found


def portable(exc: BaseException, root: Any = None) -> dict[str, Any]:
    """``exc`` as plain data that crosses to the ingress: the status, public one-line message and field
    the API gives it in one process (:func:`~mnist_peft.service.failures.error_status`; never its text
    when it is not the toolkit's own, never a server path)."""
    from .failures import error_status, predict_field

    message = public_message(exc, root)
    return {"error": {"status": error_status(exc), "message": message, "field": predict_field(exc, message)}}


def raised(data: dict[str, Any]) -> BaseException:
    """The error :func:`portable` described, as an :class:`~mnist_peft.service.failures.ApiError` that the
    API answers with that status, message and field."""
    from .failures import ApiError

    error = data["error"]
    return ApiError(int(error["status"]), str(error["message"]), error.get("field"))


def model_id(stack: Stack | None) -> str:
    """The multiplexed model id of a resolved stack: its pinned references and weights as JSON ("" for the base)."""
    return "" if stack is None else json.dumps(stack.pinned(), separators=(",", ":"))


class RayBackend:
    """The API's backend on the ingress replica: checks and resolves here, forwards on the replicas."""

    def __init__(self, replica: Any, options: RayOptions) -> None:
        self.replica = replica
        self.options = options
        self.registry = AdapterRegistry(options.root)
        self.resolvers = options.resolvers(self.registry)
        self._pools = PreparePools()

    def _prepare(self, images: object, spec: object) -> tuple[Any, Stack | None]:
        return images_to_input(images, max_images=self.options.max_images), resolve_stack(self.resolvers, spec)

    async def predict(self, images: object, spec: object) -> dict[str, Any]:
        x, stack = await self._pools.run(spec, self._prepare, images, spec)
        answer = await self.replica.options(multiplexed_model_id=model_id(stack)).remote(x)
        if "error" in answer:
            raise raised(answer)
        return answer

    def entries(self, name: str | None = None) -> list[RegistryEntry]:
        return list_entries(self.registry, name)

    def cache_info(self) -> CacheInfo | None:
        return None  # each replica holds its own cache

    def public_message(self, exc: BaseException) -> str:
        return public_message(exc, self.registry.root)

    def close(self) -> None:
        self._pools.close()


def build_application(options: RayOptions) -> Any:
    """The Ray Serve application: ``Api`` (ingress) bound to ``StackReplica`` x ``options.replicas``."""
    from ray import serve

    from mnist_peft.serving.batched import Prepared, run_prepared
    from mnist_peft.serving.engine import Predictor
    from mnist_peft.serving.metrics import ServingMetrics

    @serve.deployment(name="StackReplica", num_replicas=options.replicas, ray_actor_options={"num_cpus": 0})
    class StackReplica:
        def __init__(self, options: RayOptions) -> None:
            import torch

            torch.set_num_threads(1)  # replicas share the machine's cores
            registry = AdapterRegistry(options.root)
            self.predictor = Predictor(
                registry, options.base, cache_bytes=options.cache_bytes, data_dir=options.data_dir, resolvers=options.resolvers(registry)
            )

        @serve.multiplexed(max_num_models_per_replica=MAX_STACKS_PER_REPLICA)
        async def stack(self, model_id: str) -> Stack:
            items = [(str(ref), float(w)) for ref, w in json.loads(model_id)]
            stack = await asyncio.to_thread(resolve_items, self.predictor.resolvers, items)
            await asyncio.to_thread(self.predictor.warm, stack)
            return stack

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.max_wait_s)
        async def forward(self, batch: list[Prepared]) -> list[dict[str, Any]]:
            answers = await asyncio.to_thread(run_prepared, self.predictor, batch)
            return [portable(a, self.predictor.registry.root) if isinstance(a, BaseException) else a for a in answers]

        def stats(self) -> dict[str, Any]:
            """This replica's id and its stack cache's numbers (what the tests and an operator read)."""
            info = self.predictor.cache_info()
            replica = serve.get_replica_context().replica_id.unique_id
            return {"replica": replica, "hits": info.hits, "misses": info.misses, "stacks": info.entries}

        async def __call__(self, x: Any) -> dict[str, Any]:
            mid = serve.get_multiplexed_model_id()
            try:
                stack = await self.stack(mid) if mid else None
            except Exception as exc:  # a stack that cannot load fails this request only
                return portable(exc, self.predictor.registry.root)
            return await self.forward(Prepared(x, stack))

    @serve.deployment(name="Api", ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Api:
        def __init__(self, replica: Any, options: RayOptions) -> None:
            self.backend = RayBackend(replica, options)
            self.options = options

        def __serve_build_asgi_app__(self) -> Any:
            from .api import create_api

            kwargs = {} if self.options.max_body_bytes is None else {"max_body_bytes": self.options.max_body_bytes}
            return create_api(
                self.backend, metrics=ServingMetrics(), api_key=self.options.api_key, max_images=self.options.max_images, **kwargs
            )

    return Api.bind(StackReplica.bind(options), options)


def run_ray(
    options: RayOptions, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, num_cpus: int | None = None
) -> str:
    """Start (or join, with ``address`` / ``$RAY_ADDRESS``) Ray, run the application on ``host:port``
    and return its URL; :func:`shutdown` stops it.

    Raises:
        MnistPeftError: Ray Serve is not installed (the ``serve`` extra).
    """
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MnistPeftError("mnist-peft serve --ray needs Ray Serve: pip install -e '.[serve]'") from exc
    if not ray.is_initialized():
        joining = address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=joining,
            **({} if joining else {"_node_ip_address": "127.0.0.1"}),  # a Ray of our own: its ports on this machine only
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(options), name="mnist-peft", route_prefix="/")
    return f"http://{host}:{port}/"


def shutdown() -> None:
    """Stop the application, Serve and the Ray this process started."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
