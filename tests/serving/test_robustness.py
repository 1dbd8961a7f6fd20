"""The server stays responsive and honest: long prompts never stall the event loop, and a decoder thread that
dies is reported by /health (503), answered to its requests, and restarted, or the server stops."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest
from serving_helpers import POISON, LiveServer, expected_answer, metric_value, poison_decoder


class Crash(BaseException):
    """Not an Exception: stands for anything that takes a thread down (the per-batch handler cannot catch it)."""


@pytest.fixture()
def crashing_decoder(monkeypatch):
    poison_decoder(monkeypatch, lambda: Crash("simulated death of the decoder thread"))  # POISON kills the thread


def health_samples(base: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t = time.perf_counter()
            assert c.get(base + "/health").status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.02)


def during(base: str, work) -> tuple[object, list[float]]:
    """Run `work()` while /health is polled; (its result, the /health latencies)."""
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=health_samples, args=(base, stop, latencies))
    poller.start()
    try:
        time.sleep(0.1)
        return work(), latencies
    finally:
        stop.set()
        poller.join()


def test_a_10_mb_prompt_does_not_stall_health(checkpoint):
    s = LiveServer(checkpoint, max_body_bytes=32 * 2**20)  # let 10 MB through the size limit
    try:
        text = "def f(x):\n    return x\n" * (10 * 2**20 // 24)
        bodies = [("/v1/completions", {"model": s.model_name, "prompt": text}),
                  ("/v1/chat/completions", {"model": s.model_name, "messages": [{"role": "user", "content": text}]})]
        for path, body in bodies:
            r, latencies = during(s.base, lambda p=path, b=body: httpx.post(s.base + p, json=b, timeout=120))
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert latencies and max(latencies) < 0.5, max(latencies)
    finally:
        s.close()


class SlowTokenizer:
    """The real tokenizer, taking a second per call: stands for a long prompt on a large vocabulary."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def __call__(self, *a, **kw):
        time.sleep(1.0)
        return self.tok(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_tokenizing_runs_off_the_event_loop(checkpoint, reference):
    s = LiveServer(checkpoint)
    try:
        prompts = s.app.state.service.prompts
        prompts.tokenizer = SlowTokenizer(prompts.tokenizer)
        body = {"model": s.model_name, "prompt": "def add(a, b):", "max_tokens": 8}
        with cf.ThreadPoolExecutor(2) as pool:
            def two_requests() -> list[httpx.Response]:
                futures = [pool.submit(httpx.post, s.base + "/v1/completions", json=body, timeout=60) for _ in "ab"]
                return [f.result() for f in futures]

            results, latencies = during(s.base, two_requests)
        want = expected_answer(reference, reference[1]("def add(a, b):")["input_ids"], 8)["text"]
        assert [r.json()["choices"][0]["text"] for r in results] == [want, want]
        assert len(latencies) > 10 and max(latencies) < 0.3, max(latencies)  # /health answered throughout
    finally:
        s.close()


def test_dead_engine_is_answered_reported_and_restarted(checkpoint, crashing_decoder, reference):
    s = LiveServer(checkpoint, max_restarts=3)
    try:
        r = httpx.post(s.base + "/v1/completions", json={"model": s.model_name, "prompt": POISON, "max_tokens": 8},
                       timeout=30)
        assert r.status_code == 503, r.text  # answered, not left hanging
        assert "decoder thread stopped" in r.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while (h := httpx.get(s.base + "/health", timeout=10)).json()["engine_restarts"] < 1:
            assert time.monotonic() < deadline, h.text
            time.sleep(0.05)
        assert h.status_code == 200 and "simulated death" in h.json()["last_engine_error"]
        assert metric_value(s.base, "diffcoder_engine_restarts_total") == 1
        good = httpx.post(s.base + "/v1/completions", timeout=30,
                          json={"model": s.model_name, "prompt": "def add(a, b):", "max_tokens": 8})
        want = expected_answer(reference, reference[1]("def add(a, b):")["input_ids"], 8)["text"]
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == want
    finally:
        s.close()


def test_engine_without_restarts_left_reports_503_and_stops_the_server(checkpoint, crashing_decoder):
    reasons: list[str] = []
    s = LiveServer(checkpoint, max_restarts=0, on_fatal=reasons.append)
    try:
        r = httpx.post(s.base + "/v1/completions", json={"model": s.model_name, "prompt": POISON, "max_tokens": 8},
                       timeout=30)
        assert r.status_code == 503
        deadline = time.monotonic() + 10
        while not reasons:
            assert time.monotonic() < deadline, "on_fatal was not called"
            time.sleep(0.05)
        assert "simulated death" in reasons[0]
        h = httpx.get(s.base + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "down"
        r = httpx.post(s.base + "/v1/completions", json={"model": s.model_name, "prompt": "x", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
    finally:
        s.close()
