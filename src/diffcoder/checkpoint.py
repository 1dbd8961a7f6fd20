"""Hugging Face checkpoint directories: load (Llama, Qwen2, Stable-DiffCoder layouts) and save (docs/design.md §4).

Saving is atomic: everything is written to a temporary sibling directory that replaces the target by rename,
so a process killed mid-write leaves the previous checkpoint intact. Every saved directory carries a manifest
(size and sha256 of each file, `diffcoder.manifest`) that loading checks, so a file damaged later is named.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import diffcoder.manifest as manifest
from diffcoder.errors import CheckpointError, ConfigError, DiffcoderError
from diffcoder.model import DiffusionLM, ModelConfig
from diffcoder.settings import CHECKPOINT_KEYS, DecodeSettings

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "StableDiffcoderForCausalLM")
MASK_TOKEN_NAMES = ("<[MASK_TOKEN]>", "<|mask|>", "<mask>", "[MASK]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
DECODING_DEFAULT_KEYS = CHECKPOINT_KEYS  # the decoding values generation_config.json may hold
# config.json fields whose type must be right before a model is built from them (checked with a named error).
POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "block_size", "block_length",
                       "mask_token_id", "bos_token_id", "pad_token_id")
NUMBER_FIELDS = ("rope_theta", "rms_norm_eps")
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "shift")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
LOAD_ADVICE = ("restore it from a copy or re-save the checkpoint; if you changed the file on purpose, accept the "
               "change with `diffcoder info {path} --rehash`")


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} has no config.json: point --model at a Hugging Face checkpoint directory or a .gguf file"
        )
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}); restore or re-save the checkpoint") from exc
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file} holds a JSON {type(d).__name__}, not an object of config fields; "
                              "restore or re-save the checkpoint")
    archs = d.get("architectures") or [d.get("model_type", "?")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and d.get("model_type") not in ("llama", "qwen2"):
        raise CheckpointError(
            f"unsupported architecture {archs} in {cfg_file}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(model_type llama or qwen2)"
        )
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{cfg_file}: rope_scaling must be an object or null, got {scaling!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"rope_scaling {scaling} is not supported yet (only plain RoPE); see {cfg_file}")
    check_config_types(d, cfg_file)
    return d


def check_config_types(d: dict[str, Any], cfg_file: Path) -> None:
    """Sizes must be whole numbers, flags true/false: a layer count written as "30" is an error, not a crash."""
    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{cfg_file}: {key} must be {want}, got {d[key]!r}; restore or re-save the checkpoint")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for k in POSITIVE_INT_FIELDS:
        if k not in d:
            raise CheckpointError(f"{cfg_file} has no {k}; restore or re-save the checkpoint")
        if not (is_int(d[k]) and d[k] > 0):
            raise bad(k, "a positive whole number")
    d.setdefault("num_key_value_heads", d["num_attention_heads"])  # Hugging Face's default: no grouping
    for k in OPTIONAL_INT_FIELDS:
        if d.get(k) is not None and not is_int(d[k]):
            raise bad(k, "a whole number")
    eos = d.get("eos_token_id")
    if eos is not None and not (is_int(eos) or (isinstance(eos, list) and eos and all(map(is_int, eos)))):
        raise bad("eos_token_id", "a token id or a list of them")
    for k in NUMBER_FIELDS:
        if d.get(k) is not None and not (isinstance(d[k], int | float) and not isinstance(d[k], bool) and d[k] > 0):
            raise bad(k, "a positive number")
    for k in BOOL_FIELDS:
        if d.get(k) is not None and not isinstance(d[k], bool):
            raise bad(k, "true or false")


@dataclass
class Loaded:
    """A loaded checkpoint. Unpacks as `model, tokenizer = diffcoder.load(...)`.

    `defaults`: the decoding defaults it records, what `DecodeSettings.resolve` takes (its generation_config.json,
    then the block size and shift of its config). `generation_config`: the generation_config.json values a re-save
    keeps (`save_checkpoint(..., generation_defaults=loaded.generation_config)`)."""

    model: DiffusionLM
    tokenizer: Any
    defaults: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (self.model, self.tokenizer)[i]

    @classmethod
    def of(cls, model: DiffusionLM, tokenizer, recorded: dict[str, Any], generation_config: dict[str, Any],
           path: Path | None = None) -> Loaded:
        """`recorded` (read_generation_defaults) completed with the model config's block size and shift."""
        cfg = model.config
        return cls(model, tokenizer, {"block_length": cfg.block_size, "shift": cfg.shift, **recorded},
                   dict(generation_config), path)


def load_tokenizer(path: str | Path, required: bool = False):
    """The tokenizer of a checkpoint directory (through `transformers`) or of a .gguf file. Without tokenizer
    files: None, or with `required` an error naming the path."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from diffcoder.gguf_io import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        if required:
            raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); give a checkpoint "
                                  "that has one (e.g. --tokenizer smollm2)")
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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from its name (float32, bf16, ...); None: float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None, device="cpu") -> Loaded:
    """A concrete checkpoint: a Hugging Face directory or a .gguf file (names and run directories:
    `diffcoder.loading.resolve_model`; adapters: `diffcoder.loading.load`)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if path.suffix == ".gguf":
        from diffcoder.gguf_io import load_gguf_tokenizer, read_gguf

        cfg, state = read_gguf(path)
        return Loaded.of(build_model(cfg, state, dtype, device), load_gguf_tokenizer(path), {}, {}, path)
    return load_hf_dir(path, dtype, device)


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Loaded:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; run `diffcoder pull smollm2` or give a checkpoint path")
    has_manifest = (path / manifest.MANIFEST).is_file()
    try:
        model, tokenizer = _build_from_dir(path, dtype, device)
    except DiffcoderError as exc:  # say too which files changed since the save, when the manifest knows
        problems = manifest.find_damage(path) if has_manifest else []
        if problems:
            raise CheckpointError(f"{exc}; the manifest shows: {'; '.join(problems[:3])}") from exc
        raise
    if has_manifest:  # files that parse can still be damaged: 16 KB of weights overwritten in place
        verify_checkpoint(path)
    return Loaded.of(model, tokenizer, read_generation_defaults(path),
                     read_generation_defaults(path, with_config=False), path)


def _build_from_dir(path: Path, dtype: torch.dtype, device):
    d = read_config(path)
    tokenizer = load_tokenizer(path)
    cfg = ModelConfig.from_hf_dict(d)
    if cfg.mask_token_id is None:
        cfg.mask_token_id = find_mask_token(tokenizer)
    if "block_size" not in d and "block_length" in d:
        cfg.block_size = int(d["block_length"])
    return build_model(cfg, read_weights(weight_files(path)), dtype, device), tokenizer


def verify_checkpoint(path: Path) -> bool:
    """Check the directory's files against its manifest (no manifest: nothing to check, False)."""
    return manifest.verify(path, LOAD_ADVICE.format(path=path))


def rehash_checkpoint(path: str | Path) -> Path:
    """Accept the files of a checkpoint directory as they are now: rewrite its manifest (`info --rehash`)."""
    path = Path(path)
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json or adapter_config.json)")
    return manifest.write_manifest(path)


def _read_json_object(f: Path) -> dict[str, Any]:
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc}); fix it, or delete it to use the built-in "
                              "defaults") from exc
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got a {type(d).__name__}; fix or delete it")
    return d


def read_generation_defaults(path: str | Path, with_config: bool = True) -> dict[str, Any]:
    """The decoding defaults a checkpoint records: the decoding keys of its generation_config.json, with (unless
    with_config=False) the block size and shift of its config (config.json, or adapter_config.json for an adapter)
    where that file has none.

    `path` is a checkpoint or adapter directory (`diffcoder.loading.resolve_model` turns a name or a training run
    directory into one); a .gguf file records nothing. This is what `DecodeSettings.resolve` takes as the
    checkpoint's defaults (`Loaded.defaults` holds it for a loaded model)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    out: dict[str, Any] = {}
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        gen = _read_json_object(gen_file)
        out = {k: gen[k] for k in CHECKPOINT_KEYS if gen.get(k) is not None}
    for name in ("config.json", "adapter_config.json") if with_config else ():
        if (path / name).is_file():
            cfg = _read_json_object(path / name)
            block = cfg.get("block_size", cfg.get("block_length"))
            if block is not None:
                out.setdefault("block_length", block)
            if cfg.get("shift") is not None:
                out.setdefault("shift", cfg["shift"])
            break
    return out


def state_dict_for_save(model: DiffusionLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_weights(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` with the index `transformers` reads."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    files = split.filename_to_tensors.items()
    for name, keys in tqdm(files, desc="saving weights", unit="shard", disable=not split.is_sharded):
        save_file({k: sd[k] for k in keys}, str(out / name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
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
    """Write a docs/design.md §4 directory, loadable by `transformers` as LlamaForCausalLM and by `diffcoder.load`.

    `generation_defaults`: the decoding defaults to record over the model config's block size and shift (to keep
    a loaded checkpoint's, pass its `Loaded.generation_config`)."""
    path = Path(path)
    cfg = model.config
    builtin = DecodeSettings(max_new_tokens=1)
    gen: dict[str, Any] = {"block_length": cfg.block_size, "shift": cfg.shift, "remasking": builtin.remasking,
                           "temperature": builtin.temperature, "threshold": builtin.threshold}
    # the caller's: a re-save passes what the checkpoint was loaded with (`Loaded.generation_config`)
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
        manifest.write_manifest(tmp)

    atomic_directory(path, write)
    return path
