"""The HTTP API: OpenAI-compatible completions and chat completions, streaming, health, metrics, playground.

A request is read and checked (`parsing`), its prompts are tokenized on a small thread pool (`prompts`), its
rows are queued on the `Engine`, and its answer is relayed from the worker thread (`responses`). The model
never runs on the event loop, and every error is answered in the OpenAI error shape. A completions request with
`suffix` is infilling: its prompt is laid out with the checkpoint's FIM tokens and the answer is the middle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcoder.fim import FimTokens
from diffcoder.serving.engine import Engine, EngineDown, QueueFull, Row
from diffcoder.serving.metrics import CONTENT_TYPE
from diffcoder.serving.parsing import parse_request, read_body
from diffcoder.serving.prompts import PromptBuilder
from diffcoder.serving.responses import Job, answer, error_response, stream
from diffcoder.serving.schemas import APIError, ChatRequest, CompletionRequest, request_settings, stop_list
from diffcoder.serving.tokens import TokenText
from diffcoder.settings import REMASKING

log = logging.getLogger("diffcoder.serving")
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
SUPERVISE_EVERY_S = 0.1


class InfillRow(Row):
    """A row of an infilling request: the checkpoint's end-of-middle tokens (`FimTokens.end_ids`, e.g.
    `<|fim_pad|>`) end the middle as EOS does."""

    def __init__(self, *args: Any, end_ids: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.end_ids = frozenset(end_ids)
        if self.eos_id is None and self.end_ids:
            self.eos_id = min(self.end_ids)

    def on_block(self, token_ids: list[int], positions: list[int]) -> None:
        super().on_block([self.eos_id if t in self.end_ids else t for t in token_ids], positions)


class Service:
    """What the routes share: the engine, the model's facts, and how one request becomes a `Job`."""

    def __init__(self, engine: Engine, model_name: str, defaults: dict[str, Any], max_body_bytes: int) -> None:
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.max_body_bytes = max_body_bytes
        self.metrics = engine.metrics
        self.config = engine.model.config
        self.context = self.config.max_position_embeddings
        self.prompts = PromptBuilder(engine.tokenizer, self.config.vocab_size, self.context)
        self.tokens = TokenText(engine.tokenizer)
        self.created = int(time.time())
        # Tokenizing a long prompt takes a while: never on the event loop, and two at a time at most.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diffcoder-tokenize")

    async def handle(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        try:
            job = await self.accept(request, chat, t0)
        except Exception as exc:  # answered here, so the connection stays usable
            err = exc if isinstance(exc, APIError) else APIError(
                500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")
            if not isinstance(exc, APIError):
                log.exception("a request failed")
            self.metrics.count_request(request.url.path, err.status)
            return error_response(err)
        return stream(job) if job.req.stream else await answer(job, request)

    async def accept(self, request: Request, chat: bool, t0: float) -> Job:
        raw = await read_body(request, self.max_body_bytes)
        req = parse_request(raw, chat, self.engine.max_queue, self.context)
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")
        stops = stop_list(req.stop)
        n_rows = self._prompt_count(req) * req.n
        if n_rows > self.engine.max_queue:
            raise APIError(400, f"this request needs {n_rows} rows but the queue holds {self.engine.max_queue}; "
                                f"send fewer prompts or a smaller n", param="n")
        fim = self.prompts.infill_tokens(req)  # before tokenizing: a model without FIM tokens is refused at once
        loop = asyncio.get_running_loop()
        prompts = await loop.run_in_executor(self.pool, self.prompts.build, req)
        queue: asyncio.Queue = asyncio.Queue()
        rows = self._rows(req, prompts, stops, queue, loop, fim)
        self._submit(rows)
        return Job(req, rows, queue, self.engine, self.metrics, self.tokens, self.model_name, request.url.path, t0,
                   prompt_tokens=sum(len(p) for p in prompts))

    @staticmethod
    def _prompt_count(req: CompletionRequest | ChatRequest) -> int:
        if isinstance(req, ChatRequest) or isinstance(req.prompt, str):
            return 1
        return 1 if req.prompt and isinstance(req.prompt[0], int) else len(req.prompt)

    def _rows(self, req, prompts: list[list[int]], stops: list[str], queue: asyncio.Queue, loop,
              fim: FimTokens | None = None) -> list[Row]:
        def sink_for(i: int):
            def sink(kind: str, payload: Any) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            return sink

        rows = []
        kind, extra = (Row, {}) if fim is None else (InfillRow, {"end_ids": fim.end_ids})
        seed = req.seed if req.seed is not None else self.defaults.get("seed")  # the server's --seed
        for pi, ids in enumerate(prompts):
            settings = request_settings(req, self.defaults, len(ids), self.context)
            for j in range(req.n):
                rows.append(kind(ids, settings, settings.new_tokens, stops, sink_for(pi * req.n + j),
                                 self.engine.tokenizer, self.engine.eos_id, events=req.diffusion_events and req.stream,
                                 seed=None if seed is None else seed + j, logprobs=req.top_logprobs_wanted,
                                 **extra))
        return rows

    def _submit(self, rows: list[Row]) -> None:
        try:
            self.engine.submit(rows)
        except QueueFull as exc:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.engine.max_queue} rows are already queued; retry after "
                                f"{exc.retry_after} s", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineDown as exc:
            raise APIError(503, f"the decoder is down ({exc}); the server is shutting down", type_="server_error",
                           code="engine_down") from None

    def health(self) -> JSONResponse:
        e = self.engine
        body = {"status": "ok", "model": self.model_name, "queue_depth": e.queue_depth(), "max_queue": e.max_queue,
                "max_batch": e.max_batch, "engine_restarts": e.restarts, "last_engine_error": e.death}
        if e.alive:
            return JSONResponse(body)
        body["status"] = "down" if e.down else "engine_dead"
        return JSONResponse(body, status_code=503)

    def decoding_config(self) -> dict[str, Any]:
        """Decoding defaults, for the playground's settings form."""
        d = dict(self.defaults)
        probe = CompletionRequest(model=self.model_name, prompt="x")
        settings = request_settings(probe, self.defaults, 1, self.context)
        d.update(block_length=settings.block_length, steps_per_block=settings.steps_per_block,
                 max_tokens=settings.new_tokens, remasking=settings.remasking, temperature=settings.temperature,
                 threshold=settings.threshold)
        tok, mask = self.engine.tokenizer, self.engine.mask_id
        return {"model": self.model_name, "max_model_len": self.context, "defaults": d, "remasking": list(REMASKING),
                "chat": self.prompts.has_chat_template,
                "infill": self.prompts.fim.to_dict() if self.prompts.fim is not None else None,
                "mask_token": tok.convert_ids_to_tokens(mask if mask is not None else self.config.mask_token_id)}


async def supervise(engine: Engine, on_fatal: Callable[[str], None] | None) -> None:
    """Restart a dead decoder thread; once no restarts are left, ask the server to exit (non-zero)."""
    while engine.supervise():
        await asyncio.sleep(SUPERVISE_EVERY_S)
    log.critical("the decoder thread died %d times (last: %s); shutting down", engine.restarts + 1, engine.death)
    if on_fatal is not None:
        on_fatal(f"the decoder thread died {engine.restarts + 1} times (last: {engine.death})")


def create_app(engine: Engine, model_name: str, defaults: dict[str, Any] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`. `defaults`: decoding defaults (the
    checkpoint's, with command-line overrides: `schemas.server_defaults`; none: the model config's block size and
    shift). `on_fatal(reason)` is called when the
    decoder cannot be kept running (the serve command then exits non-zero)."""
    cfg = engine.model.config
    defaults = {"block_length": cfg.block_size, "shift": cfg.shift, **(defaults or {})}
    service = Service(engine, model_name, defaults, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        supervisor = asyncio.create_task(supervise(engine, on_fatal))
        try:
            yield
        finally:
            supervisor.cancel()
            engine.stop()
            service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="diffcoder", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    _error_handlers(app)
    _info_routes(app, service)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.handle(request, chat=True)

    return app


def _error_handlers(app: FastAPI) -> None:
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


def _info_routes(app: FastAPI, service: Service) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("diffcoder").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        return service.health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        service.metrics.queue_depth.set(service.engine.queue_depth())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.created, "owned_by": "diffcoder",
            "max_model_len": service.context, "block_size": service.config.block_size,
            "decoding_defaults": service.defaults}]}

    @app.get("/v1/config")
    async def config() -> dict[str, Any]:
        return service.decoding_config()

