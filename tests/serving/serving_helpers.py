"""Helpers for the serving tests: real uvicorn servers on loopback and the reference decoder."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from diffcoder.decoding import generate

CONTEXT = 4096  # long enough that a request can outlive a client (disconnect test)
# The gap the infilling tests fill, and the end-of-middle token their checkpoint has (see conftest.fim_checkpoint).
FIM_PREFIX = "def add(a, b):\n    "
FIM_SUFFIX = "\n\nprint(add(1, 2))\n"
FIM_PAD = "<|fim_pad|>"


POISON = [7, 7, 7, 7]  # a prompt the decoder patched by `poison_decoder` fails on


def poison_decoder(monkeypatch, make_error: Callable[[], BaseException]) -> None:
    """The server's decoder raises `make_error()` for any batch holding the POISON prompt and decodes the rest."""
    import diffcoder.serving.engine as engine_module

    real = engine_module.generate

    def generate_or_fail(model, prompts, **kw):
        if any(list(p) == POISON for p in prompts):
            raise make_error()
        return real(model, prompts, **kw)

    monkeypatch.setattr(engine_module, "generate", generate_or_fail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server in a thread on 127.0.0.1 (stopped by `close`)."""

    def __init__(self, checkpoint: Path, **kwargs) -> None:
        import uvicorn

        from diffcoder.serving import build_app

        self.app, self.engine = build_app(str(checkpoint), **kwargs)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model_name = checkpoint.name
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.base + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def expected_answer(reference, prompt_ids: list[int], max_tokens: int, steps_per_block: int = 4,
                    block_length: int = 4, stop: list[str] | None = None) -> dict:
    """What the API must answer: decode this prompt alone (temperature 0), cut at EOS, max_tokens and stop."""
    model, tok = reference
    n_blocks = -(-max_tokens // block_length)
    res = generate(model, [prompt_ids], steps=steps_per_block * n_blocks, block_length=block_length,
                   max_new_tokens=max_tokens, eos_id=tok.eos_token_id, return_result=True)
    ids = res.generated[0].tolist()
    reason = "length"
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
        reason = "stop"
    text = tok.decode(ids, skip_special_tokens=True)
    hits = [text.index(s) for s in stop or [] if s in text]
    if hits:
        text, reason = text[: min(hits)], "stop"
    return {"ids": ids, "text": text, "finish_reason": reason}


def chat_prompt_ids(reference, messages: list[dict]) -> list[int]:
    tok = reference[1]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def read_sse(response) -> list[tuple[str | None, str]]:
    """(event name, data) for each server-sent event of an httpx streaming response."""
    events, event, data = [], None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        events.append((event, "\n".join(data)))
    return events


def metric_value(base: str, series: str) -> float:
    """One sample of GET /metrics, by its full series name (labels included)."""
    import httpx

    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.rsplit(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(series)
