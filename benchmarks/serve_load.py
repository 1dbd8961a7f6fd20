"""Load test of `diffcoder serve` from a second process on loopback: what batching buys.

For each server configuration (batching on: --max-batch 16; off: --max-batch 1) it starts the server as a
subprocess, then runs a closed loop at concurrency 1, 4 and 16 (each worker sends the next request when its
last one is answered) for a bounded number of requests and seconds, and reports requests/s, generated
tokens/s and p50/p95 latency.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_load.py --max-tokens 32 \
        --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a Python function that returns the sum of a list of numbers.",
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the largest element of a list.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that removes duplicates from a list.",
    "Write a Python function that checks whether a string is a palindrome.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "diffcoder.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "256", "--log-level", "warning"] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).json().get("status") == "ok":
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start in 300 s")
        time.sleep(0.5)


async def closed_loop(base: str, model: str, concurrency: int, n_requests: int, max_seconds: float,
                      max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    issued = 0
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, tokens
        while issued < n_requests and time.perf_counter() - t0 < max_seconds:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(lat), "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
        "p50_s": round(statistics.median(lat), 2),
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2), "generated_tokens": tokens,
    }


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-worker", type=int, default=1,
                    help="requests per level = max(3, concurrency * this)")
    ap.add_argument("--max-seconds", type=float, default=120, help="stop issuing requests after this per level")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads in the server")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    results = []
    for label, max_batch in (("batching (--max-batch 16)", 16), ("no batching (--max-batch 1)", 1)):
        proc, base = start_server(args.model, max_batch, args.threads)
        try:
            model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            # warm up (first forward allocates; not measured)
            asyncio.run(closed_loop(base, model, 1, 1, 600, 4))
            for c in args.concurrency:
                n = max(3, c * args.requests_per_worker)
                f0, g0 = metric(base, "diffcoder_forwards_total"), metric(base, "diffcoder_generated_tokens_total")
                r = asyncio.run(closed_loop(base, model, c, n, args.max_seconds, args.max_tokens))
                f1, g1 = metric(base, "diffcoder_forwards_total"), metric(base, "diffcoder_generated_tokens_total")
                r.update(config=label, max_batch=max_batch,
                         tokens_per_forward=round((g1 - g0) / max(f1 - f0, 1), 2))
                results.append(r)
                print(json.dumps(r), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print("\n| config | concurrency | requests | req/s | gen tok/s | p50 s | p95 s | tokens/forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | "
              f"{r['tokens_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['tokens_per_forward']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(["python", *sys.argv]), "max_tokens": args.max_tokens,
                "server_threads": args.threads, "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "results": results}
        Path(args.out).write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
