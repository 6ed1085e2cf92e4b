"""Load testing the running app: :func:`run_load` sends ``(pixels, spec)`` requests from concurrent
``gradio_client`` clients and returns the answers and a :class:`LoadReport` (latency percentiles,
throughput). What ``tests/test_ui.py`` and ``mnist-peft bench`` measure.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .api import API_NAME

__all__ = ["LoadReport", "run_load"]


@dataclass
class LoadReport:
    """Latency and throughput of one load run."""

    requests: int
    clients: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def throughput(self) -> float:
        """Requests per second over the whole run."""
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """Latency (s) at quantile ``q`` in [0, 1] (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 2),
            "p50_ms": round(self.percentile(0.5) * 1e3, 1),
            "p99_ms": round(self.percentile(0.99) * 1e3, 1),
            "mean_ms": round(statistics.fmean(self.latencies) * 1e3, 1),
        }


def run_load(
    url: str,
    requests: Sequence[tuple[object, str]],
    *,
    clients: int = 20,
    api_name: str = "/" + API_NAME,
    timeout: float = 60.0,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Send ``requests`` (``(pixels, spec)`` pairs) to ``url`` from ``clients`` concurrent
    ``gradio_client`` clients (one thread each, request ``i`` from client ``i % clients``); returns
    the answers in request order and the timing. Bounded: every request waits at most ``timeout``
    seconds, and the run ends when each client has sent its share.

    Raises:
        TimeoutError: a request got no answer in ``timeout`` seconds.
    """
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    # gradio_client makes an httpx client per call, and each loads the CA bundle (~20 ms of CPU, twice a
    # request) even for plain http, where there is no TLS to verify: skipped there, kept for https.
    options = {"verbose": False, "download_files": False, "analytics_enabled": False, "ssl_verify": not url.startswith("http://")}
    answers: list[dict[str, Any]] = [{} for _ in requests]
    latencies: list[float] = [0.0] * len(requests)
    connections: list[Any] = []

    def work(c: int) -> None:
        for i in range(c, len(requests), clients):
            pixels, spec = requests[i]
            start = time.perf_counter()
            answers[i] = connections[c].submit(pixels, spec, api_name=api_name).result(timeout=timeout)
            latencies[i] = time.perf_counter() - start

    try:
        with ThreadPoolExecutor(clients) as pool:  # every client is made (or fails) before any is used
            made = [pool.submit(Client, url, **options) for _ in range(clients)]
        for future in made:  # keep each one made, so that the finally closes it even when another failed
            if future.exception() is None:
                connections.append(future.result())
        for future in made:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(work, c) for c in range(clients)]:
                future.result()
        seconds = time.perf_counter() - start
    finally:
        with ThreadPoolExecutor(clients) as pool:  # each close waits up to 1 s for its heartbeat thread: in parallel
            list(pool.map(lambda connection: connection.close(), connections))
    return answers, LoadReport(len(requests), clients, seconds, latencies)
