"""The block-diffusion training objective (DESIGN §3), as small pure functions over tensors.

A packed row of clean tokens `x0` (length L) is noised block by block into `xt`; the model runs once on
`[xt ; x0]` (length 2L, position ids 0..L-1 twice) under `masks.two_stream_mask`, which makes that one forward
equal to L/B independent block-diffusion problems, each seeing exactly what it sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffcoder.errors import ConfigError
from diffcoder.masks import two_stream_mask


def training_position_ids(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids [2L]: 0..L-1 for the noisy half and again for the clean half."""
    pos = torch.arange(seq_len, device=device)
    return torch.cat([pos, pos])


def warmup_cap(step: int, warmup_steps: int, u_init: float = 1e-3) -> float:
    """u_max(s) = u_init + (1 - u_init) * s / S_warmup during warmup, then 1 (DESIGN §3)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return u_init + (1.0 - u_init) * step / warmup_steps


def clip_block_rate(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-wise clipping: u_blk = min(1, max(t, 1/B))."""
    return t.clamp(min=1.0 / block_size, max=1.0)


@dataclass
class BlockNoise:
    """One draw of the per-block noise for a batch of rows."""

    masked: torch.Tensor  # bool [N, L]: positions replaced by the mask token (all loss-eligible)
    weight: torch.Tensor  # float [N, L]: loss weight per position (1/u_blk, or 1 in warmup); 0 where not masked
    t: torch.Tensor  # float [N, n_blocks]: the raw draw t ~ U(0, u_max)
    rate: torch.Tensor  # float [N, n_blocks]: the clipped mask rate u_blk


def sample_block_noise(
    eligible: torch.Tensor,
    block_size: int,
    u_max: float = 1.0,
    weighted: bool = True,
    generator: torch.Generator | None = None,
    antithetic: bool = False,
    t: torch.Tensor | None = None,
) -> BlockNoise:
    """Per-block t ~ U(0, u_max), u_blk = clip, mask each eligible token i.i.d. with prob u_blk, and force one
    uniformly chosen eligible position when a block got none (DESIGN §3).

    eligible: bool [N, L] (L a multiple of B) — tokens that may be noised and scored (all of a CPT row; the
    response and trailing EOS of an SFT row). Blocks with no eligible token get no mask and no loss.
    `t` ([N, n_blocks]) overrides the draw (used for the fixed-grid evaluation).
    """
    n, length = eligible.shape
    if length % block_size:
        raise ConfigError(f"sequence length {length} is not a multiple of block_size {block_size}")
    nb = length // block_size
    dev = eligible.device
    if t is None:
        if antithetic:  # stratified over the whole batch: one uniform offset, evenly spaced draws, shuffled
            k = n * nb
            u = (torch.rand(1, generator=generator) + torch.arange(k) / k) % 1.0
            u = u[torch.randperm(k, generator=generator)]
        else:
            u = torch.rand(n * nb, generator=generator)
        t = (u * u_max).view(n, nb).to(dev)
    rate = clip_block_rate(t, block_size)
    coin = torch.rand(n, length, generator=generator).to(dev)
    elig_b = eligible.view(n, nb, block_size)
    masked = (coin.view(n, nb, block_size) < rate[..., None]) & elig_b
    # Force one mask in blocks that have eligible tokens but drew none: pick uniformly among eligible slots.
    need = elig_b.any(-1) & ~masked.any(-1)
    score = torch.rand(n, nb, block_size, generator=generator).to(dev).masked_fill(~elig_b, -1.0)
    forced = F.one_hot(score.argmax(-1), block_size).bool() & need[..., None]
    masked = (masked | forced).view(n, length)
    w_blk = (1.0 / rate) if weighted else torch.ones_like(rate)
    weight = w_blk.repeat_interleave(block_size, dim=-1) * masked
    return BlockNoise(masked=masked, weight=weight, t=t, rate=rate)


def noisy_input(x0: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(x0, mask_token_id), x0)


def concat_inputs(x0: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """`[xt ; x0]` as [N, 2L]."""
    return torch.cat([noisy_input(x0, masked, mask_token_id), x0], dim=1)


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


def shift_eligible(eligible: torch.Tensor, shift: bool) -> torch.Tensor:
    """Under shift the first token of a row has no predictor: it can be neither noised nor scored."""
    if not shift:
        return eligible
    out = eligible.clone()
    out[:, 0] = False
    return out


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
    pos = training_position_ids(length, x0.device)[None].expand(n, -1)
    inputs = concat_inputs(x0, noise.masked, mask_token_id)
    if noisy_only:
        return model.lm_head(model.hidden_states(inputs, pos, attn_mask)[:, :length])
    return model(inputs, position_ids=pos, attn_mask=attn_mask)


@dataclass
class ScoredRows:
    """Which positions are scored, as flat indices: row `hidden_rows[k]` of the model's flattened hidden states
    (over `[xt ; x0]` for diffusion, over x0 for AR) predicts token `target_pos[k]` of the flattened x0.

    Built on the CPU copy of the mask (`nonzero` on a device tensor would wait for the device), then moved."""

    hidden_rows: torch.Tensor
    target_pos: torch.Tensor

    def to(self, device: torch.device | str) -> ScoredRows:
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if torch.device(device).type == "cuda" \
            else (lambda t: t.to(device))
        return ScoredRows(move(self.hidden_rows), move(self.target_pos))


def diffusion_scored_rows(masked: torch.Tensor, block_size: int, shift: bool) -> ScoredRows:
    """The masked positions of x0 ([N, L]) and the rows of the [N, 2L] hidden states over `[xt ; x0]` that score
    them: shift=False the noisy half at the same position; shift=True the noisy half at i-1 inside a block and the
    clean half's i-1 for a block's first slot (as `diffusion_logits_for_targets`)."""
    n, length = masked.shape
    pos = masked.flatten().nonzero().flatten()
    row, i = pos // length, pos % length
    if shift:
        if bool(masked[:, 0].any()):
            raise ValueError("under shift position 0 has no predictor; mask it out with shift_eligible")
        src = torch.where(i % block_size == 0, length + i - 1, i - 1)
    else:
        src = i
    return ScoredRows(hidden_rows=row * 2 * length + src, target_pos=pos)


def ar_scored_rows(n: int, length: int) -> ScoredRows:
    """Next-token prediction: hidden row (r, i) scores token (r, i + 1), for i < L - 1."""
    i = torch.arange(length - 1)
    base = (torch.arange(n) * length)[:, None]
    return ScoredRows(hidden_rows=(base + i).flatten(), target_pos=(base + i + 1).flatten())


def forward_diffusion_hidden(
    model, x0: torch.Tensor, masked: torch.Tensor, block_size: int, mask_token_id: int, attn_mask=None
) -> torch.Tensor:
    """Final hidden states [N, 2L, H] of the model on `[xt ; x0]` (the LM head is applied to scored rows only)."""
    n, length = x0.shape
    if attn_mask is None:
        attn_mask = two_stream_mask(length, block_size, x0.device)[None, None]
    pos = training_position_ids(length, x0.device)[None].expand(n, -1)
    return model.hidden_states(concat_inputs(x0, masked, mask_token_id), pos, attn_mask)


def head_loss_sum(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    x0: torch.Tensor,
    scored: ScoredRows,
    row_weights: torch.Tensor,
    **chunk_kw,
) -> torch.Tensor:
    """sum_k row_weights[k] * CE(head(hidden row k), its target): the LM head runs on the scored rows only, in
    chunks (see `head_loss.linear_cross_entropy`; chunk_rows, grad_rows, compiled pass through)."""
    from diffcoder.training.head_loss import linear_cross_entropy

    h = hidden.flatten(0, 1).index_select(0, scored.hidden_rows)
    targets = x0.flatten().index_select(0, scored.target_pos)
    return linear_cross_entropy(h, head_weight, targets, row_weights, **chunk_kw)


def logits_loss_sum(logits: torch.Tensor, x0: torch.Tensor, scored: ScoredRows, row_weights: torch.Tensor
                    ) -> torch.Tensor:
    """The same sum from full logits [N, S, V] (FSDP runs the model's own forward); upcasts the scored rows only."""
    picked = logits.flatten(0, 1).index_select(0, scored.hidden_rows)
    targets = x0.flatten().index_select(0, scored.target_pos)
    ce = F.cross_entropy(_upcast(picked), targets, reduction="none")
    return (ce * row_weights).sum()


def eval_time_grid(n_points: int) -> list[float]:
    """Midpoints of n equal bins of (0, 1]: a fixed quadrature grid for the held-out NELBO."""
    return [(i + 0.5) / n_points for i in range(n_points)]
