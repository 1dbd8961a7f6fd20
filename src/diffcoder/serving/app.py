"""The HTTP API: OpenAI-compatible completions and chat completions, streaming, health, metrics, playground.

Handlers only validate, tokenize, queue rows on the `Engine` and relay what its worker thread reports; the
model never runs on the event loop. Every error is answered in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcoder.serving.engine import Engine, QueueFull, Row
from diffcoder.serving.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    parse,
    resolve_settings,
    stop_list,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator however the response ends, so a client that went away frees its rows at once
    (its `finally` marks them cancelled) whether the ASGI server reports the disconnect or the send fails."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def create_app(engine: Engine, model_name: str, defaults: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`. `defaults`: decoding defaults (the
    checkpoint's generation_config.json with command-line overrides)."""
    defaults = dict(defaults or {})
    tokenizer = engine.tokenizer
    cfg = engine.model.config
    context = cfg.max_position_embeddings
    metrics = engine.metrics
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="diffcoder", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}; see GET /v1/models, POST /v1/completions, "
                    f"POST /v1/chat/completions", 405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                                       code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    # -- small endpoints ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("diffcoder").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        alive = engine._thread is not None and engine._thread.is_alive()
        return {"status": "ok" if alive else "starting", "model": model_name, "queue_depth": engine.queue_depth(),
                "max_queue": engine.max_queue, "max_batch": engine.max_batch}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.set("queue_depth", engine.queue_depth())
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "diffcoder",
            "max_model_len": context, "block_size": cfg.block_size, "decoding_defaults": defaults}]}

    @app.get("/v1/config")
    async def config() -> dict[str, Any]:
        """Decoding defaults, for the playground's settings form."""
        d = dict(defaults)
        probe = CompletionRequest(model=model_name, prompt="x")
        settings, max_tokens = resolve_settings(probe, defaults, 1, context, cfg.block_size)
        d.update(block_length=settings.block_length, steps_per_block=settings.steps_per_block,
                 max_tokens=max_tokens, remasking=settings.remasking, temperature=settings.temperature,
                 threshold=settings.threshold)
        return {"model": model_name, "max_model_len": context, "defaults": d,
                "chat": bool(getattr(tokenizer, "chat_template", None)),
                "mask_token": tokenizer.convert_ids_to_tokens(engine.mask_id if engine.mask_id is not None
                                                              else cfg.mask_token_id)}

    # -- completions -------------------------------------------------------------------------------------
    def prompts_of(req: CompletionRequest | ChatRequest) -> list[list[int]]:
        if isinstance(req, ChatRequest):
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "this checkpoint's tokenizer has no chat template; use /v1/completions",
                               param="messages")
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return [tokenizer(text, add_special_tokens=False)["input_ids"]]
        p = req.prompt
        if isinstance(p, str):
            texts: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [p]
        else:
            texts = list(p)
        if not texts:
            raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids",
                           param="prompt")
        out = []
        for t in texts:
            ids = tokenizer(t)["input_ids"] if isinstance(t, str) else list(t)
            if not ids:
                raise APIError(400, "the prompt is empty after tokenization; give at least one token",
                               param="prompt")
            bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})",
                               param="prompt")
            out.append(ids)
        return out

    async def handle(request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        endpoint = request.url.path
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object with "
                               f"Content-Type: application/json", code="invalid_json") from None
            req = parse(ChatRequest if chat else CompletionRequest, body)
            if req.model != model_name:
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r} "
                               f"(see GET /v1/models)", param="model", code="model_not_found")
            if not chat and req.echo:
                raise APIError(400, "echo is not supported", param="echo")
            stops = stop_list(req.stop)
            prompts = prompts_of(req)
            if len(prompts) * req.n > engine.max_queue:
                raise APIError(400, f"this request needs {len(prompts) * req.n} rows but the queue holds "
                               f"{engine.max_queue}; send fewer prompts or a smaller n", param="n")
            rows: list[Row] = []
            plans = [resolve_settings(req, defaults, len(p), context, cfg.block_size) for p in prompts]

            def sink_for(i: int):
                def sink(kind: str, payload: Any) -> None:
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))
                    except RuntimeError:  # the event loop is gone (shutdown)
                        pass
                return sink

            for pi, (ids, (settings, max_tokens)) in enumerate(zip(prompts, plans)):
                for j in range(req.n):
                    rows.append(Row(ids, settings, max_tokens, stops, sink_for(pi * req.n + j), tokenizer,
                                    engine.eos_id, events=req.diffusion_events and req.stream,
                                    seed=None if req.seed is None else req.seed + j))
            try:
                engine.submit(rows)
            except QueueFull as exc:
                metrics.add("rejected")
                raise APIError(429, f"the server is busy: {engine.max_queue} rows are already queued; retry after "
                               f"{exc.retry_after} s", type_="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(exc.retry_after)}) from None
        except APIError as err:
            metrics.count_request(endpoint, err.status)
            return error_response(err)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(p) for p in prompts)

        def usage(finals: dict[int, dict]) -> dict[str, int]:
            c = sum(f["completion_tokens"] for f in finals.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

        def cancel_all() -> None:
            for r in rows:
                if not r.finalized:
                    r.cancelled = True
            engine.wake()

        if not req.stream:
            finals: dict[int, dict] = {}
            next_check = time.monotonic() + 0.25
            try:
                while len(finals) < len(rows):
                    try:
                        i, kind, payload = await asyncio.wait_for(queue.get(), timeout=0.25)
                    except TimeoutError:
                        kind = None
                    if time.monotonic() >= next_check:  # deltas may arrive non-stop: check on a clock
                        next_check = time.monotonic() + 0.25
                        if await request.is_disconnected():
                            cancel_all()
                            metrics.count_request(endpoint, 499)
                            return Response(status_code=499)
                    if kind == "final":
                        payload.pop("tail")
                        finals[i] = payload
                    elif kind == "error":
                        cancel_all()
                        err = APIError(payload["status"], payload["message"],
                                       type_="server_error" if payload["status"] >= 500 else "invalid_request_error")
                        metrics.count_request(endpoint, err.status)
                        return error_response(err)
            finally:
                cancel_all()
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": finals[i]["text"]},
                            "logprobs": None, "finish_reason": finals[i]["finish_reason"]} for i in sorted(finals)]
            else:
                choices = [{"index": i, "text": finals[i]["text"], "logprobs": None,
                            "finish_reason": finals[i]["finish_reason"]} for i in sorted(finals)]
            metrics.count_request(endpoint, 200)
            metrics.observe_latency(time.perf_counter() - t0)
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": choices, "usage": usage(finals)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                   "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return sse(out)

        async def events() -> AsyncIterator[str]:
            finals: dict[int, dict] = {}
            status = 200
            try:
                if chat:
                    for i in range(len(rows)):
                        yield chunk(i, None, role=True)
                if req.diffusion_events:
                    for i, r in enumerate(rows):
                        s = r.settings
                        yield sse({"type": "start", "index": i, "prompt_tokens": len(r.prompt_ids),
                                   "gen_length": s.gen_length, "max_tokens": r.max_tokens,
                                   "block_length": s.block_length, "steps_per_block": s.steps_per_block,
                                   "threshold": s.threshold, "remasking": s.remasking,
                                   "temperature": s.temperature}, event="diffusion")
                while len(finals) < len(rows):
                    i, kind, payload = await queue.get()
                    if kind == "delta":
                        yield chunk(i, payload)
                    elif kind == "commit":
                        yield sse({"type": "commit", "index": i, **payload}, event="diffusion")
                    elif kind == "final":
                        finals[i] = payload
                        if req.diffusion_events:
                            yield sse({"type": "done", "index": i, **payload}, event="diffusion")
                        tail = payload.pop("tail")
                        yield chunk(i, (tail or None) if chat else tail, finish=payload["finish_reason"])
                    elif kind == "error":
                        status = payload["status"]
                        yield sse(APIError(status, payload["message"], type_="server_error").body())
                        return
                if include_usage:
                    yield sse({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                               "choices": [], "usage": usage(finals)})
                yield "data: [DONE]\n\n"
            except BaseException:
                status = 499  # the client went away mid-stream
                raise
            finally:
                cancel_all()
                metrics.count_request(endpoint, status)
                if status == 200:
                    metrics.observe_latency(time.perf_counter() - t0)

        return ClosingStreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    return app
