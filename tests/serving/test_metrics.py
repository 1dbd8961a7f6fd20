"""GET /metrics: valid Prometheus text, and counters that move by exactly what the API answered."""

from __future__ import annotations

import re

import httpx

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? '
                    r'-?[0-9.e+-]+$|^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? (\+Inf|NaN)$')
FAMILIES = {"diffcoder_requests_total": "counter", "diffcoder_queue_depth": "gauge",
            "diffcoder_batch_size": "histogram", "diffcoder_generated_tokens_total": "counter",
            "diffcoder_tokens_per_forward": "gauge", "diffcoder_request_latency_seconds": "histogram",
            "diffcoder_forwards_total": "counter", "diffcoder_active_rows": "gauge",
            "diffcoder_rejected_total": "counter", "diffcoder_cancelled_rows_total": "counter",
            "diffcoder_denoising_steps_total": "counter"}


def scrape(server) -> dict[str, float]:
    r = httpx.get(server.base + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    types = {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("#"):
            assert line.startswith("# HELP ")
        else:
            assert SAMPLE.match(line), line
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, name
    return out


def test_metrics_count_what_was_served(server):
    before = scrape(server)
    body = {"model": server.model_name, "prompt": "def add(a, b):", "max_tokens": 12, "n": 3}
    usage = httpx.post(server.base + "/v1/completions", json=body, timeout=60).json()["usage"]
    httpx.post(server.base + "/v1/completions", json={**body, "model": "nope"}, timeout=60)
    after = scrape(server)
    key = 'diffcoder_requests_total{code="200",endpoint="/v1/completions"}'
    assert after[key] - before.get(key, 0) == 1
    key404 = 'diffcoder_requests_total{code="404",endpoint="/v1/completions"}'
    assert after[key404] - before.get(key404, 0) == 1
    gen = after["diffcoder_generated_tokens_total"] - before["diffcoder_generated_tokens_total"]
    assert gen == usage["completion_tokens"]
    assert after["diffcoder_request_latency_seconds_count"] - before["diffcoder_request_latency_seconds_count"] == 1
    # the three choices were one batch of three rows sharing each forward
    assert after["diffcoder_batch_size_sum"] - before["diffcoder_batch_size_sum"] == 3
    assert after["diffcoder_batch_size_count"] - before["diffcoder_batch_size_count"] == 1
    fwd = after["diffcoder_forwards_total"] - before["diffcoder_forwards_total"]
    assert 0 < fwd <= 4 * 4  # 12 tokens = 3 blocks (4 if the prompt tail opens one) of 4 steps
    # three identical rows in lock step: every forward is one denoising step of each row
    assert after["diffcoder_denoising_steps_total"] - before["diffcoder_denoising_steps_total"] == 3 * fwd
    assert after["diffcoder_queue_depth"] == 0 and after["diffcoder_active_rows"] == 0
    assert after["diffcoder_tokens_per_forward"] == after["diffcoder_generated_tokens_total"] / after[
        "diffcoder_forwards_total"]
