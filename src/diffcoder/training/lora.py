"""LoRA adapters: low-rank updates on chosen linear layers, with the mask-token embedding row trained in full
(a new token has no pretrained row worth freezing).

An adapter directory holds `adapter_config.json` (rank, alpha, targets, the base checkpoint's path and content
hash), `adapter_model.safetensors` (the A/B matrices and the mask row), the tokenizer and the base's
generation_config.json. `diffcoder.load(ADAPTER_DIR)` checks the base's hash, loads it and returns it with the
adapter merged in; `diffcoder merge` saves that.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffcoder.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MASK_ROW = "mask_token_embedding"


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), W frozen, B initialised to zero (the start equals the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, lora_cfg, train_token_rows: list[int]) -> None:
    """Freeze the model, wrap the target linears with LoRA, and let only the embedding rows `train_token_rows`
    learn in full (new tokens: the mask token, FIM tokens — they have no pretrained row worth freezing).

    The rows are recorded in `model._lora_config["trainable_token_indices"]` for the adapter files."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(lora_cfg.targets)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout))
    emb = model.model.embed_tokens.weight
    rows = sorted({int(r) for r in train_token_rows})
    if rows and not 0 <= rows[0] <= rows[-1] < emb.shape[0]:
        raise ConfigError(f"trainable token rows {rows} fall outside the embedding's {emb.shape[0]} rows")
    if rows:
        emb.requires_grad_(True)
        emb.register_hook(keep_rows_hook(rows))  # every other row stays exactly the base's
    model._lora_config = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
                          "dropout": lora_cfg.dropout, "trainable_token_indices": rows}


def keep_rows_hook(rows: list[int]):
    """A gradient hook that zeroes every row but `rows`. It follows the gradient's device and dtype, so the model
    may be moved (`.to("cuda")`, `.to(torch.bfloat16)`) after `apply_lora`."""
    index_on: dict[torch.device, torch.Tensor] = {}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.device not in index_on:
            index_on[grad.device] = torch.tensor(rows, dtype=torch.long, device=grad.device)
        idx = index_on[grad.device]
        return torch.zeros_like(grad).index_copy_(0, idx, grad.index_select(0, idx))

    return hook


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


def adapter_state(model) -> dict[str, torch.Tensor]:
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        sd[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    mid = model.config.mask_token_id
    if mid is not None:
        sd[MASK_ROW] = model.model.embed_tokens.weight[mid].detach().cpu().clone()
    return sd


def save_adapter(model, dest: Path, base: Path, tokenizer=None) -> None:
    """Write the adapter files into `dest` (an existing directory)."""
    base = Path(base).resolve()
    if base.suffix == ".gguf" or not (base / "config.json").is_file():
        raise ConfigError(f"LoRA needs a Hugging Face checkpoint directory as base (got {base}); convert it first "
                          "with `diffcoder convert`")
    cfg = dict(model._lora_config, format="diffcoder-lora-v1", base_model=str(base),
               base_sha256=base_content_hash(base), mask_token_id=model.config.mask_token_id,
               vocab_size=model.config.vocab_size, block_size=model.config.block_size, shift=model.config.shift)
    save_file(adapter_state(model), str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for name in ("generation_config.json",):
        if (base / name).is_file():
            (dest / name).write_text((base / name).read_text())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    f = Path(adapter_dir) / ADAPTER_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory")
    return json.loads(f.read_text())


def check_base(cfg: dict[str, Any]) -> Path:
    base = Path(cfg["base_model"])
    if not (base / "config.json").is_file():
        raise CheckpointError(f"the adapter's base checkpoint {base} is missing; restore it there (or edit "
                              f"base_model in {ADAPTER_CONFIG}) — its sha256 must be {cfg['base_sha256'][:16]}…")
    got = base_content_hash(base)
    if got != cfg["base_sha256"]:
        raise CheckpointError(f"the base checkpoint {base} has changed since the adapter was trained (sha256 "
                              f"{got[:16]}… vs {cfg['base_sha256'][:16]}…); use the original base")
    return base


@torch.no_grad()
def load_adapter(model, adapter_dir: str | Path):
    """The base model (as loaded from the adapter directory) with the adapter merged into its weights."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    check_base(cfg)
    if model.config.mask_token_id is None or model.config.vocab_size < cfg["vocab_size"]:
        from diffcoder.convert import add_mask_token

        model, _ = add_mask_token(model, None)
    if model.config.mask_token_id != cfg["mask_token_id"]:
        raise CheckpointError(f"the adapter's mask token id {cfg['mask_token_id']} does not match the base's "
                              f"{model.config.mask_token_id}")
    sd = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    scale = cfg["alpha"] / cfg["rank"]
    modules = dict(model.named_modules())
    for key in sd:
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        if name not in modules:
            raise CheckpointError(f"adapter layer {name} does not exist in the base model")
        lin = modules[name]
        delta = (sd[name + ".lora_B"].double() @ sd[key].double()) * scale
        lin.weight.copy_((lin.weight.double() + delta.to(lin.weight.device)).to(lin.weight.dtype))
    if MASK_ROW in sd:
        model.model.embed_tokens.weight[cfg["mask_token_id"]] = sd[MASK_ROW].to(model.model.embed_tokens.weight)
    model.config.block_size, model.config.shift = cfg.get("block_size", model.config.block_size), cfg.get(
        "shift", model.config.shift)
    return model


@torch.no_grad()
def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Resume: copy saved A/B matrices and the mask row into a model that already has LoRA modules."""
    sd = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    for name, m in lora_modules(model).items():
        m.lora_A.copy_(sd[f"{name}.lora_A"])
        m.lora_B.copy_(sd[f"{name}.lora_B"])
    if MASK_ROW in sd:
        model.model.embed_tokens.weight[model.config.mask_token_id] = sd[MASK_ROW]


@torch.no_grad()
def merged_model(model):
    """Fold live LoRA modules back into plain linears (after training, for export)."""
    for name, m in lora_modules(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        m.base.weight += m.delta()
        setattr(parent, name.rsplit(".", 1)[1], m.base)
    return model


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """`diffcoder merge`: base + adapter -> a full DESIGN §4 checkpoint."""
    import diffcoder
    from diffcoder.checkpoint import save_checkpoint

    read_adapter_config(Path(adapter_dir))
    model, tok = diffcoder.load(adapter_dir)
    return save_checkpoint(model, out, tokenizer=tok)
