"""LoRA adapter directories: PEFT's on-disk format plus a small sidecar of diffusion facts.

An adapter directory holds

- `adapter_config.json`: PEFT's `LoraConfig` (`peft_type: LORA`, `r`, `lora_alpha`, `target_modules`,
  `trainable_token_indices`, `base_model_name_or_path`), so `peft.PeftModel.from_pretrained` loads it;
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` per adapted linear, and
  the embedding rows trained in full (the mask token, added FIM tokens) as PEFT's
  `base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta` (full rows, in the order of
  `trainable_token_indices`);
- `diffcoder_adapter.json`: what PEFT has no field for and would warn about in its own config: the base's content
  hash and vocabulary size, how to find the base, the tokens the adapter adds to it, the mask token id and the
  block size / shift it was trained for;
- optionally `generation_config.json` (decoding defaults) and tokenizer files.

`diffcoder.load(ADAPTER_DIR)` reads this with `safetensors` alone, checks the base, and returns the base with the
adapter merged into its weights. The older `diffcoder-lora-v1` layout (our own key names, everything in
`adapter_config.json`) is still read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffcoder.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from diffcoder.checkpoint import Loaded

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "diffcoder_adapter.json"
FORMAT = "diffcoder-adapter-v2"
PEFT_PREFIX = "base_model.model."
TOKEN_ROWS_KEY = PEFT_PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta"
V1_MASK_ROW = "mask_token_embedding"


@dataclass
class Adapter:
    """An adapter as read from disk: low-rank factors per linear, full embedding rows, and the diffusion facts."""

    path: Path
    rank: int
    alpha: float
    targets: list[str]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])
    token_rows: dict[int, torch.Tensor]  # embedding row id -> the trained row, in full
    meta: dict[str, Any] = field(default_factory=dict)  # the sidecar's fields

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_content_hash(base: Path) -> str:
    """sha256 over the base checkpoint's weight files (names and bytes)."""
    from diffcoder.checkpoint import weight_files

    h = hashlib.sha256()
    for f in weight_files(base):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({exc}); restore it from where the adapter "
                              "came from") from exc


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    f = adapter_dir / ADAPTER_WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy the weights file "
                              "in beside it")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{f} is corrupt or truncated ({exc}); copy the adapter again from its source "
                              "(for the built-in default: reinstall diffcoder)") from exc


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read an adapter directory (PEFT layout with our sidecar, or the older diffcoder-lora-v1 layout)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory (give the "
                              "directory a training run wrote, or a checkpoint directory)")
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    if cfg.get("format") == "diffcoder-lora-v1":
        return _read_v1(adapter_dir, cfg)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG} is not a LoRA adapter (peft_type "
                              f"{cfg.get('peft_type')!r}); only LoRA adapters are supported")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG} lacks {missing}; restore it from where the adapter "
                              "came from")
    return _read_peft(adapter_dir, cfg)


def _read_peft(adapter_dir: Path, cfg: dict[str, Any]) -> Adapter:
    """PEFT's layout: `base_model.model.<module>.lora_A/B.weight`, trained rows as trainable tokens, our sidecar."""
    if not (adapter_dir / SIDECAR).is_file():
        raise CheckpointError(f"{adapter_dir} has no {SIDECAR}, so its base checkpoint is unknown; it is a plain PEFT "
                              "adapter: load it with peft, or add the sidecar (see docs/adapters.md)")
    meta = _read_json(adapter_dir / SIDECAR)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{adapter_dir / SIDECAR} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                              "upgrade diffcoder")
    sd = _read_weights(adapter_dir)
    lora = {}
    for key in sd:
        if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX): -len(".lora_A.weight")]
            b_key = f"{PEFT_PREFIX}{name}.lora_B.weight"
            if b_key not in sd:
                raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS} has {key} without {b_key}; the file is "
                                      "incomplete: copy it again from its source")
            lora[name] = (sd[key], sd[b_key])
    indices = cfg.get("trainable_token_indices") or []
    if isinstance(indices, dict):
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: trainable_token_indices per module is not supported; "
                              "give a list (rows of the input embedding)")
    rows = sd.get(TOKEN_ROWS_KEY)
    if indices and (rows is None or rows.shape[0] != len(indices)):
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS} should hold {len(indices)} token rows under "
                              f"{TOKEN_ROWS_KEY} (trainable_token_indices); the file is incomplete or from another "
                              "adapter")
    token_rows = {int(i): rows[k] for k, i in enumerate(indices)}
    return Adapter(adapter_dir, int(cfg["r"]), float(cfg["lora_alpha"]), list(cfg["target_modules"]), lora,
                   token_rows, meta)


def _read_v1(adapter_dir: Path, cfg: dict[str, Any]) -> Adapter:
    """The first layout: our key names (`<module>.lora_A`, `mask_token_embedding`), all facts in the config."""
    sd = _read_weights(adapter_dir)
    lora = {k[: -len(".lora_A")]: (v, sd[k[: -len(".lora_A")] + ".lora_B"]) for k, v in sd.items()
            if k.endswith(".lora_A")}
    mid = cfg.get("mask_token_id")
    token_rows = {int(mid): sd[V1_MASK_ROW]} if V1_MASK_ROW in sd and mid is not None else {}
    base = cfg["base_model"]
    meta = {"format": cfg["format"], "base": {"path": base}, "base_sha256": cfg["base_sha256"],
            "vocab_size": cfg.get("vocab_size"), "mask_token_id": mid, "added_tokens": {},
            "block_size": cfg.get("block_size"), "shift": cfg.get("shift")}
    return Adapter(adapter_dir, int(cfg["rank"]), float(cfg["alpha"]), list(cfg["targets"]), lora, token_rows, meta)


# ------------------------------------------------------------------------------------------------- the base


def resolve_base(adapter: Adapter, resolve_name: Callable[[str], Path] | None = None) -> Path:
    """The adapter's base checkpoint directory: a built-in name or a path.

    `resolve_name` builds a built-in base on first use (`diffcoder.loading.load` passes `pull.ensure_builtin`);
    without it a built-in base must be built already."""
    base = adapter.meta.get("base") or {}
    if base.get("name"):
        from diffcoder.registry import BUILTINS, builtin_dir

        name = base["name"]
        if resolve_name is not None:
            return resolve_name(name)
        if name not in BUILTINS:
            raise CheckpointError(f"adapter {adapter.path} names an unknown built-in base {name!r}; known: "
                                  f"{', '.join(BUILTINS)}")
        if not (builtin_dir(name) / "config.json").is_file():
            raise CheckpointError(f"the base of adapter {adapter.path}, built-in {name!r}, is not built yet; run "
                                  f"`diffcoder pull {name}` (or load the adapter with diffcoder.load)")
        return builtin_dir(name)
    path = Path(base.get("path", ""))
    if not path.is_absolute():
        path = (adapter.path / path).resolve() if (adapter.path / path).exists() else path
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"the base checkpoint of adapter {adapter.path} is missing at {path}; restore it there, or point "
            f"'base' in {SIDECAR} at it (its content sha256 must be {adapter.meta.get('base_sha256', '?')[:16]}…)")
    return path


def verify_base(adapter: Adapter, base: Path) -> None:
    """The base must be the one the adapter was trained on: same vocabulary size, same weight bytes."""
    from diffcoder.checkpoint import read_config

    want_vocab = adapter.meta.get("base_vocab_size")
    got_vocab = read_config(base).get("vocab_size")
    if want_vocab is not None and got_vocab != want_vocab:
        raise CheckpointError(
            f"adapter {adapter.path} was trained on a base with {want_vocab} embeddings, but {base} has {got_vocab}: "
            "it is another model; load the adapter on the base named in its "
            f"{SIDECAR} ({_describe_base(adapter)})")
    want = adapter.meta.get("base_sha256")
    got = base_content_hash(base)
    if want and got != want:
        raise CheckpointError(
            f"the base checkpoint {base} is not the one adapter {adapter.path} was trained on (content sha256 "
            f"{got[:16]}… vs {want[:16]}…): the base has changed or is another model; use the original base "
            f"({_describe_base(adapter)}){_rebuild_hint(adapter)}")


def _describe_base(adapter: Adapter) -> str:
    base = adapter.meta.get("base") or {}
    return f"built-in '{base['name']}'" if base.get("name") else str(base.get("path", "?"))


def _rebuild_hint(adapter: Adapter) -> str:
    name = (adapter.meta.get("base") or {}).get("name")
    if not name:
        return ""
    from diffcoder.registry import builtin_dir

    return f"; delete {builtin_dir(name)} and run `diffcoder pull {name}` to rebuild it"


# ------------------------------------------------------------------------------------------------- merging


def _check_shapes(model, adapter: Adapter) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    for name, (a, b) in adapter.lora.items():
        lin = modules.get(name)
        if lin is None or not hasattr(lin, "weight") or lin.weight.ndim != 2:
            raise CheckpointError(f"adapter layer {name} does not exist in the base model: adapter {adapter.path} "
                                  "belongs to another architecture; use its own base")
        out_f, in_f = lin.weight.shape
        if tuple(a.shape) != (adapter.rank, in_f) or tuple(b.shape) != (out_f, adapter.rank):
            raise CheckpointError(f"adapter layer {name} has shapes A {tuple(a.shape)}, B {tuple(b.shape)} but the "
                                  f"base's weight is {out_f}x{in_f} (rank {adapter.rank}); use the adapter's own base")
    return modules


def _grow_for_adapter(model, tokenizer, adapter: Adapter) -> None:
    """Give the base the tokens the adapter added (same names, same ids) before its rows are written."""
    from diffcoder.convert import add_special_tokens, grow_vocab

    added = adapter.meta.get("added_tokens") or {}
    if added and tokenizer is not None:
        ids = add_special_tokens(model, tokenizer, list(added))
        wrong = {n: (i, added[n]) for n, i in zip(added, ids) if i != added[n]}
        if wrong:
            raise CheckpointError(f"the base's tokenizer gives the adapter's added tokens other ids ({wrong}: got, "
                                  "expected); use the adapter's own base and tokenizer")
    want = adapter.vocab_size
    if want is not None and model.config.vocab_size < want:
        grow_vocab(model, want)
    if want is not None and model.config.vocab_size != want:
        raise CheckpointError(f"adapter {adapter.path} has a vocabulary of {want} but the base has "
                              f"{model.config.vocab_size}; use the adapter's own base")


@torch.no_grad()
def merge_into(model, adapter: Adapter, tokenizer=None):
    """Fold the adapter into the model's weights: W += B·A·(alpha/r) per linear, trained rows replaced in full."""
    _grow_for_adapter(model, tokenizer, adapter)
    modules = _check_shapes(model, adapter)
    for name, (a, b) in adapter.lora.items():
        w = modules[name].weight
        delta = (b.double() @ a.double()) * adapter.scale
        w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
    emb = model.model.embed_tokens.weight
    for row, values in adapter.token_rows.items():
        if not 0 <= row < emb.shape[0] or values.shape != emb.shape[1:]:
            raise CheckpointError(f"adapter token row {row} (shape {tuple(values.shape)}) does not fit the base's "
                                  f"embedding {tuple(emb.shape)}; use the adapter's own base")
        emb[row] = values.to(emb)
    meta = adapter.meta
    if meta.get("mask_token_id") is not None:
        model.config.mask_token_id = meta["mask_token_id"]
    for key in ("block_size", "shift"):
        if meta.get(key) is not None:
            setattr(model.config, key, meta[key])
    model.config.extra.pop("diffusion_trained", None)  # the adapter is what trained it
    return model


def load_with_adapter(adapter_dir: Path, dtype: torch.dtype, device,
                      resolve_name: Callable[[str], Path] | None = None) -> Loaded:
    """`diffcoder.load` of an adapter directory: verified base + adapter merged, and the decoding defaults (the
    base's generation_config.json, the adapter's block size and shift, then the adapter's own defaults)."""
    from diffcoder.checkpoint import Loaded, load_hf_dir, load_tokenizer, read_generation_defaults

    adapter_dir = Path(adapter_dir)
    adapter = read_adapter(adapter_dir)
    base = resolve_base(adapter, resolve_name)
    verify_base(adapter, base)
    model, tokenizer = load_hf_dir(base, dtype, device)
    if any((adapter_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(adapter_dir)
    merge_into(model, adapter, tokenizer)
    defaults = read_generation_defaults(base, with_config=False)
    defaults.update({"block_length": model.config.block_size, "shift": model.config.shift})
    defaults.update(read_generation_defaults(adapter_dir))
    return Loaded.of(model, tokenizer, defaults, defaults, adapter_dir)


# ------------------------------------------------------------------------------------------------- writing


def _live_lora(model) -> dict[str, torch.nn.Module]:
    """Every live LoRA module (anything with lora_A/lora_B matrices), keyed by the wrapped linear's name.

    Duck-typed so this module needs nothing from diffcoder.training."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}


def trained_rows(model) -> list[int]:
    """Embedding rows trained in full: what apply_lora recorded, else the mask token's row."""
    rows = (getattr(model, "_lora_config", None) or {}).get("trainable_token_indices")
    if rows is None:
        mid = model.config.mask_token_id
        rows = [] if mid is None else [mid]
    return [int(r) for r in rows]


def save_adapter(model, dest: Path, base: Path, tokenizer=None, base_name: str | None = None) -> None:
    """Write a live LoRA model's adapter into `dest` (an existing directory) in the PEFT layout + sidecar."""
    from diffcoder.checkpoint import read_config, read_generation_defaults
    from diffcoder.registry import builtin_name_of

    base = Path(base).resolve()
    if base.suffix == ".gguf" or not (base / "config.json").is_file():
        raise ConfigError(f"LoRA needs a Hugging Face checkpoint directory as base (got {base}); convert it first "
                          "with `diffcoder convert`")
    base_name = base_name or builtin_name_of(base)
    lcfg = model._lora_config
    emb = model.model.embed_tokens.weight.detach().cpu()
    lora = {n: (m.lora_A.detach().cpu().contiguous(), m.lora_B.detach().cpu().contiguous())
            for n, m in _live_lora(model).items()}
    base_vocab, vocab = int(read_config(base)["vocab_size"]), model.config.vocab_size
    added = {}
    if tokenizer is not None and vocab > base_vocab:
        added = {tokenizer.convert_ids_to_tokens(i): i for i in range(base_vocab, vocab)
                 if tokenizer.convert_ids_to_tokens(i) is not None}
    meta = {"format": FORMAT, "base": {"name": base_name} if base_name else {"path": str(base)},
            "base_sha256": base_content_hash(base), "base_vocab_size": base_vocab, "vocab_size": vocab,
            "added_tokens": added, "mask_token_id": model.config.mask_token_id,
            "block_size": model.config.block_size, "shift": model.config.shift}
    adapter = Adapter(dest, int(lcfg["rank"]), float(lcfg["alpha"]), list(lcfg["targets"]), lora,
                      {r: emb[r].clone() for r in trained_rows(model)}, meta)
    write_adapter(adapter, dest, dropout=float(lcfg.get("dropout", 0.0)))
    gen = read_generation_defaults(base) | {"block_length": model.config.block_size, "shift": model.config.shift}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))


def write_adapter(adapter: Adapter, dest: Path, dropout: float = 0.0) -> None:
    """The three adapter files: PEFT's config and weights, and our sidecar (adapter.meta, format stamped)."""
    dest = Path(dest)
    rows = list(adapter.token_rows)
    sd = {}
    for name, (a, b) in adapter.lora.items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    if rows:
        sd[TOKEN_ROWS_KEY] = torch.stack([adapter.token_rows[r] for r in rows]).contiguous()
    base = adapter.meta.get("base") or {}
    base_ref = base.get("name") or base.get("path") or ""
    save_file(sd, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
            "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": dropout,
            "target_modules": sorted(adapter.targets), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "trainable_token_indices": rows or None}
    (dest / ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
    (dest / SIDECAR).write_text(json.dumps(dict(adapter.meta, format=FORMAT), indent=2) + "\n")


def upgrade_adapter(src: str | Path, dest: str | Path, base_name: str | None = None,
                    resolve_name: Callable[[str], Path] | None = None) -> Path:
    """Rewrite an adapter of any layout we read (e.g. diffcoder-lora-v1) in the current one, weights unchanged.

    `base_name` names a built-in base instead of the path the old adapter recorded. The base must be at hand: its
    hash is checked and its vocabulary size recorded."""
    from diffcoder.checkpoint import read_config

    adapter = read_adapter(src)
    if base_name:
        adapter.meta["base"] = {"name": base_name}
    base = resolve_base(adapter, resolve_name)
    verify_base(adapter, base)
    adapter.meta.setdefault("base_vocab_size", read_config(base)["vocab_size"])
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_adapter(adapter, dest)
    return dest


@torch.no_grad()
def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Resume: copy a saved adapter's A/B matrices and token rows into a model that already has LoRA modules."""
    adapter = read_adapter(adapter_dir)
    for name, m in _live_lora(model).items():
        if name not in adapter.lora:
            raise CheckpointError(f"{adapter_dir} has no LoRA weights for {name}; it was saved by another run")
        m.lora_A.copy_(adapter.lora[name][0])
        m.lora_B.copy_(adapter.lora[name][1])
    emb = model.model.embed_tokens.weight
    for row, values in adapter.token_rows.items():
        emb[row] = values.to(emb)


__all__ = ["Adapter", "read_adapter", "resolve_base", "verify_base", "merge_into", "load_with_adapter",
           "save_adapter", "write_adapter", "upgrade_adapter", "load_adapter_weights",
           "base_content_hash", "is_adapter_dir", "trained_rows"]
