"""One micro-batch's loss, on the device without waiting for it.

Everything data-dependent (which positions are masked, where their scoring rows are) is computed on the CPU from
the CPU noise before the micro-batch loop and moved once (pinned, non-blocking on CUDA), so the loop itself never
synchronises with the device: no `.item()`, no `nonzero()` on device tensors, no branches on device values.
The LM head runs only on the scored rows, in chunks (`head_loss.linear_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcoder.masks import block_causal_flex_mask, block_causal_mask, two_stream_flex_mask, two_stream_mask
from diffcoder.nelbo import (
    BlockNoise,
    ScoredRows,
    ar_scored_rows,
    concat_inputs,
    diffusion_scored_rows,
    forward_diffusion_hidden,
    head_loss_sum,
    logits_loss_sum,
    two_stream_position_ids,
)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class MicroBatch:
    x0: torch.Tensor  # [n, L] clean tokens
    masked: torch.Tensor | None  # [n, L] diffusion masks; None for AR
    scored: ScoredRows  # which hidden rows score which tokens
    row_weights: torch.Tensor  # [M] loss weight of each scored row


def diffusion_micro_batches(x0: torch.Tensor, noise: BlockNoise, slices: list[slice], block_size: int, shift: bool,
                            device: torch.device) -> list[MicroBatch]:
    out = []
    for sl in slices:
        scored = diffusion_scored_rows(noise.masked[sl], block_size, shift)
        weights = noise.weight[sl].flatten().index_select(0, scored.target_pos)
        out.append(MicroBatch(to_device(x0[sl], device), to_device(noise.masked[sl], device), scored.to(device),
                              to_device(weights, device)))
    return out


def ar_micro_batches(x0: torch.Tensor, eligible: torch.Tensor, slices: list[slice],
                     device: torch.device) -> list[MicroBatch]:
    out = []
    for sl in slices:
        scored = ar_scored_rows(*x0[sl].shape)
        weights = eligible[sl].flatten().index_select(0, scored.target_pos).float()
        out.append(MicroBatch(to_device(x0[sl], device), None, scored.to(device), to_device(weights, device)))
    return out


class MicroBatchLoss:
    """sum of w * CE over a micro-batch's scored rows (divide by the optimizer batch's eligible-token count).

    head_grad_rows: LoRA with a tied head trains only these rows of it (the new tokens), so only their weight
    gradient is computed. full_logits: run the model's own forward and score its logits (FSDP gathers the root's
    embedding and head only in that forward)."""

    def __init__(self, model, block_size: int, mask_token_id: int | None, device: torch.device,
                 chunk_rows: int | None = None, compiled: bool = False,
                 head_grad_rows: torch.Tensor | None = None, full_logits: bool = False):
        self.model, self.block_size, self.mask_id, self.device = model, block_size, mask_token_id, device
        self.chunk_kw = {"chunk_rows": chunk_rows, "compiled": compiled, "grad_rows": head_grad_rows}
        self.full_logits = full_logits
        self._masks: dict[tuple[str, int], object] = {}

    def diffusion_mask(self, seq_len: int):
        key = ("diffusion", seq_len)
        if key not in self._masks:
            self._masks[key] = (two_stream_flex_mask(seq_len, self.block_size, self.device) if self.device.type == "cuda"
                                else two_stream_mask(seq_len, self.block_size, self.device)[None, None])
        return self._masks[key]

    def causal_mask(self, seq_len: int):
        key = ("causal", seq_len)
        if key not in self._masks:
            if self.device.type == "cuda":  # flex_attention: the causal mask without a dense [L, L] tensor
                self._masks[key] = block_causal_flex_mask(seq_len, 1, self.device)
            else:
                pos = torch.arange(seq_len, device=self.device)
                self._masks[key] = block_causal_mask(pos, pos, 1)[None, None]
        return self._masks[key]

    def __call__(self, mb: MicroBatch, suppress_id: int | None = None) -> torch.Tensor:
        """The micro-batch's loss sum; `suppress_id` (scoring only) removes that token's logit first."""
        n, length = mb.x0.shape
        if mb.masked is not None:
            mask = self.diffusion_mask(length)
            if self.full_logits:
                inputs = concat_inputs(mb.x0, mb.masked, self.mask_id)
                pos = two_stream_position_ids(length, self.device)[None].expand(n, -1)
                return logits_loss_sum(self.model(inputs, position_ids=pos, attn_mask=mask), mb.x0, mb.scored,
                                       mb.row_weights, suppress_id)
            hidden = forward_diffusion_hidden(self.model, mb.x0, mb.masked, self.block_size, self.mask_id, mask)
        else:
            mask = self.causal_mask(length)
            if self.full_logits:
                return logits_loss_sum(self.model(mb.x0, attn_mask=mask), mb.x0, mb.scored, mb.row_weights,
                                       suppress_id)
            pos = torch.arange(length, device=self.device)[None].expand(n, -1)
            hidden = self.model.hidden_states(mb.x0, pos, mask)
        return head_loss_sum(hidden, self.model.lm_head.weight, mb.x0, mb.scored, mb.row_weights,
                             suppress_id=suppress_id, **self.chunk_kw)
