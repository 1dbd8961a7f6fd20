"""An OpenAI-compatible HTTP server with batching and streaming, and a playground that shows the denoising."""

from typing import Any

__all__ = ["create_app", "DecodeSettings", "Engine", "Metrics", "Row", "build_app"]

# Imported on first use (PEP 562), so `diffcoder --help` and the other areas' commands never load fastapi.
_LAZY = {"create_app": "app", "DecodeSettings": "engine", "Engine": "engine", "Row": "engine", "Metrics": "metrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"diffcoder.serving.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'diffcoder.serving' has no attribute {name!r}")


def default_served_name(spec: str) -> str:
    """The model id clients send by default: the name of the directory or file the user gave (a training run's own
    name, not its final/), or for a built-in name the folder it is built into."""
    from pathlib import Path

    given = Path(spec).expanduser()
    if given.exists():
        return given.resolve().name.removesuffix(".gguf")
    from diffcoder.loading import resolve_model

    return resolve_model(spec).name.removesuffix(".gguf")


def build_app(model_path: str, max_batch: int = 8, max_queue: int = 64, dtype: str | None = None,
              served_name: str | None = None, mask_id: int | None = None, overrides: dict | None = None,
              batch_wait: float = 0.02, device: str = "cpu", max_body_bytes: int | None = None,
              on_fatal=None, max_restarts: int = 3):
    """Load a checkpoint, check the decoding defaults against it, and return (app, engine) ready for uvicorn.

    `overrides`: decoding values from the command line (DecodeSettings keys, None: not given), over the
    checkpoint's defaults."""
    from diffcoder.errors import ConfigError
    from diffcoder.loading import load
    from diffcoder.serving.schemas import server_defaults

    loaded = load(model_path, dtype=dtype, device=device)
    model, tokenizer = loaded
    if tokenizer is None:
        raise ConfigError(f"{model_path} has no tokenizer files; the server needs one to read prompts "
                          f"(save the checkpoint with its tokenizer)")
    if mask_id is None and model.config.mask_token_id is None:
        raise ConfigError(f"{model_path} has no mask token, so it cannot be decoded by diffusion; run "
                          f"`diffcoder convert` on it first, or pass --mask-id with an unused token id")
    if mask_id is not None and not 0 <= mask_id < model.config.vocab_size:
        raise ConfigError(f"--mask-id {mask_id} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    defaults = server_defaults(loaded.defaults, overrides or {}, model.config.max_position_embeddings)
    from diffcoder.serving.app import create_app
    from diffcoder.serving.engine import Engine

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, mask_id=mask_id,
                    batch_wait=batch_wait, max_restarts=max_restarts)
    name = served_name or default_served_name(model_path)
    if max_body_bytes is None:
        from diffcoder.serving.app import DEFAULT_MAX_BODY_BYTES as max_body_bytes
    return create_app(engine, name, defaults, max_body_bytes=max_body_bytes, on_fatal=on_fatal), engine
