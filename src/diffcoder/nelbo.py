"""The diffusion NELBO (docs/design.md §3.2, §3.3, §3.6): the per-block noise, which hidden rows score which
tokens, and the weighted cross-entropy, shared by the training objective, the trainer's held-out `eval_nelbo`
and `diffcoder eval likelihood`.

Scoring (both evaluations) suppresses the mask token's logit, which is never a valid prediction (§1.4); the
training loss keeps the plain cross-entropy of §3.3. The held-out number is the NELBO on a fixed grid of noise
levels t (midpoints of (0, 1]) with masks drawn from a fixed seed, so two checkpoints, or the trainer and the
command line, are scored on the same footing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from diffcoder.errors import ConfigError
from diffcoder.head_loss import linear_cross_entropy
from diffcoder.masks import two_stream_mask

EVAL_NOISE_SEED = 0  # masks of the held-out NELBO (the `eval likelihood --seed` default)


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

    def rows(self, sl: slice) -> BlockNoise:
        """The noise of rows `sl` (a micro-batch)."""
        return replace(self, masked=self.masked[sl], weight=self.weight[sl], t=self.t[sl], rate=self.rate[sl])


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
    uniformly chosen eligible position when a block got none (docs/design.md §3.2).

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


def two_stream_position_ids(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids [2L]: 0..L-1 for the noisy half and again for the clean half."""
    pos = torch.arange(seq_len, device=device)
    return torch.cat([pos, pos])


def shift_eligible(eligible: torch.Tensor, shift: bool) -> torch.Tensor:
    """Under shift the first token of a row has no predictor: it can be neither noised nor scored."""
    if not shift:
        return eligible
    out = eligible.clone()
    out[:, 0] = False
    return out


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
    pos = two_stream_position_ids(length, x0.device)[None].expand(n, -1)
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
    chunks (see `head_loss.linear_cross_entropy`; chunk_rows, grad_rows, compiled, suppress_id pass through)."""
    h = hidden.flatten(0, 1).index_select(0, scored.hidden_rows)
    targets = x0.flatten().index_select(0, scored.target_pos)
    return linear_cross_entropy(h, head_weight, targets, row_weights, **chunk_kw)


def logits_loss_sum(logits: torch.Tensor, x0: torch.Tensor, scored: ScoredRows, row_weights: torch.Tensor,
                    suppress_id: int | None = None) -> torch.Tensor:
    """The same sum from full logits [N, S, V] (FSDP runs the model's own forward); upcasts the scored rows only."""
    picked = logits.flatten(0, 1).index_select(0, scored.hidden_rows)
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # bf16 loses too much in log-softmax
    if suppress_id is not None:
        picked = picked.index_fill(-1, torch.tensor([suppress_id], device=picked.device), -torch.inf)
    targets = x0.flatten().index_select(0, scored.target_pos)
    ce = F.cross_entropy(picked, targets, reduction="none")
    return (ce * row_weights).sum()


def t_grid(points: int) -> list[float]:
    """Midpoints of `points` equal slices of (0, 1]: the fixed quadrature grid of the held-out NELBO."""
    if points < 1:
        raise ConfigError(f"the t grid needs at least one point, got {points}")
    return [(k + 0.5) / points for k in range(points)]


def grid_noise(eligible: torch.Tensor, block_size: int, t: float, t_index: int, seed: int = EVAL_NOISE_SEED
               ) -> BlockNoise:
    """The held-out noise at grid point t: every block at rate u = clip(t), drawn from (seed, t_index) over the
    whole evaluation set at once, so the masks do not depend on how the rows are later split into batches."""
    n, length = eligible.shape
    gen = torch.Generator().manual_seed(seed * 1_000_003 + t_index)
    return sample_block_noise(eligible, block_size, generator=gen,
                              t=torch.full((n, length // block_size), t, device=eligible.device))


@torch.no_grad()
def nelbo_loss_sum(model, x0: torch.Tensor, noise: BlockNoise, block_size: int, shift: bool, mask_token_id: int,
                   attn_mask=None, chunk_rows: int | None = None) -> torch.Tensor:
    """Scoring: sum over masked tokens of w * CE, the mask token's logit suppressed, from one forward on
    `[xt ; x0]`; the LM head runs on the scored rows only, in chunks."""
    dev = model.lm_head.weight.device
    x0, masked = x0.to(dev), noise.masked.to(dev)
    scored = diffusion_scored_rows(noise.masked.cpu(), block_size, shift).to(dev)
    weights = noise.weight.flatten().to(dev).index_select(0, scored.target_pos)
    hidden = forward_diffusion_hidden(model, x0, masked, block_size, mask_token_id, attn_mask)
    return head_loss_sum(hidden, model.lm_head.weight, x0, scored, weights, chunk_rows=chunk_rows,
                         suppress_id=mask_token_id)


@torch.no_grad()
def diffusion_nelbo(
    loss_sum: Callable[[torch.Tensor, BlockNoise], torch.Tensor],
    x0: torch.Tensor,
    eligible: torch.Tensor,
    block_size: int,
    shift: bool,
    t_points: int,
    batch_size: int,
    seed: int = EVAL_NOISE_SEED,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """(NELBO summed over the loss-eligible tokens of x0 and averaged over the t grid, their count).

    `loss_sum(x0_batch, noise_batch)` scores one batch of rows (`nelbo_loss_sum` with the model, or the
    trainer's own forward, which places the same computation on its devices). Divide the first value by the
    second for the per-token NELBO. The sum stays a tensor on the scoring device, so the loop never waits."""
    eligible = shift_eligible(eligible, shift)
    total = None
    for j, t in enumerate(t_grid(t_points)):
        noise = grid_noise(eligible, block_size, t, j, seed)
        for lo in range(0, x0.shape[0], batch_size):
            sl = slice(lo, lo + batch_size)
            part = loss_sum(x0[sl], noise.rows(sl)).to(torch.float64)
            total = part if total is None else total + part
            if progress is not None:
                progress(1)
    return total / t_points, int(eligible.sum())
