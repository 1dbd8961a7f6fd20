"""`diffcoder serve`: run the OpenAI-compatible server and the playground.

Start-up fails fast and in one line: bad flags first, then a port that cannot be bound (before the model is
loaded), then decoding defaults the checkpoint cannot use. The "serving at" line is printed only once the
server accepts connections; if the decoder thread cannot be kept alive the command exits with status 1.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys

from diffcoder.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from diffcoder.commands import add_decoding_flags

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with a web playground",
        description="Serve a checkpoint: GET /v1/models, POST /v1/completions, POST /v1/chat/completions "
                    "(streaming as server-sent events), GET /health, GET /metrics, and the playground at GET /.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file or built-in name (default: the embedded default, smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port; default 8000)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most rows decoded together (1 disables batching; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most rows waiting for a batch; beyond it requests get 429 with Retry-After (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="an idle decoder waits this long for more requests before starting a batch (default 20)")
    p.add_argument("--max-body-mb", type=float, default=8.0,
                   help="largest request body in MiB; larger ones get 413 (default 8)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float64")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...; default: cpu)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--mask-id", type=int, default=None,
                   help="mask token id for a checkpoint without one (an unused id; for experiments only; default: the "
                        "checkpoint's)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    add_decoding_flags(p, "serve", eos_flag=False, gen_length_flag=False)
    p.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> None:
    """Range checks that need no model; each refusal names its flag and the values it takes."""
    def need(ok: bool, flag: str, value, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{flag} {value}: {rule}")

    need(0 <= args.port <= 65535, "--port", args.port, "must be from 0 to 65535")
    need(args.max_batch >= 1, "--max-batch", args.max_batch, "must be at least 1")
    need(args.max_queue >= 1, "--max-queue", args.max_queue, "must be at least 1")
    need(math.isfinite(args.batch_wait_ms) and args.batch_wait_ms >= 0, "--batch-wait-ms", args.batch_wait_ms,
         "must be 0 or more")
    need(math.isfinite(args.max_body_mb) and args.max_body_mb > 0, "--max-body-mb", args.max_body_mb,
         "must be more than 0")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--block-length", args.block_length),
                        ("--steps", args.steps), ("--steps-per-block", args.steps_per_block)):
        need(value is None or value >= 1, flag, value, "must be at least 1")
    if args.steps_per_block is not None and args.block_length is not None:
        need(args.steps_per_block <= args.block_length, "--steps-per-block", args.steps_per_block,
             f"must be at most --block-length ({args.block_length}): more steps than slots commit nothing")
    need(args.threshold in (None, "none") or 0 < args.threshold <= 1, "--threshold", args.threshold,
         "must be in (0, 1], or none")
    # the API takes temperatures up to 2 (as OpenAI does): a default beyond it would be one no request could give
    need(args.temperature is None or 0 <= args.temperature <= 2, "--temperature", args.temperature,
         "must be from 0 (greedy) to 2")
    need(args.mask_id is None or args.mask_id >= 0, "--mask-id", args.mask_id, "must be a token id (0 or more)")


def check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no usable CUDA GPU (or torch was built "
                              f"without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ConfigError(f"--device {name}: {device.type} is not available here; use --device cpu")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server is listening there); "
                              f"stop it or choose another --port") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on port {port}; choose a --port of 1024 or more") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from diffcoder.commands import user_decoding_values
    from diffcoder.loading import resolve_model
    from diffcoder.serving import build_app, default_served_name

    check_flags(args)
    check_device(args.device)
    sock = bind(args.host, args.port)
    fatal: list[str] = []
    try:
        model = str(resolve_model(args.model))  # errors before anything is loaded
        name = args.served_model_name or default_served_name(args.model or model)
        overrides = user_decoding_values(args)

        def on_fatal(reason: str) -> None:
            fatal.append(reason)
            server.should_exit = True

        app, engine = build_app(model, max_batch=args.max_batch, max_queue=args.max_queue, dtype=args.dtype,
                                served_name=name, mask_id=args.mask_id, overrides=overrides,
                                batch_wait=args.batch_wait_ms / 1000, device=args.device,
                                max_body_bytes=int(args.max_body_mb * 2**20), on_fatal=on_fatal)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        line = (f"diffcoder: serving {model} at {url} (playground at /, API under /v1; max batch {engine.max_batch}, "
                f"max queue {engine.max_queue})")
        server = announcing_server(uvicorn.Config(app, log_level=args.log_level), line)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        print(f"diffcoder: error: {fatal[0]}; the server stopped", file=sys.stderr)
        return 1
    return 0


def announcing_server(config, line: str):
    """uvicorn's Server, printing our "serving at" line once it accepts connections (never before)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(line, flush=True)

    return Server(config)
