"""Each attention mask of `diffcoder.masks` against the rule of docs/design.md, read one (query, key) pair at a
time; the flex_attention forms against the dense masks (eager flex_attention on the CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from diffcoder.masks import (
    block_causal_flex_mask,
    block_causal_mask,
    block_causal_mask_mod,
    canvas_attention_mask,
    two_stream_flex_mask,
    two_stream_mask,
    two_stream_mask_mod,
)


def rule_block_causal(positions_q: list[int], positions_k: list[int], B: int) -> torch.Tensor:
    """Query i may attend key j iff key j's block is not after query i's block."""
    return torch.tensor([[kj // B <= qi // B for kj in positions_k] for qi in positions_q])


def rule_two_stream(L: int, B: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for qi in range(2 * L):
        q_noisy, qb = qi < L, (qi % L) // B
        for ki in range(2 * L):
            k_noisy, kb = ki < L, (ki % L) // B
            if q_noisy:  # its own noisy block, and the clean blocks before it
                m[qi, ki] = (k_noisy and kb == qb) or (not k_noisy and kb < qb)
            else:  # clean stream: block-causal over the clean stream only
                m[qi, ki] = (not k_noisy) and kb <= qb
    return m


@pytest.mark.parametrize("B", [1, 2, 3, 4, 8])
def test_block_causal_mask_follows_the_rule(B):
    pos = torch.arange(13)
    assert torch.equal(block_causal_mask(pos, pos, B), rule_block_causal(pos.tolist(), pos.tolist(), B))
    q = torch.arange(8, 13)  # a later block's queries against every key (what a cached step sees)
    assert torch.equal(block_causal_mask(q, pos, B), rule_block_causal(q.tolist(), pos.tolist(), B))


def test_block_causal_mask_with_block_one_is_causal():
    pos = torch.arange(9)
    assert torch.equal(block_causal_mask(pos, pos, 1), torch.ones(9, 9, dtype=torch.bool).tril())


def test_canvas_mask_hides_padding_keys_and_lets_padding_queries_see_themselves():
    B, width = 4, 12
    cols = torch.arange(width)
    pads = torch.tensor([0, 4])  # row 1 is left-padded by one block
    valid = cols[None] >= pads[:, None]
    q = torch.arange(4, width)
    got = canvas_attention_mask(q, cols, valid, B)
    assert got.shape == (2, 1, len(q), width)
    for r in range(2):
        for a, qi in enumerate(q.tolist()):
            for kj in range(width):
                want = (kj // B <= qi // B and bool(valid[r, kj])) or kj == qi
                assert bool(got[r, 0, a, kj]) == want, (r, qi, kj)


@pytest.mark.parametrize("L,B", [(4, 1), (8, 2), (12, 4), (12, 3), (16, 4), (8, 8), (16, 16)])
def test_two_stream_mask_follows_the_rule(L, B):
    assert torch.equal(two_stream_mask(L, B), rule_two_stream(L, B))


@pytest.mark.parametrize("L,B", [(12, 4), (16, 2), (8, 8)])
def test_mask_mods_equal_the_dense_masks(L, B):
    idx = torch.arange(2 * L)
    assert torch.equal(two_stream_mask_mod(L, B)(0, 0, idx[:, None], idx[None, :]), two_stream_mask(L, B))
    pos = torch.arange(L)
    assert torch.equal(block_causal_mask_mod(B)(0, 0, pos[:, None], pos[None, :]), block_causal_mask(pos, pos, B))


def _flex_vs_dense(block_mask, dense: torch.Tensor) -> None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # pragma: no cover - depends on the torch build
        pytest.skip("this torch has no flex_attention")
    n = dense.shape[-1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is the slow reference path
        try:
            got = flex_attention(q, k, v, block_mask=block_mask)
        except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover
            pytest.skip(f"flex_attention does not run on this CPU build: {exc}")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("L,B", [(128, 4), (256, 8)])
def test_two_stream_flex_mask_equals_dense(L, B):
    _flex_vs_dense(two_stream_flex_mask(L, B, "cpu"), two_stream_mask(L, B))


@pytest.mark.parametrize("L,B", [(128, 1), (256, 4)])
def test_block_causal_flex_mask_equals_dense(L, B):
    pos = torch.arange(L)
    _flex_vs_dense(block_causal_flex_mask(L, B, "cpu"), block_causal_mask(pos, pos, B))
