"""Hugging Face checkpoint directories: load (Llama, Qwen2, Stable-DiffCoder layouts) and save (DESIGN §4).

Saving is atomic: everything is written to a temporary sibling directory that replaces the target by rename,
so a process killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffcoder.errors import CheckpointError
from diffcoder.model import DiffusionLM, ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "StableDiffcoderForCausalLM")
MASK_TOKEN_NAMES = ("<[MASK_TOKEN]>", "<|mask|>", "<mask>", "[MASK]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
DECODING_DEFAULT_KEYS = ("steps", "gen_length", "block_length", "threshold", "remasking", "temperature", "shift")


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} has no config.json: point --model at a Hugging Face checkpoint directory or a .gguf file"
        )
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}); restore or re-save the checkpoint") from exc
    archs = d.get("architectures") or [d.get("model_type", "?")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and d.get("model_type") not in ("llama", "qwen2"):
        raise CheckpointError(
            f"unsupported architecture {archs} in {cfg_file}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(model_type llama or qwen2)"
        )
    scaling = d.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"rope_scaling {scaling} is not supported yet (only plain RoPE); see {cfg_file}")
    return d


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer through `transformers`, or None when the directory has no tokenizer files."""
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # a broken tokenizer should not hide the weights
        if (path / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        raise CheckpointError(f"could not load the tokenizer in {path}: {exc}") from exc


def find_mask_token(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    for name in MASK_TOKEN_NAMES:
        if name in vocab:
            return vocab[name]
    return None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt ({exc}); restore or re-save the checkpoint") from exc
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing weight shards {missing} named in {index.name}; copy them in")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
        "(.bin checkpoints: re-save with safetensors)"
    )


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading weights", unit="shard", disable=len(files) < 2):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{f} is corrupt or truncated ({exc}); re-download or re-save it") from exc
    return state


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device) -> DiffusionLM:
    """Instantiate without allocating random weights (meta device), then adopt the given tensors."""
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        want = dict(model.named_parameters())[k].shape
        if tuple(v.shape) != tuple(want):
            raise CheckpointError(f"{k} has shape {tuple(v.shape)} but the config implies {tuple(want)}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; run `diffcoder pull smollm2` or give a checkpoint path")
    d = read_config(path)
    tokenizer = load_tokenizer(path)
    cfg = ModelConfig.from_hf_dict(d)
    if cfg.mask_token_id is None:
        cfg.mask_token_id = find_mask_token(tokenizer)
    if "block_size" not in d and "block_length" in d:
        cfg.block_size = int(d["block_length"])
    model = build_model(cfg, read_weights(weight_files(path)), dtype, device)
    model.generation_defaults = read_generation_defaults(path)
    return model, tokenizer


def read_generation_defaults(path: Path) -> dict[str, Any]:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}
    return {k: d[k] for k in DECODING_DEFAULT_KEYS if k in d}


def state_dict_for_save(model: DiffusionLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_weights(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    for i, shard in enumerate(tqdm(shards, desc="saving weights", unit="shard")):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def atomic_directory(target: Path, write) -> None:
    """Run write(tmp_dir) then move tmp_dir to target in one rename (replacing any old target)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # make the data durable before the rename publishes it
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    model: DiffusionLM,
    path: str | Path,
    tokenizer=None,
    generation_defaults: dict[str, Any] | None = None,
    max_shard_bytes: int = 4 << 30,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a DESIGN §4 directory, loadable by `transformers` as LlamaForCausalLM and by `diffcoder.load`."""
    path = Path(path)
    cfg = model.config
    gen = {
        "block_length": cfg.block_size,
        "shift": cfg.shift,
        "remasking": "low_confidence",
        "temperature": 0.0,
        "threshold": None,
    }
    gen.update(getattr(model, "generation_defaults", {}) or {})
    gen.update(generation_defaults or {})
    gen_config = {k: v for k, v in gen.items() if v is not None}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, k) is not None:
            gen_config[k] = getattr(cfg, k)
    sd = state_dict_for_save(model)

    def write(tmp: Path) -> None:
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2, sort_keys=True))
        write_weights(sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    atomic_directory(path, write)
    return path
