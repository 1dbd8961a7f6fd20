"""The optimizer's side of the embedding rows that LoRA trains in full (the new tokens).

`apply_lora` leaves the embedding weight trainable with a hook that zeroes every other row's gradient. Handing
that whole [V, H] weight to AdamW would keep two [V, H] moment buffers and update V rows each step for the few
that change; `TokenRows` gives AdamW a [k, H] parameter instead: the gradient rows are taken from the embedding's
gradient after backward, and the updated rows are written back after the step (so the embedding, and a tied head,
always hold the current values for the forward, evaluation and the adapter files).
"""

from __future__ import annotations

import torch
from torch import nn


class TokenRows:
    def __init__(self, weight: nn.Parameter, rows: list[int]):
        self.weight = weight
        self.index = torch.tensor(rows, dtype=torch.long, device=weight.device)
        self.param = nn.Parameter(weight.detach().index_select(0, self.index).clone())

    def take_grad(self) -> None:
        """Move the trained rows' gradient from the embedding to `param` (call after backward)."""
        g = self.weight.grad
        self.param.grad = None if g is None else g.index_select(0, self.index)
        self.weight.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy `param` into the embedding rows (call after the optimizer step)."""
        self.weight.index_copy_(0, self.index, self.param.to(self.weight.dtype))

    @torch.no_grad()
    def read_weight(self) -> None:
        """Take the rows from the embedding (after weights were loaded into it, e.g. on resume)."""
        self.param.copy_(self.weight.index_select(0, self.index))
