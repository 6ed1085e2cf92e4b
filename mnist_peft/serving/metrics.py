"""What a server has done, in Prometheus' text format (:class:`ServingMetrics`): requests by endpoint
and status, their latency, the batches the engine ran, and its stack cache's hits, misses and
evictions. Thread-safe; no client library needed (the format is a few lines of text).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from .cache import CacheInfo

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Histogram", "ServingMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_PREFIX = "mnist_peft"


class Histogram:
    """Counts of observed values per upper bound (cumulative when written), their sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket that holds quantile ``q`` (None before any value; inf above every bound)."""
        if not self.count:
            return None
        seen, want = 0, q * self.count
        for bound, n in zip([*self.buckets, float("inf")], self.counts, strict=True):
            seen += n
            if seen >= want:
                return bound
        return float("inf")

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, seen = [], 0
        sep = "," if labels else ""
        for bound, n in zip([*self.buckets, float("inf")], self.counts, strict=True):
            seen += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {seen}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class ServingMetrics:
    """A server's counters: :meth:`request` per answered HTTP request, :meth:`batch` per engine batch
    (a :class:`~mnist_peft.serving.batcher.MicroBatcher`'s ``on_batch``); :meth:`render` writes them,
    with the stack cache's numbers, as Prometheus text.

    Example:
        >>> m = ServingMetrics()
        >>> m.request("/v1/predict", 200, 0.004)
        >>> "mnist_peft_requests_total" in m.render()
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, Histogram] = {}
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request (``endpoint``: the route's template, never the raw path a client sent)."""
        with self._lock:
            self._requests[endpoint, status] = self._requests.get((endpoint, status), 0) + 1
            self._latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, requests: int, rows: int) -> None:
        with self._lock:
            self.batch_requests.observe(requests)
            self.batch_rows.observe(rows)

    def requests_total(self, endpoint: str | None = None) -> int:
        with self._lock:
            return sum(n for (e, _), n in self._requests.items() if endpoint is None or e == endpoint)

    def render(self, cache: CacheInfo | None = None) -> str:
        """Everything counted so far in Prometheus' text exposition format (version 0.0.4)."""
        p = _PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status code.",
                f"# TYPE {p}_requests_total counter",
            ]
            lines += [f'{p}_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self._requests.items())]
            lines += [f"# HELP {p}_request_seconds Time to answer a request, by endpoint.", f"# TYPE {p}_request_seconds histogram"]
            for endpoint, hist in sorted(self._latency.items()):
                lines += hist.lines(f"{p}_request_seconds", f'endpoint="{endpoint}"')
            for what, hist, help_ in (
                ("batch_requests", self.batch_requests, "Requests the engine answered in one forward."),
                ("batch_rows", self.batch_rows, "Images (rows) of one engine forward."),
            ):
                lines += [f"# HELP {p}_{what} {help_}", f"# TYPE {p}_{what} histogram", *hist.lines(f"{p}_{what}")]
        if cache is not None:
            for name, kind, value, help_ in (
                ("cache_hits_total", "counter", cache.hits, "Stack cache: requests whose stack was loaded already."),
                ("cache_misses_total", "counter", cache.misses, "Stack cache: stacks loaded (combined) on demand."),
                ("cache_evictions_total", "counter", cache.evictions, "Stack cache: stacks dropped for the byte budget."),
                ("cache_stacks", "gauge", cache.entries, "Stack cache: stacks held now."),
                ("cache_bytes", "gauge", cache.nbytes, "Stack cache: bytes of adapter tensors held now."),
                ("cache_budget_bytes", "gauge", cache.budget, "Stack cache: its byte budget."),
                ("entry_cache_hits_total", "counter", cache.entry_hits, "Adapter files served from the checked-entry cache."),
                ("entry_cache_misses_total", "counter", cache.entry_misses, "Adapter files read from disk and checked."),
            ):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"
