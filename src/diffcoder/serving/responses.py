"""Answers: an accepted request (a `Job`: its rows on the engine and the queue their output arrives on) turned
into an OpenAI response, whole or streamed as server-sent events, with logprobs in the OpenAI shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from diffcoder.serving.engine import Engine, Row, TokenScore
from diffcoder.serving.metrics import Metrics
from diffcoder.serving.schemas import APIError, ChatRequest, CompletionRequest
from diffcoder.serving.tokens import TokenText

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_CHECK_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def error_response(err: APIError) -> Response:
    # ASCII JSON: a message quoting the client's text stays encodable whatever that text holds
    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers,
                    media_type="application/json")


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Job:
    """One accepted request."""

    req: CompletionRequest | ChatRequest
    rows: list[Row]
    queue: asyncio.Queue
    engine: Engine
    metrics: Metrics
    tokens: TokenText
    model_name: str
    endpoint: str
    t0: float
    prompt_tokens: int
    chat: bool = field(init=False)
    rid: str = field(init=False)

    def __post_init__(self) -> None:
        self.chat = isinstance(self.req, ChatRequest)
        self.rid = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def cancel(self) -> None:
        """Free the rows of a request that is over (answered, failed or abandoned by its client)."""
        for r in self.rows:
            if not r.finalized:
                r.cancelled = True
        self.engine.wake()

    def usage(self, finals: dict[int, dict]) -> dict[str, int]:
        c = sum(f["completion_tokens"] for f in finals.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c, "total_tokens": self.prompt_tokens + c}

    def logprobs(self, scores: list[TokenScore] | None, offset: int = 0) -> dict[str, Any] | None:
        if scores is None:
            return None
        return self.tokens.chat_logprobs(scores) if self.chat else self.tokens.completion_logprobs(scores, offset)

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": int(time.time()), "model": self.model_name}

    def done(self, status: int) -> None:
        self.metrics.count_request(self.endpoint, status)
        if status == 200:
            self.metrics.observe_latency(time.perf_counter() - self.t0)


def row_error(payload: dict[str, Any]) -> APIError:
    status = payload["status"]
    return APIError(status, payload["message"], type_="server_error" if status >= 500 else "invalid_request_error")


# -- whole answers -------------------------------------------------------------------------------------------
async def answer(job: Job, request: Request) -> Response:
    """Wait for every row, then answer in one JSON body (499 if the client went away meanwhile)."""
    finals: dict[int, dict] = {}
    next_check = time.monotonic() + DISCONNECT_CHECK_S
    try:
        while len(finals) < len(job.rows):
            try:
                i, kind, payload = await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                kind = None
            if time.monotonic() >= next_check:  # deltas may arrive non-stop: check on a clock
                next_check = time.monotonic() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    job.done(499)
                    return Response(status_code=499)
            if kind == "final":
                finals[i] = payload
            elif kind == "error":
                err = row_error(payload)
                job.done(err.status)
                return error_response(err)
    finally:
        job.cancel()
    job.done(200)
    return JSONResponse({**job.head("chat.completion" if job.chat else "text_completion"),
                         "choices": [choice(job, i, finals[i]) for i in sorted(finals)], "usage": job.usage(finals)})


def choice(job: Job, i: int, final: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"index": i}
    if job.chat:
        out["message"] = {"role": "assistant", "content": final["text"]}
    else:
        out["text"] = final["text"]
    out.update(logprobs=job.logprobs(final["logprobs"]), finish_reason=final["finish_reason"])
    return out


# -- streamed answers ----------------------------------------------------------------------------------------
class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator however the response ends, so a client that went away frees its rows at once
    (its `finally` cancels them) whether the ASGI server reports the disconnect or the send fails."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def stream(job: Job) -> StreamingResponse:
    return ClosingStreamingResponse(_events(job), media_type="text/event-stream", headers=SSE_HEADERS)


class _Chunks:
    """Builds the stream's chunks (OpenAI `*.chunk` objects) for one job."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.obj = "chat.completion.chunk" if job.chat else "text_completion"
        opts = job.req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.offsets = [0] * len(job.rows)  # text_offset of each choice's next token (completions logprobs)

    def text(self, i: int, text: str | None, scores: list[TokenScore] | None = None, finish: str | None = None,
             role: bool = False) -> str:
        logprobs = self.job.logprobs(scores, self.offsets[i]) if scores is not None else None
        if logprobs is not None and not self.job.chat:
            self.offsets[i] += sum(len(t) for t in logprobs["tokens"])
        if self.job.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        out = {**self.job.head(self.obj), "choices": [c]}
        if self.include_usage:
            out["usage"] = None
        return sse(out)

    def usage(self, finals: dict[int, dict]) -> str:
        return sse({**self.job.head(self.obj), "choices": [], "usage": self.job.usage(finals)})


def _start_event(i: int, r: Row) -> str:
    s = r.settings
    return sse({"type": "start", "index": i, "prompt_tokens": len(r.prompt_ids), "gen_length": s.canvas_length,
                "max_tokens": r.max_tokens, "block_length": s.block_length, "steps_per_block": s.steps_per_block,
                "threshold": s.threshold, "remasking": s.remasking, "temperature": s.temperature}, event="diffusion")


async def _events(job: Job) -> AsyncIterator[str]:
    chunks, events = _Chunks(job), job.req.diffusion_events
    finals: dict[int, dict] = {}
    status = 200
    try:
        if job.chat:
            for i in range(len(job.rows)):
                yield chunks.text(i, None, role=True)
        if events:
            for i, r in enumerate(job.rows):
                yield _start_event(i, r)
        while len(finals) < len(job.rows):
            i, kind, payload = await job.queue.get()
            if kind == "delta":
                yield chunks.text(i, payload["text"], payload["logprobs"])
            elif kind == "commit" and events:
                yield sse({"type": "commit", "index": i, **payload}, event="diffusion")
            elif kind == "final":
                finals[i] = payload
                if events:
                    yield sse({"type": "done", "index": i, **{k: payload[k] for k in (
                        "text", "finish_reason", "completion_tokens", "prompt_tokens")}}, event="diffusion")
                tail = payload["tail"]
                yield chunks.text(i, (tail or None) if job.chat else tail, payload["tail_logprobs"],
                                  finish=payload["finish_reason"])
            elif kind == "error":
                status = payload["status"]
                yield sse(row_error(payload).body())
                return
        if chunks.include_usage:
            yield chunks.usage(finals)
        yield "data: [DONE]\n\n"
    except BaseException:
        status = 499  # the client went away mid-stream
        raise
    finally:
        job.cancel()
        job.done(status)
