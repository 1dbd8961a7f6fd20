"""Soak: 1,200 mixed good and hostile requests, a quarter of the good ones dropped by their client mid-stream or
while waiting, against a real `diffcoder serve` process on 127.0.0.1. Every answer must carry a status its
request allows (no 5xx, no hang); afterwards the server answers a fixed greedy request exactly as before, has
freed every row, and its resident memory has stopped growing."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_helpers import metric_value
from soak import soak

SRC = str(Path(__file__).resolve().parents[2] / "src")
REQUESTS = 1200
WARM_UP = 400  # requests before the memory baseline (allocator pools and caches fill up first)
MAX_GROWTH_MB = 32

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")


@pytest.fixture()
def served(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "diffcoder.cli", "serve", "--model", str(checkpoint), "--port", "0",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("diffcoder: serving"), (tmp_path / "server.log").read_text()
        yield proc, re.search(r"at (http://127\.0\.0\.1:\d+)/", line).group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_soak(served, checkpoint):
    proc, base = served
    fixed = {"model": checkpoint.name, "prompt": "def add(a, b):", "max_tokens": 24}
    before = httpx.post(base + "/v1/completions", json=fixed, timeout=30).json()["choices"][0]["text"]

    result = asyncio.run(soak(base, checkpoint.name, proc.pid, REQUESTS, concurrency=12, seed=0,
                              big_body=9 * 2**20, huge_prompt=6 * 2**20, timeout=60))

    rss = dict(result.rss_mb)
    print(f"\nsoak: {result.sent} requests in {result.seconds:.1f} s; statuses {dict(result.statuses)}; "
          f"RSS MiB by requests done: {', '.join(f'{k}: {v:.0f}' for k, v in sorted(rss.items()))}")
    assert result.sent == REQUESTS and result.seconds < 120
    assert not result.unexpected, result.unexpected[:20]
    assert result.statuses[200] > REQUESTS // 5 and result.statuses[None] > 50  # real work, real disconnects
    after = httpx.post(base + "/v1/completions", json=fixed, timeout=30).json()["choices"][0]["text"]
    assert after == before
    assert httpx.get(base + "/health", timeout=10).json()["engine_restarts"] == 0
    assert metric_value(base, "diffcoder_queue_depth") == 0 and metric_value(base, "diffcoder_active_rows") == 0
    late = [v for k, v in rss.items() if k >= WARM_UP]
    assert max(late) - rss[WARM_UP] <= MAX_GROWTH_MB, rss
