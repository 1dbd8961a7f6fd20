"""A hostile-client soak run against a live server: mixed good and bad requests, random disconnects.

Used by `test_soak.py` (a tiny model, about a thousand requests) and by `benchmarks/serve_soak.py` (any model,
as many requests as asked). Every request has a kind; every answer must carry a status that kind allows, and
no request may hang. The server's resident memory is read from /proc at checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GOOD = {200, 429}  # a full queue is a fair answer to a good request under load


@dataclass
class Plan:
    kind: str
    path: str
    body: bytes
    allowed: set[int]
    disconnect: str | None = None  # "stream": close after the first chunk; "wait": give up while waiting


@dataclass
class SoakResult:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (requests done, RSS in MiB)
    seconds: float = 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def plans(model: str, rng: random.Random, n: int, big_body: int, huge_prompt: int = 0) -> list[Plan]:
    """n requests: roughly half good (a quarter of those dropped by their client), half bad."""
    prompts = ["def add(a, b):", "for i in range(10):\n", "class Stack:\n    def", "import os", "x = ["]

    def good(rng: random.Random) -> Plan:
        chat = rng.random() < 0.4
        body: dict = {"model": model, "max_tokens": rng.randint(1, 12), "stream": rng.random() < 0.5}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(prompts)}]
        else:
            body["prompt"] = rng.choice(prompts) if rng.random() < 0.8 else rng.sample(prompts, 2)
        if rng.random() < 0.3:
            body.update(temperature=rng.choice([0.5, 1.0, 1.5]), seed=rng.randrange(2**63),
                        top_p=rng.choice([None, 0.9]), top_k=rng.choice([None, 5]))
        if rng.random() < 0.2:
            body["n"] = 2
        if rng.random() < 0.2:
            body["stop"] = ["\n"]
        if rng.random() < 0.2:
            body["logprobs"] = True if chat else 2
        if rng.random() < 0.1:
            body.update(block_length=4, steps_per_block=2)
        disconnect = None
        if rng.random() < 0.25:
            disconnect = "stream" if body["stream"] else "wait"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return Plan("good", path, json.dumps(body).encode(), GOOD, disconnect)

    deep = 50_000
    bad: list[tuple[str, str, bytes, set[int]]] = [
        ("malformed", "/v1/completions", b'{"model": ', {400}),
        ("not an object", "/v1/completions", b"[1, 2, 3]", {400}),
        ("seed 2**64", "/v1/completions", json.dumps({"model": model, "prompt": "x", "max_tokens": 4,
                                                      "temperature": 0.7, "seed": 2**64}).encode(), {400}),
        ("deep nesting", "/v1/completions",
         b'{"model": "' + model.encode() + b'", "prompt": ' + b"[" * deep + b"]" * deep + b"}", {400}),
        ("lone surrogate prompt", "/v1/completions",
         b'{"model": "' + model.encode() + b'", "prompt": "a\\ud800b", "max_tokens": 4}', {400}),
        ("lone surrogate chat", "/v1/chat/completions",
         b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "\\udfff"}]}', {400}),
        ("max_tokens huge", "/v1/completions",
         json.dumps({"model": model, "prompt": "x", "max_tokens": 10**9}).encode(), {400}),
        ("unknown model", "/v1/completions", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), {404}),
        ("wrong type", "/v1/completions", json.dumps({"model": model, "prompt": "x", "n": "2"}).encode(), {400}),
        ("NaN temperature", "/v1/completions",
         b'{"model": "' + model.encode() + b'", "prompt": "x", "temperature": NaN}', {400}),
        ("tools", "/v1/chat/completions", json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}],
                                                      "tools": [{"type": "function"}]}).encode(), {400}),
        ("token id outside vocab", "/v1/completions",
         json.dumps({"model": model, "prompt": [1, 10**30]}).encode(), {400}),
        ("bad steps", "/v1/completions",
         json.dumps({"model": model, "prompt": "x", "steps_per_block": 99}).encode(), {400}),
    ]
    text = "x = 1\n" * (huge_prompt // 6)
    huge = [Plan("huge prompt", "/v1/completions", json.dumps({"model": model, "prompt": text}).encode(), {400}),
            Plan("huge prompt", "/v1/chat/completions", json.dumps(
                {"model": model, "messages": [{"role": "user", "content": text}]}).encode(), {400})]
    too_large = Plan("too large", "/v1/completions", b'{"model": "m", "prompt": "' + b"a" * big_body + b'"}', {413})
    out = []
    for i in range(n):
        if i % 97 == 0 and big_body:  # now and then a body over the size limit
            out.append(too_large)
        elif i % 50 == 25 and huge_prompt:  # a prompt far beyond the context, under the size limit
            out.append(huge[i % 2])
        elif rng.random() < 0.5:
            out.append(good(rng))
        else:
            kind, path, body, allowed = rng.choice(bad)
            out.append(Plan(kind, path, body, allowed))
    return out


async def _send(client: httpx.AsyncClient, base: str, plan: Plan, rng: random.Random) -> int | None:
    """The status code, or None for a request its client dropped on purpose."""
    headers = {"content-type": "application/json"}
    if plan.disconnect == "stream":
        async with client.stream("POST", base + plan.path, content=plan.body, headers=headers) as r:
            async for _ in r.aiter_lines():
                break  # leaving the block closes the connection mid-stream
            return None if r.status_code == 200 else r.status_code
    if plan.disconnect == "wait":
        try:
            r = await asyncio.wait_for(client.post(base + plan.path, content=plan.body, headers=headers),
                                       timeout=rng.uniform(0.0, 0.05))
            return r.status_code
        except TimeoutError:
            return None
    r = await client.post(base + plan.path, content=plan.body, headers=headers)
    if plan.allowed != GOOD and r.status_code < 500:
        err = r.json().get("error", {})
        assert err.get("message"), f"{plan.kind}: no error message in {r.text[:200]}"
    elif r.status_code == 200 and b'"stream": true' not in plan.body:
        assert r.json()["choices"], r.text[:200]
    return r.status_code


async def soak(base: str, model: str, pid: int, n: int, concurrency: int = 12, seed: int = 0,
               checkpoint_every: int = 200, big_body: int = 0, huge_prompt: int = 0, timeout: float = 60.0,
               progress: Callable[[int], None] | None = None) -> SoakResult:
    """Send n planned requests with `concurrency` workers; record statuses and the server's RSS."""
    rng = random.Random(seed)
    todo = plans(model, rng, n, big_body, huge_prompt)
    result = SoakResult()
    result.rss_mb.append((0, rss_mb(pid)))
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(wid: int) -> None:
            wrng = random.Random(seed * 1000 + wid)
            while todo:
                plan = todo.pop()
                try:
                    status = await _send(client, base, plan, wrng)
                except (httpx.TimeoutException, AssertionError) as exc:
                    result.unexpected.append(f"{plan.kind}: {type(exc).__name__}: {exc}")
                    status = -1
                except httpx.TransportError as exc:
                    status = None  # the server may close a connection whose body it refused (413)
                    if plan.kind != "too large":
                        result.unexpected.append(f"{plan.kind}: connection error {plan.disconnect} {exc!r}")
                result.statuses[status] += 1
                if status is not None and status not in plan.allowed:
                    result.unexpected.append(f"{plan.kind}: status {status}")
                result.sent += 1
                if progress is not None:
                    progress(result.sent)
                if result.sent % checkpoint_every == 0:
                    result.rss_mb.append((result.sent, rss_mb(pid)))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.seconds = time.perf_counter() - t0
    result.rss_mb.append((result.sent, rss_mb(pid)))
    return result
