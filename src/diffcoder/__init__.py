"""diffcoder: Stable-DiffCoder block-diffusion code language models, end to end.

The package only re-exports; each name is imported on first use (PEP 562), so `import diffcoder` and the
command line's argument parsing stay light:

- `load(spec, dtype=None, device="cpu")`: `model, tokenizer = diffcoder.load("smollm2")` (`diffcoder.loading`);
- `resolve_model(spec)`: the checkpoint path a name, run directory, adapter, HF directory or .gguf stands for;
- `infill(model, tokenizer, prefix, suffix, **decoding)`: fill-in-the-middle (`diffcoder.infilling`);
- `resolve_dtype`, `DTYPES`: torch dtypes by name.
"""

from __future__ import annotations

from typing import Any

from diffcoder._version import __version__

_EXPORTS = {"load": "diffcoder.loading", "resolve_model": "diffcoder.loading", "Loaded": "diffcoder.loading",
            "resolve_run_dir": "diffcoder.loading", "resolve_dtype": "diffcoder.loading",
            "DTYPES": "diffcoder.loading", "infill": "diffcoder.infilling"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffcoder' has no attribute {name!r}")


__all__ = ["load", "resolve_model", "Loaded", "infill", "resolve_dtype", "DTYPES", "__version__"]
