"""LoRA training: low-rank updates on chosen linear layers, with the mask-token embedding row trained in full
(a new token has no pretrained row worth freezing).

The adapter's on-disk format (save, load, verify, merge) lives in `diffcoder.adapters`, which needs nothing from
this module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffcoder.errors import ConfigError


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


@torch.no_grad()
def merged_model(model):
    """Fold live LoRA modules back into plain linears (after training, for export)."""
    for name, m in lora_modules(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        m.base.weight += m.delta()
        setattr(parent, name.rsplit(".", 1)[1], m.base)
    return model
