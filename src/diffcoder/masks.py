"""Every attention mask of the project, in one place. True = the query may attend the key.

- `block_causal_mask`: the model's attention at inference (docs/design.md §1.3): key j is visible to query i iff
  j // B <= i // B over absolute positions. B = 1 is plain causal attention.
- `canvas_attention_mask`: the same rule over the decoder's left-padded canvas, with padding keys hidden.
- `two_stream_mask`: the training mask over the concatenation `[xt ; x0]` (docs/design.md §3.1).
- `two_stream_mask_mod`, `two_stream_flex_mask`, `block_causal_flex_mask`: the flex_attention forms of the
  above (BlockMasks built once per shape and reused), for CUDA; SDPA takes the dense masks everywhere else.
"""

from __future__ import annotations

from typing import Any

import torch


def block_causal_mask(positions_q: torch.Tensor, positions_k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Query at position i may attend key at position j iff j // B <= i // B (docs/design.md §1.3). B=1 is causal.

    positions_q: [..., q], positions_k: [..., k] (absolute positions). Returns bool [..., q, k].
    """
    return (positions_k[..., None, :] // block_size) <= (positions_q[..., :, None] // block_size)


def canvas_attention_mask(
    q_cols: torch.Tensor, k_cols: torch.Tensor, valid: torch.Tensor, block: int
) -> torch.Tensor:
    """Bool [rows, 1, q, k]: block-causal over canvas columns, only real (valid) keys; padding queries see
    themselves so no row of the softmax is empty. Columns equal positions up to a per-row multiple of `block`."""
    mask = block_causal_mask(q_cols, k_cols, block)[None] & valid[:, None, : len(k_cols)]
    return (mask | (q_cols[:, None] == k_cols[None, :])[None])[:, None]


def two_stream_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [2L, 2L] over `[xt ; x0]` (docs/design.md §3.1).

    noisy query in block b -> noisy keys in block b and clean keys in blocks < b;
    clean query in block b -> clean keys in blocks <= b; nothing else.
    """
    blk = torch.arange(seq_len, device=device) // block_size
    bq, bk = blk[:, None], blk[None, :]
    top = torch.cat([bq == bk, bk < bq], dim=1)
    bottom = torch.cat([torch.zeros_like(top[:, :seq_len]), bk <= bq], dim=1)
    return torch.cat([top, bottom], dim=0)


def two_stream_mask_mod(seq_len: int, block_size: int):
    """`two_stream_mask` as a flex_attention `mask_mod(b, h, q_idx, kv_idx)`."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, k_noisy = q_idx < seq_len, kv_idx < seq_len
        bq = torch.where(q_noisy, q_idx, q_idx - seq_len) // block_size
        bk = torch.where(k_noisy, kv_idx, kv_idx - seq_len) // block_size
        noisy_q = q_noisy & ((k_noisy & (bk == bq)) | (~k_noisy & (bk < bq)))
        clean_q = ~q_noisy & ~k_noisy & (bk <= bq)
        return noisy_q | clean_q

    return mask_mod


def block_causal_mask_mod(block_size: int):
    """`block_causal_mask` over positions 0..L-1 as a flex_attention `mask_mod`."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // block_size <= q_idx // block_size

    return mask_mod


_FLEX_MASKS: dict[tuple, Any] = {}


def _cached_block_mask(key: tuple, mask_mod, length: int, device: torch.device | str):
    # Building a BlockMask walks the whole [L, L] grid: do it once per shape and reuse it every step.
    if key not in _FLEX_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        _FLEX_MASKS[key] = create_block_mask(mask_mod, None, None, length, length, device=device)
    return _FLEX_MASKS[key]


def two_stream_flex_mask(seq_len: int, block_size: int, device: torch.device | str):
    """A flex_attention BlockMask for `two_stream_mask` over a sequence of 2 * seq_len, built once and reused."""
    key = ("two_stream", seq_len, block_size, str(device))
    return _cached_block_mask(key, two_stream_mask_mod(seq_len, block_size), 2 * seq_len, device)


def block_causal_flex_mask(seq_len: int, block_size: int, device: torch.device | str):
    """A flex_attention BlockMask for `block_causal_mask` over positions 0..seq_len-1 (B=1: causal)."""
    key = ("block_causal", seq_len, block_size, str(device))
    return _cached_block_mask(key, block_causal_mask_mod(block_size), seq_len, device)
