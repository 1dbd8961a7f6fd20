"""LoRA training: low-rank updates on chosen linear layers, with the mask-token embedding row trained in full
(a new token has no pretrained row worth freezing).

The adapter's on-disk format (save, load, verify, merge) lives in `diffcoder.adapters`, which needs nothing from
this module.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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


def apply_lora(model, lora_cfg, train_mask_row: int | None = None) -> None:
    """Freeze the model, wrap the target linears with LoRA, and let only the mask row of the embedding learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(lora_cfg.targets)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout))
    if train_mask_row is not None:
        emb = model.model.embed_tokens.weight
        emb.requires_grad_(True)
        keep = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        keep[train_mask_row] = 1
        emb.register_hook(lambda g: g * keep)  # every other row stays exactly the base's
    model._lora_config = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
                          "dropout": lora_cfg.dropout}


@torch.no_grad()
def merged_model(model):
    """Fold live LoRA modules back into plain linears (after training, for export)."""
    for name, m in lora_modules(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        m.base.weight += m.delta()
        setattr(parent, name.rsplit(".", 1)[1], m.base)
    return model
