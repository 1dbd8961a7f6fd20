"""Prometheus text exposition for the server, written by hand (a few counters, gauges and histograms).

Values are updated from the decoder thread and the event loop, so every update takes one lock."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_fmt(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {_fmt(self.total)}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """The server's counters. `render()` gives the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.rejected = 0  # 429s from a full queue
        self.cancelled_rows = 0  # rows dropped because their client went away
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.forwards = 0
        self.row_steps = 0  # denoising steps summed over rows (a row's step may share a forward with others)
        self.batches = 0
        self.queue_depth = 0
        self.active_rows = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency.observe(seconds)

    def observe_batch(self, rows: int, forwards: int, generated: int, row_steps: int = 0) -> None:
        with self.lock:
            self.batches += 1
            self.batch_size.observe(rows)
            self.forwards += forwards
            self.row_steps += row_steps
            self.generated_tokens += generated

    def add(self, field: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + amount)

    def set(self, field: str, value: int) -> None:
        with self.lock:
            setattr(self, field, value)

    def render(self) -> str:
        with self.lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str, lines: list[str]) -> None:
                out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines])

            metric("diffcoder_requests_total", "counter", "HTTP API requests by endpoint and status code.",
                   [f'diffcoder_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())] or ['diffcoder_requests_total{endpoint="",code=""} 0'])
            metric("diffcoder_rejected_total", "counter", "Requests answered 429 because the queue was full.",
                   [f"diffcoder_rejected_total {self.rejected}"])
            metric("diffcoder_cancelled_rows_total", "counter", "Rows dropped because their client disconnected.",
                   [f"diffcoder_cancelled_rows_total {self.cancelled_rows}"])
            metric("diffcoder_queue_depth", "gauge", "Rows waiting for a batch.",
                   [f"diffcoder_queue_depth {self.queue_depth}"])
            metric("diffcoder_active_rows", "gauge", "Rows in the batch being decoded now.",
                   [f"diffcoder_active_rows {self.active_rows}"])
            metric("diffcoder_batch_size", "histogram", "Rows per decoder batch.",
                   self.batch_size.lines("diffcoder_batch_size"))
            metric("diffcoder_batches_total", "counter", "Decoder batches run.",
                   [f"diffcoder_batches_total {self.batches}"])
            metric("diffcoder_prompt_tokens_total", "counter", "Prompt tokens of decoded rows.",
                   [f"diffcoder_prompt_tokens_total {self.prompt_tokens}"])
            metric("diffcoder_generated_tokens_total", "counter", "Generated tokens (prompt excluded).",
                   [f"diffcoder_generated_tokens_total {self.generated_tokens}"])
            metric("diffcoder_forwards_total", "counter", "Model forwards (NFE) over all batches.",
                   [f"diffcoder_forwards_total {self.forwards}"])
            metric("diffcoder_denoising_steps_total", "counter", "Denoising steps summed over rows.",
                   [f"diffcoder_denoising_steps_total {self.row_steps}"])
            tpf = self.generated_tokens / self.forwards if self.forwards else 0.0
            metric("diffcoder_tokens_per_forward", "gauge",
                   "Generated tokens per model forward since start (all rows of a batch share a forward).",
                   [f"diffcoder_tokens_per_forward {_fmt(tpf)}"])
            metric("diffcoder_request_latency_seconds", "histogram", "Time from request arrival to its last byte.",
                   self.latency.lines("diffcoder_request_latency_seconds"))
            return "\n".join(out) + "\n"
