"""The built-in model names and the cache folders they are built into (`diffcoder.pull` builds them).

Kept apart from the builder so that the adapter code can name a built-in base without importing what builds it."""

from __future__ import annotations

import os
from pathlib import Path

AR_NAME, DEFAULT_NAME = "smollm2-ar", "smollm2"
# Built-in name -> the folder it is built into under the cache.
BUILTINS = {DEFAULT_NAME: "smollm2-135m-diffusion", AR_NAME: "smollm2-135m-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFCODER_HOME", Path.home() / ".cache" / "diffcoder"))


def builtin_dir(name: str) -> Path:
    return cache_dir() / BUILTINS[name]


def builtin_name_of(path: Path) -> str | None:
    """The built-in name whose cache folder `path` is, if any (so an adapter can name its base portably)."""
    resolved = Path(path).resolve()
    return next((n for n in BUILTINS if builtin_dir(n).resolve() == resolved), None)


__all__ = ["AR_NAME", "DEFAULT_NAME", "BUILTINS", "cache_dir", "builtin_dir", "builtin_name_of"]
