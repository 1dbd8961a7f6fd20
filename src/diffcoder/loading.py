"""Naming and loading a model, one way for every command and for Python.

`resolve_model(spec)` turns what a user names into the checkpoint to load:

- a built-in name: `smollm2` (the embedded diffusion default; also `default` or None) or `smollm2-ar` (its AR
  origin), built on first use (`diffcoder.pull`);
- a training run directory: its `final/` checkpoint, or while it runs its latest complete one;
- a Hugging Face checkpoint directory (`config.json`), a LoRA adapter directory (`adapter_config.json`), or a
  `.gguf` file.

Anything else is a `CheckpointError` that says what was expected. `load(spec)` loads what it names and returns a
`Loaded`: it unpacks as `model, tokenizer = diffcoder.load(...)` and carries the checkpoint's decoding defaults in
`.defaults` (what `DecodeSettings.resolve` takes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcoder.checkpoint import (
    DTYPES,
    Loaded,
    load_checkpoint,
    resolve_dtype,
    save_checkpoint,
    verify_checkpoint,
)
from diffcoder.errors import CheckpointError
from diffcoder.registry import BUILTINS, DEFAULT_NAME

ModelSpec = str | Path | None


def resolve_run_dir(path: Path) -> Path:
    """A training run directory stands for its final model, or while it runs, its latest complete checkpoint;
    any other directory stands for itself."""
    path = Path(path)
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return path
    if (path / "final" / "config.json").is_file() or (path / "final" / "adapter_config.json").is_file():
        return path / "final"
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        return path / "checkpoints" / pointer.read_text().strip()
    return path


def resolve_model(spec: ModelSpec = None) -> Path:
    """The checkpoint path `spec` names (see the module's docstring); built-in models are built on first use."""
    if spec is None or str(spec) == "default":
        spec = DEFAULT_NAME
    if isinstance(spec, str) and spec in BUILTINS:
        from diffcoder.pull import ensure_builtin

        return ensure_builtin(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model {str(spec)!r} is neither a path nor a built-in name ({', '.join(BUILTINS)}): {path} does not "
            "exist; give a checkpoint or adapter directory, a training run directory or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise CheckpointError(f"{path} is a file but not a .gguf; give a .gguf file, a checkpoint or adapter "
                              "directory, or a training run directory")
    found = resolve_run_dir(path)
    if (found / "config.json").is_file() or (found / "adapter_config.json").is_file():
        return found
    raise CheckpointError(
        f"{path} has no config.json (a Hugging Face checkpoint), adapter_config.json (a LoRA adapter), final/ or "
        "checkpoints/latest (a training run): point at one of those, or at a .gguf file")


def load(spec: ModelSpec = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu") -> Loaded:
    """Load what `spec` names (default: the embedded default, smollm2) as a `Loaded`: `model, tokenizer =
    diffcoder.load(...)`; the tokenizer may be None. An adapter is merged into its verified base.

    The model's `generate` takes the official Stable-DiffCoder call unchanged (see diffcoder.decoding)."""
    path = resolve_model(spec)
    from diffcoder.adapters import is_adapter_dir

    if is_adapter_dir(path):
        from diffcoder.adapters import load_with_adapter
        from diffcoder.pull import ensure_builtin

        verify_checkpoint(path)  # the adapter's own files against its manifest (the base's are checked on load)
        return load_with_adapter(path, resolve_dtype(dtype), device, resolve_name=ensure_builtin)
    return load_checkpoint(path, dtype, device)


def merge_adapter(adapter: ModelSpec, out: str | Path) -> Path:
    """`diffcoder merge`: base + adapter -> a full checkpoint directory, keeping the adapter's decoding defaults."""
    from diffcoder.adapters import is_adapter_dir

    path = resolve_model(adapter)
    if not is_adapter_dir(path):
        raise CheckpointError(f"{path} is not a LoRA adapter directory (no adapter_config.json); nothing to merge")
    loaded = load(path)
    return save_checkpoint(loaded.model, out, tokenizer=loaded.tokenizer, generation_defaults=loaded.generation_config)


__all__ = ["load", "resolve_model", "resolve_run_dir", "merge_adapter", "Loaded", "resolve_dtype", "DTYPES"]
