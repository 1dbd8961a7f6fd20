"""`diffcoder serve`: run the OpenAI-compatible server and the playground."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with a web playground",
        description="Serve a checkpoint: GET /v1/models, POST /v1/completions, POST /v1/chat/completions "
                    "(streaming as server-sent events), GET /health, GET /metrics, and the playground at GET /.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file or built-in name (default: the embedded default, smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="most rows decoded together (1 disables batching)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most rows waiting for a batch; beyond it requests get 429 with Retry-After")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="an idle decoder waits this long for more requests before starting a batch (default 20)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float64")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--mask-id", type=int, default=None,
                   help="mask token id for a checkpoint without one (an unused id; for experiments only)")
    g = p.add_argument_group("decoding defaults (override the checkpoint's generation_config.json)")
    g.add_argument("--max-tokens", type=int, default=None, help="max_tokens when a request gives none")
    g.add_argument("--block-length", type=int, default=None)
    g.add_argument("--steps-per-block", type=int, default=None,
                   help="denoising steps per block (block_length = one token per step)")
    g.add_argument("--threshold", type=float, default=None, help="confidence threshold for parallel commits")
    g.add_argument("--remasking", choices=["low_confidence", "random"], default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from diffcoder.pull import resolve_model
    from diffcoder.serving import build_app

    model = str(resolve_model(args.model))
    overrides = {"max_tokens": args.max_tokens, "block_length": args.block_length,
                 "steps_per_block": args.steps_per_block, "threshold": args.threshold,
                 "remasking": args.remasking, "temperature": args.temperature}
    app, engine = build_app(model, max_batch=args.max_batch, max_queue=args.max_queue, dtype=args.dtype,
                            served_name=args.served_model_name, mask_id=args.mask_id, overrides=overrides,
                            batch_wait=args.batch_wait_ms / 1000, device=args.device)
    print(f"diffcoder: serving {model} at http://{args.host}:{args.port}/ (playground at /, API under /v1; "
          f"max batch {engine.max_batch}, max queue {engine.max_queue})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
