"""The serving engine: a base and its adapter stacks, answering batches of requests in one forward.

:class:`Predictor` resolves each request's spec to a verified, base-checked stack
(:func:`~mnist_peft.serving.stacks.resolve_stack`), loads each distinct stack once as one adapter
(:class:`~mnist_peft.serving.cache.StackCache`, combined from the entries of
:class:`~mnist_peft.serving.cache.EntryCache`; a DoRA adapter is served alone, at weight 1, as its own
files) and turns a batch into **one mixed-adapter forward**
(:func:`~mnist_peft.serving.forward.mixed_forward`). Every request of a batch is checked on its own:
a bad one gets its error, never its batch-mates. No web framework here: the app (``mnist_peft.app``)
calls :meth:`Predictor.answer` from its ``/predict`` endpoint and :meth:`Predictor.predict_pairs`
from its Draw tab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mnist_peft.errors import InvalidArgumentError, NonFiniteError
from mnist_peft.model.data import load_mnist
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.tuners.lora.model import LoraModel

from .cache import DEFAULT_CACHE_BYTES, CacheInfo, EntryCache, StackCache, check_cache_bytes
from .forward import mixed_forward
from .lane import ModelLane
from .requests import Refused, image_to_input, logits_result, public_message, require_answer
from .resolvers import RegistryResolver, Resolver
from .stacks import ResolvedStacks, Stack

__all__ = ["Predictor", "ServingEngine"]


class Predictor:
    """The app's model: a base and an LRU cache of adapter stacks, answering batches in one forward.

    Each distinct stack is loaded once as one adapter, the exact ``cat`` combination of its members
    with their weights folded in, and kept while the cache's byte budget allows (least recently
    used first out, removed with ``delete_adapter``; a batch's own stacks stay while it runs, so a
    batch may exceed the budget until it ends). The members come from a second, small LRU of
    registry entries read and checked (up to :data:`~mnist_peft.serving.cache.ENTRY_CACHE_SIZE`,
    keyed on ``name@version`` and the sha256 of both adapter files), so a new weight or mix of known
    adapters reads no file. One thread, the engine's :class:`~mnist_peft.serving.lane.ModelLane`,
    does all model work, whichever thread calls: a mixed forward owns the model's state while it
    runs, and the adapters the cache creates and frees live in one malloc arena (called from a web
    server's many threads, they fragmented dozens of arenas and the process kept growing). Only
    registry entries are loaded (each adapter file read once and checked against its recorded
    sha256, the base fingerprint compared); nothing is ever written.

    Example:
        >>> p = Predictor(AdapterRegistry("adapters"))
        >>> stack = p.resolve("digit-9@1:1.0")
        >>> p.predict_batch(x, [None, stack])   # (2, 10) logits in one forward
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        base: str = "base",
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        data_dir: str | None = None,
        resolvers: Sequence[Resolver] | None = None,
    ) -> None:
        from mnist_peft.registry.refs import resolve_base

        check_cache_bytes(cache_bytes)
        self.registry = registry
        self.resolvers: list[Resolver] = list(resolvers) if resolvers is not None else [RegistryResolver(registry)]
        """Asked in order for each reference of a spec (default: the registry alone; a server with the Hub
        allowed appends a :class:`~mnist_peft.serving.resolvers.HubResolver`)."""
        self.data_dir = data_dir
        self.base_ref = base
        self.model = LoraModel(resolve_base(base, registry)).eval()
        self.fingerprint = self.model.base_fingerprint()  # once: the app never edits its base
        self._stacks = StackCache(self.model, EntryCache(registry, self.fingerprint), budget=cache_bytes)
        self._lane = ModelLane()  # all model work on one thread: serialised, and its memory in one malloc arena
        self._test_logits: torch.Tensor | None = None
        self._resolved = ResolvedStacks(registry, self.resolvers)

    # -- stacks
    def resolve(self, spec: object) -> Stack | None:
        """The stack a spec names, by the engine's resolvers now: see :func:`~mnist_peft.serving.stacks.resolve_stack`.

        A spec string resolved before is answered from a small LRU (:class:`~mnist_peft.serving.stacks.ResolvedStacks`) while the
        registry's index is unchanged since (:meth:`~mnist_peft.registry.adapter_registry.AdapterRegistry.index_signature`):
        a version registered meanwhile is still used from the next request on.
        """
        return self._resolved.resolve(spec)

    @property
    def cache_bytes(self) -> int:
        """The stack cache's byte budget (change it with :meth:`resize_cache`)."""
        return self._stacks.budget

    @cache_bytes.setter
    def cache_bytes(self, cache_bytes: int) -> None:
        self.resize_cache(cache_bytes)

    def cache_info(self) -> CacheInfo:
        return self._lane.run(self._stacks.info)

    def cached(self) -> list[tuple[tuple, str]]:
        """The cached stacks, least recently used first: ``(Stack.key, adapter name in the model)``."""
        return self._lane.run(self._stacks.cached)

    def resize_cache(self, cache_bytes: int) -> None:
        """Change the cache's byte budget; least recently used stacks go until it holds."""
        check_cache_bytes(cache_bytes)
        self._lane.run(self._stacks.resize, cache_bytes)

    def warm(self, stack: Stack | None) -> None:
        """Load ``stack`` into the cache now (least recently used stacks make room), so its first
        request pays no load: what a Ray Serve replica does when a stack is routed to it."""
        if stack is not None:
            self._lane.run(self._warm, stack)

    def _warm(self, stack: Stack) -> None:
        self._stacks.evict(keep={stack.key})
        self._stacks.load(stack)
        self._stacks.evict(keep={stack.key})

    # -- forward
    def predict_batch(self, x: torch.Tensor, stacks: Sequence[Stack | None]) -> torch.Tensor:
        """Logits (N, 10) of ``x`` (N, 784, normalised), row i through ``stacks[i]`` (``None``: the base),
        in one mixed-adapter forward.

        Raises:
            AdapterStateError: ``stacks`` does not match ``x``'s rows.
            IntegrityError, FingerprintMismatchError, and the adapter load errors: a stack's files.
        """
        return self._lane.run(self._predict_batch, x, stacks)

    def _predict_batch(self, x: torch.Tensor, stacks: Sequence[Stack | None]) -> torch.Tensor:
        needed = {s.key for s in stacks if s is not None}
        self._stacks.evict(keep=needed)  # room first, keeping what this batch uses
        try:
            names = [None if s is None else self._stacks.load(s) for s in stacks]
            return mixed_forward(self.model, x, names)
        finally:
            self._stacks.evict()

    def test_logits(self) -> torch.Tensor:
        """The base's logits on the 10,000 MNIST test images (computed once)."""
        return self._lane.run(self._base_test_logits)

    def _base_test_logits(self) -> torch.Tensor:
        if self._test_logits is None:
            x = load_mnist(train=False, data_dir=self.data_dir).x
            self._test_logits = torch.cat(
                [mixed_forward(self.model, x[i : i + 2000], [None] * len(x[i : i + 2000])) for i in range(0, len(x), 2000)]
            )
        return self._test_logits

    def predict_pairs(
        self, xs: Sequence[torch.Tensor], stacks: Sequence[Stack | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | Exception]:
        """Per request ``i``, the logits (10,) of ``xs[i]`` (1, 784) through the base and through
        ``stacks[i]`` (the base again for ``None``), all in one mixed forward.

        A request whose stack cannot be loaded (a file altered since it was listed, another base's
        adapter), or whose logits are not finite or beyond
        :data:`~mnist_peft.numerics.MAX_ABS_OUTPUT` (:func:`~mnist_peft.serving.requests.require_answer`),
        gets that error in its place; the others of the batch still get their answer.
        """
        rows, row_stacks, where = [], [], []
        for x, stack in zip(xs, stacks, strict=True):
            where.append((len(rows), len(rows) if stack is None else len(rows) + 1))
            rows.append(x)
            row_stacks.append(None)
            if stack is not None:
                rows.append(x)
                row_stacks.append(stack)
        if not rows:
            return []
        try:
            logits = self.predict_batch(torch.cat(rows), row_stacks)
        except Exception as exc:  # a stack's files are outside input too: whatever they raise fails their requests only
            if len(xs) == 1:
                return [exc]
            return [self.predict_pairs([x], [s])[0] for x, s in zip(xs, stacks, strict=True)]  # find the bad one(s)
        return [_checked_pair(logits[b], logits[s], stack) for (b, s), stack in zip(where, stacks, strict=True)]

    def answer(self, images: Sequence[object], specs: Sequence[str | None]) -> list[dict[str, Any]]:
        """What ``/predict`` returns: per request, the base's and the stack's label, probabilities
        and logits (``"stack": None`` for an empty spec).

        Requests are checked one by one; a bad one (any image or spec from outside: wrong types,
        huge numbers, unknown entries) gets ``{"error": "..."}`` and does not fail the others of its
        batch, which all run in one forward. Messages name registry files relative to the registry.
        """
        if len(images) != len(specs):
            raise InvalidArgumentError(f"got {len(images)} images and {len(specs)} adapter specs; give one spec per image")
        answers: list[dict[str, Any]] = [{} for _ in images]
        good: list[tuple[int, torch.Tensor, Stack | None]] = []
        resolved: dict[str, Stack | None] = {}  # one registry lookup per distinct spec in the batch
        for i, (image, spec) in enumerate(zip(images, specs, strict=True)):
            try:
                if isinstance(image, Refused):
                    raise image.error
                if isinstance(spec, Refused):
                    raise spec.error
                x = image_to_input(image)
                key = spec if isinstance(spec, str) or spec is None else repr(spec)
                if key not in resolved:
                    resolved[key] = self.resolve(spec)
                good.append((i, x, resolved[key]))
            except Exception as exc:  # whatever a hostile request raises is its own answer, not its batch's
                answers[i] = {"error": self.public_message(exc)}
        outcomes = self.predict_pairs([x for _, x, _ in good], [s for _, _, s in good])
        for (i, _, stack), outcome in zip(good, outcomes, strict=True):
            if isinstance(outcome, Exception):
                answers[i] = {"error": self.public_message(outcome)}
                continue
            base, with_stack = outcome
            answers[i] = {
                "base": logits_result(base),
                "stack": None if stack is None else {**logits_result(with_stack), "adapters": stack.to_list()},
            }
        return answers

    def public_message(self, exc: BaseException) -> str:
        """``exc`` as one line for a web client: the registry's folder written ``<registry>``
        (a browser has no use for the server's paths)."""
        return public_message(exc, self.registry.root)


def _checked_pair(base: torch.Tensor, with_stack: torch.Tensor, stack: Stack | None) -> tuple[torch.Tensor, torch.Tensor] | Exception:
    """One request's two rows of logits, or the error that says which of them is no usable answer."""
    try:
        require_answer(base, who="the base")
        if stack is not None:
            require_answer(with_stack, who=f"the stack {stack.label!r}")
    except NonFiniteError as exc:
        return exc
    return base, with_stack


ServingEngine = Predictor  # the name by what it is; ``Predictor`` is the name the app and its tests grew up with
