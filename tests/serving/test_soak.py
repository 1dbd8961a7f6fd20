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
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serving_helpers import metric_value
from soak import soak

SRC = str(Path(__file__).resolve().parents[2] / "src")
ROUND = 400  # the first round also fills the allocator's pools and caches: it sets the baseline
# The allocator may keep one more arena or pool page after a 6-9 MiB body (seen: +35 MiB once in round 3 on an idle
# machine); a per-request leak over 800 requests would be far larger (the old server grew 1.6 GB in 50).
MAX_GROWTH_MB = 64

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

    # three rounds of 400; RSS is read at checkpoints and, between rounds, with no request in flight
    rounds = [asyncio.run(soak(base, checkpoint.name, proc.pid, ROUND, concurrency=12, seed=i, big_body=9 * 2**20,
                               huge_prompt=6 * 2**20, timeout=60)) for i in range(3)]

    quiet = [r.rss_mb[-1][1] for r in rounds]
    seconds = sum(r.seconds for r in rounds)
    statuses = sum((r.statuses for r in rounds), Counter())
    print(f"\nsoak: {ROUND * 3} requests in {seconds:.1f} s; statuses {dict(statuses)}; RSS MiB at start "
          f"{rounds[0].rss_mb[0][1]:.0f}, after each round {', '.join(f'{v:.0f}' for v in quiet)}; checkpoints "
          f"{[round(v) for r in rounds for _, v in r.rss_mb[1:-1]]}")
    assert sum(r.sent for r in rounds) == ROUND * 3 and seconds < 120
    unexpected = [u for r in rounds for u in r.unexpected]
    assert not unexpected, unexpected[:20]
    assert statuses[200] > ROUND // 2 and statuses[None] > 50  # real work, real disconnects
    after = httpx.post(base + "/v1/completions", json=fixed, timeout=30).json()["choices"][0]["text"]
    assert after == before
    assert httpx.get(base + "/health", timeout=10).json()["engine_restarts"] == 0
    assert metric_value(base, "diffcoder_queue_depth") == 0 and metric_value(base, "diffcoder_active_rows") == 0
    assert quiet[2] - quiet[0] <= MAX_GROWTH_MB, quiet  # the last 800 requests left (almost) nothing behind
