"""A batch whose decode fails answers its own requests with an error; the server and other requests go on.
Also: seeded sampling at temperature > 0 is reproducible."""

from __future__ import annotations

import json

import httpx
import pytest
from serving_helpers import POISON, LiveServer, poison_decoder


@pytest.fixture()
def failing_server(checkpoint, monkeypatch):
    # POISON stands in for any failure inside a batch
    poison_decoder(monkeypatch, lambda: RuntimeError("simulated failure inside the decoder"))
    s = LiveServer(checkpoint, max_batch=4, max_queue=8)
    yield s
    s.close()


def test_failing_batch_is_isolated(failing_server):
    s = failing_server
    bad = {"model": s.model_name, "prompt": POISON, "max_tokens": 8}
    r = httpx.post(s.base + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "simulated failure" in err["message"]
    with httpx.stream("POST", s.base + "/v1/completions", json={**bad, "stream": True}, timeout=60) as resp:
        data = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
    assert "simulated failure" in json.loads(data[-1])["error"]["message"]
    assert "[DONE]" not in data
    good = httpx.post(s.base + "/v1/completions", json={**bad, "prompt": "def f():"}, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(s.base + "/health", timeout=10).json()["status"] == "ok"


def test_seeded_sampling_is_reproducible(server):
    body = {"model": server.model_name, "prompt": "import os", "max_tokens": 24, "temperature": 1.0}
    texts = [httpx.post(server.base + "/v1/completions", json={**body, "seed": 1234}, timeout=60).json()
             ["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]
    others = {httpx.post(server.base + "/v1/completions", json={**body, "seed": k}, timeout=60).json()
              ["choices"][0]["text"] for k in range(4)}
    assert len(others) > 1  # the seed matters: sampling is not greedy
