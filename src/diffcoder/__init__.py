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


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a checkpoint (HF directory or .gguf file) as `(model, tokenizer)`; tokenizer may be None.

    The model's `generate` takes the official Stable-DiffCoder call unchanged (see diffcoder.decoding)."""
    from diffcoder.checkpoint import build_model, load_hf_dir
    from diffcoder.gguf_io import load_gguf_tokenizer, read_gguf

    dtype = resolve_dtype(dtype)
    path = Path(path)
    if path.suffix == ".gguf":
        cfg, state = read_gguf(path)
        model = build_model(cfg, state, dtype, device)
        model.generation_defaults = {}
        return model, load_gguf_tokenizer(path)
    model, tokenizer = load_hf_dir(path, dtype, device)
    adapter = path / "adapter_config.json"
    if adapter.is_file():  # LoRA adapters saved by training name their base checkpoint
        from diffcoder.training.lora import load_adapter  # type: ignore[import-not-found]

        model = load_adapter(model, path)
    return model, tokenizer


__all__ = ["load", "resolve_dtype", "__version__"]
