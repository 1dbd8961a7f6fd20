"""The server's Prometheus metrics, kept by `prometheus_client` in one registry per app (two servers in one
process never share counters). Updated from the decoder thread and the event loop; the library locks."""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST  # text format 0.0.4

# The `*_created` timestamp series add nothing for a single server process; keep the page to the metrics.
prometheus_client.disable_created_metrics()


class Metrics:
    """The server's counters, gauges and histograms. `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("diffcoder_requests", "HTTP API requests by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.rejected = Counter("diffcoder_rejected", "Requests answered 429 because the queue was full.",
                                registry=r)
        self.cancelled_rows = Counter("diffcoder_cancelled_rows", "Rows dropped because their client disconnected.",
                                      registry=r)
        self.queue_depth = Gauge("diffcoder_queue_depth", "Rows waiting for a batch.", registry=r)
        self.active_rows = Gauge("diffcoder_active_rows", "Rows in the batch being decoded now.", registry=r)
        self.batch_size = Histogram("diffcoder_batch_size", "Rows per decoder batch.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batches = Counter("diffcoder_batches", "Decoder batches run.", registry=r)
        self.prompt_tokens = Counter("diffcoder_prompt_tokens", "Prompt tokens of decoded rows.", registry=r)
        self.generated_tokens = Counter("diffcoder_generated_tokens", "Generated tokens (prompt excluded).",
                                        registry=r)
        self.forwards = Counter("diffcoder_forwards", "Model forwards (NFE) over all batches.", registry=r)
        self.denoising_steps = Counter("diffcoder_denoising_steps", "Denoising steps summed over rows.", registry=r)
        self.engine_restarts = Counter("diffcoder_engine_restarts",
                                       "Times the decoder thread died and was started again.", registry=r)
        self.latency = Histogram("diffcoder_request_latency_seconds", "Time from request arrival to its last byte.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        tpf = Gauge("diffcoder_tokens_per_forward",
                    "Generated tokens per model forward since start (all rows of a batch share a forward).",
                    registry=r)
        self._lock = threading.Lock()
        self._generated = self._forwards = 0  # the ratio's two totals, read together under one lock
        tpf.set_function(self._tokens_per_forward)

    def _tokens_per_forward(self) -> float:
        with self._lock:
            return self._generated / self._forwards if self._forwards else 0.0

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, code=str(status)).inc()

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def observe_batch(self, rows: int, forwards: int, generated: int, row_steps: int = 0) -> None:
        self.batches.inc()
        self.batch_size.observe(rows)
        self.forwards.inc(forwards)
        self.denoising_steps.inc(row_steps)
        self.generated_tokens.inc(generated)
        with self._lock:
            self._generated += generated
            self._forwards += forwards

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
