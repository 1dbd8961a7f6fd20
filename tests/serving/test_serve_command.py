"""`diffcoder serve` as a real subprocess."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_serve_command(checkpoint):
    """The "serving at" line comes only once the port answers (no retry loop here; --port 0 names the port it
    got); then the API, the command-line decoding defaults and the playground."""
    proc = subprocess.Popen([sys.executable, "-m", "diffcoder.cli", "serve", "--model", str(checkpoint),
                             "--port", "0", "--max-batch", "2", "--max-queue", "4", "--served-model-name",
                             "coder", "--steps-per-block", "2", "--max-tokens", "8", "--log-level", "warning"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("diffcoder: serving "), line + proc.stderr.read()
        base = re.search(r"at (http://127\.0\.0\.1:\d+)/", line).group(1)
        assert httpx.get(base + "/health", timeout=5).json()["status"] == "ok"
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


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcoder.cli", "serve", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("flags,words", [
    (["--block-length", "4", "--steps-per-block", "9"], "--steps-per-block 9"),
    (["--steps-per-block", "9"], "--steps-per-block = 9"),  # against the checkpoint's block of 4
    (["--max-new-tokens", "5000"], "--max-new-tokens = 5000"),  # beyond the 4096-token context
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--port", "70000"], "--port 70000"),
    (["--max-body-mb", "0"], "--max-body-mb 0"),
    (["--mask-id", "100000"], "--mask-id 100000"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
])
def test_bad_flags_fail_at_start_in_one_line(checkpoint, flags, words, capsys):
    from diffcoder.cli import main

    assert main(["serve", "--model", str(checkpoint), "--port", "0", *flags]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("diffcoder: error: ") and words in out.err, out.err
    assert "serving" not in out.out


def test_bad_flags_fail_before_serving_as_a_process(checkpoint):
    r = serve("--model", str(checkpoint), "--block-length", "4", "--steps-per-block", "9")
    assert r.returncode == 2
    assert r.stderr == "diffcoder: error: --steps-per-block 9: must be at most --block-length (4): more steps " \
                       "than slots commit nothing\n"
    assert r.stdout == ""


def test_port_in_use_is_one_clear_error(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve("--model", str(checkpoint), "--port", str(port))
    assert r.returncode == 2
    assert r.stderr == f"diffcoder: error: port {port} on 127.0.0.1 is already in use (another server is " \
                       f"listening there); stop it or choose another --port\n"
    assert "serving" not in r.stdout


CRASHING_SERVE = """
import sys
import diffcoder.serving.engine as engine
real = engine.generate
def generate(model, prompts, **kw):
    if any(list(p) == [7, 7, 7, 7] for p in prompts):
        raise SystemExit("simulated death of the decoder thread")
    return real(model, prompts, **kw)
engine.generate = generate
from diffcoder.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_exits_non_zero_when_the_decoder_keeps_dying(checkpoint):
    """A real `serve` process whose decoder thread dies on one prompt: three restarts, then exit status 1."""
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SERVE, "serve", "--model", str(checkpoint), "--port", "0",
                             "--log-level", "critical"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        base = re.search(r"at (http://127\.0\.0\.1:\d+)/", proc.stdout.readline()).group(1)
        statuses = []
        for _ in range(4):
            r = httpx.post(base + "/v1/completions", json={"model": checkpoint.name, "prompt": [7, 7, 7, 7],
                                                           "max_tokens": 4}, timeout=30)
            statuses.append(r.status_code)
            time.sleep(0.3)  # the supervisor restarts the thread within 0.1 s
        assert statuses == [503] * 4
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "diffcoder: error: the decoder thread died 4 times (last: SystemExit: simulated death" in err, err
