"""`diffcoder serve` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serving_helpers import free_port

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_serve_command(checkpoint):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffcoder.cli", "serve", "--model", str(checkpoint),
                             "--port", str(port), "--max-batch", "2", "--max-queue", "4", "--served-model-name",
                             "coder", "--steps-per-block", "2", "--max-tokens", "8", "--log-level", "warning"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(base + "/v1/models", timeout=5).json()["data"][0]["id"] == "coder"
        body = {"model": "coder", "prompt": "def f():", "stream": True, "diffusion_events": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            start = next(line for line in r.iter_lines() if line.startswith("data:"))
        # the command-line decoding defaults apply when a request gives none
        assert '"gen_length": 8' in start and '"steps_per_block": 2' in start
        page = httpx.get(base + "/", timeout=5)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_bad_model_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffcoder.cli", "serve", "--model", str(tmp_path / "missing")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "diffcoder: error:" in r.stderr and "Traceback" not in r.stderr
