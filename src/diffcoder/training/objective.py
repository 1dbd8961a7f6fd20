"""The block-diffusion training objective (docs/design.md §3), as small pure functions over tensors.

A packed row of clean tokens `x0` (length L) is noised block by block into `xt`; the model runs once on
`[xt ; x0]` (length 2L, position ids 0..L-1 twice) under `masks.two_stream_mask`, which makes that one forward
equal to L/B independent block-diffusion problems, each seeing exactly what it sees at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffcoder.masks import two_stream_mask

# The NELBO's pieces (noise, scored rows, the chunked head loss) live in diffcoder.nelbo, shared with the
# held-out evaluation; they are re-exported here because the objective is where a reader looks for them.
from diffcoder.nelbo import BlockNoise as BlockNoise
from diffcoder.nelbo import ScoredRows as ScoredRows
from diffcoder.nelbo import ar_scored_rows as ar_scored_rows
from diffcoder.nelbo import clip_block_rate as clip_block_rate
from diffcoder.nelbo import concat_inputs as concat_inputs
from diffcoder.nelbo import diffusion_scored_rows as diffusion_scored_rows
from diffcoder.nelbo import forward_diffusion_hidden as forward_diffusion_hidden
from diffcoder.nelbo import head_loss_sum as head_loss_sum
from diffcoder.nelbo import logits_loss_sum as logits_loss_sum
from diffcoder.nelbo import noisy_input as noisy_input
from diffcoder.nelbo import sample_block_noise as sample_block_noise
from diffcoder.nelbo import shift_eligible as shift_eligible
from diffcoder.nelbo import two_stream_position_ids


def warmup_cap(step: int, warmup_steps: int, u_init: float = 1e-3) -> float:
    """u_max(s) = u_init + (1 - u_init) * s / S_warmup during warmup, then 1 (docs/design.md §3.4)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return u_init + (1.0 - u_init) * step / warmup_steps


def diffusion_logits_for_targets(logits: torch.Tensor, block_size: int, shift: bool) -> torch.Tensor:
    """From logits over `[xt ; x0]` ([N, 2L, V]) pick the logits that score each target position ([N, L, V]).

    shift=False: the noisy half at the same position. shift=True: the logits at position i-1 score token i —
    inside a block from the noisy half; a block's first slot from the clean half's last position of the block
    before it (exactly what inference computes for it). Position 0 has no predictor under shift (its row is
    returned as the clean half's position 0 and must be excluded by the caller, see `shift_eligible`).
    """
    length = logits.shape[1] // 2
    noisy, clean = logits[:, :length], logits[:, length:]
    if not shift:
        return noisy
    prev_noisy = torch.cat([noisy[:, :1], noisy[:, :-1]], dim=1)
    prev_clean = torch.cat([clean[:, :1], clean[:, :-1]], dim=1)
    first = (torch.arange(length, device=logits.device) % block_size == 0)[None, :, None]
    return torch.where(first, prev_clean, prev_noisy)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in at least float32 (bf16 logits lose too much in log-softmax)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def diffusion_loss_sum(
    logits: torch.Tensor, x0: torch.Tensor, noise: BlockNoise, block_size: int, shift: bool
) -> torch.Tensor:
    """Sum over masked positions of w * CE(target). Divide by the count of loss-eligible tokens of the *whole*
    optimizer batch (all micro-batches, all ranks) to get the per-token NELBO (see `diffusion_loss`)."""
    # logits may be [N, 2L, V] over [xt ; x0], or (shift=False) the noisy half alone [N, L, V]
    scoring = logits if logits.shape[1] == x0.shape[1] else diffusion_logits_for_targets(logits, block_size, shift)
    ce = F.cross_entropy(_upcast(scoring).flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    return (ce * noise.weight).sum()


def diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    noise: BlockNoise,
    eligible: torch.Tensor,
    block_size: int,
    shift: bool = False,
) -> torch.Tensor:
    """Per-token NELBO of one batch: sum of w * CE on masked positions / number of loss-eligible tokens."""
    return diffusion_loss_sum(logits, x0, noise, block_size, shift) / eligible.sum().clamp(min=1)


def ar_loss_sum(logits: torch.Tensor, x0: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy summed over eligible targets (positions >= 1); logits [N, L, V]."""
    ce = F.cross_entropy(_upcast(logits[:, :-1]).flatten(0, 1), x0[:, 1:].flatten(), reduction="none")
    return (ce.view(x0.shape[0], -1) * eligible[:, 1:]).sum()


def forward_diffusion(
    model,
    x0: torch.Tensor,
    noise: BlockNoise,
    block_size: int,
    mask_token_id: int,
    attn_mask=None,
    noisy_only: bool = False,
) -> torch.Tensor:
    """Run the model on `[xt ; x0]` with duplicated positions and the training mask; returns logits [N, 2L, V],
    or with noisy_only (enough for shift=False) only the noisy half [N, L, V], skipping half the LM head."""
    n, length = x0.shape
    if attn_mask is None:
        attn_mask = two_stream_mask(length, block_size, x0.device)[None, None]
    pos = two_stream_position_ids(length, x0.device)[None].expand(n, -1)
    inputs = concat_inputs(x0, noise.masked, mask_token_id)
    if noisy_only:
        return model.lm_head(model.hidden_states(inputs, pos, attn_mask)[:, :length])
    return model(inputs, position_ids=pos, attn_mask=attn_mask)


