"""Soak `diffcoder serve` with hostile clients on loopback and watch its memory.

Starts the server as a subprocess, sends a fixed greedy request, then N mixed requests from 12 concurrent
clients (the mix of `tests/serving/soak.py`: good requests in every shape, a quarter of them dropped by their
client mid-stream or while waiting; malformed JSON, 64-bit-overflowing seeds, 50,000-deep nesting, lone
surrogates, unsupported fields, prompts of 6 MiB far beyond the context, bodies over the size limit), then the
fixed request again. Reports statuses, wall time and the server's RSS at checkpoints, and plots RSS.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_soak.py --requests 1000 \\
        --out benchmarks/results/serve_soak.json --plot benchmarks/results/serve_soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serving"))
from soak import soak  # noqa: E402  (the soak client shared with the test)


def start(model: str | None, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "diffcoder.cli", "serve", "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd + (["--model", model] if model else []), env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("diffcoder: serving"):
        proc.kill()
        raise SystemExit(f"the server did not start:\n{log.read_text()}")
    return proc, re.search(r"at (http://[^/]+)/", line).group(1)


def plot(rss: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([k for k, _ in rss], [v for _, v in rss], marker="o")
    ax.set_xlabel("requests done")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(0, max(v for _, v in rss) * 1.15)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--every", type=int, default=100, help="read RSS every this many requests")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG of RSS against requests here")
    args = ap.parse_args()

    log = Path(tempfile.mkdtemp()) / "server.log"
    proc, base = start(args.model, args.threads, log)
    try:
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        fixed = {"model": model, "prompt": "def add(a, b):", "max_tokens": 24}
        before = httpx.post(base + "/v1/completions", json=fixed, timeout=300).json()["choices"][0]["text"]
        bar = tqdm(total=args.requests, desc="soak", unit="req")
        result = asyncio.run(soak(base, model, proc.pid, args.requests, concurrency=args.concurrency,
                                  checkpoint_every=args.every, big_body=9 * 2**20, huge_prompt=6 * 2**20,
                                  timeout=300, progress=lambda n: bar.update(1)))
        bar.close()
        after = httpx.post(base + "/v1/completions", json=fixed, timeout=300).json()["choices"][0]["text"]
        health = httpx.get(base + "/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    figures = {"command": " ".join(["python", *sys.argv]), "model": model, "requests": result.sent,
               "seconds": round(result.seconds, 1), "statuses": {str(k): v for k, v in result.statuses.items()},
               "unexpected": result.unexpected[:50], "same_greedy_answer": before == after,
               "engine_restarts": health["engine_restarts"],
               "rss_mib": [(k, round(v, 1)) for k, v in result.rss_mb]}
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    if args.plot:
        plot(result.rss_mb, Path(args.plot), f"{model}: {result.sent} hostile requests in {result.seconds:.0f} s")
    return 0 if not result.unexpected and before == after else 1


if __name__ == "__main__":
    raise SystemExit(main())
