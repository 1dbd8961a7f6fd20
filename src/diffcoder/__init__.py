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
    """Load a checkpoint (HF directory, .gguf file, LoRA adapter directory, or a training run directory, which
    stands for its final or latest checkpoint) as `(model, tokenizer)`; tokenizer may be None.

    The model's `generate` takes the official Stable-DiffCoder call unchanged (see diffcoder.decoding)."""
    from diffcoder.checkpoint import build_model, load_hf_dir
    from diffcoder.gguf_io import load_gguf_tokenizer, read_gguf

    dtype = resolve_dtype(dtype)
    path = resolve_run_dir(Path(path))
    if path.suffix == ".gguf":
        cfg, state = read_gguf(path)
        model = build_model(cfg, state, dtype, device)
        model.generation_defaults = {}
        return model, load_gguf_tokenizer(path)
    if (path / "adapter_config.json").is_file():
        # A LoRA adapter names its base checkpoint (path + content hash): load that, then apply the adapter.
        from diffcoder.checkpoint import verify_checkpoint
        from diffcoder.training.lora import check_base, load_adapter, read_adapter_config

        verify_checkpoint(path)  # the adapter's own files against its manifest (the base's are checked below)
        model, tokenizer = load_hf_dir(check_base(read_adapter_config(path)), dtype, device)
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            from diffcoder.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(path)
        return load_adapter(model, path), tokenizer
    return load_hf_dir(path, dtype, device)


__all__ = ["load", "resolve_dtype", "__version__"]
