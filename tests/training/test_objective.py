"""The objective of docs/design.md §3, each formula checked directly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model
from diffcoder.training.objective import (
    ar_loss_sum,
    clip_block_rate,
    diffusion_loss,
    forward_diffusion,
    noisy_input,
    sample_block_noise,
    warmup_cap,
)

# The two-stream mask and its flex mask_mod are checked against their rule in tests/test_masks.py.


def test_warmup_cap_formula():
    assert warmup_cap(0, 100, 1e-3) == pytest.approx(1e-3)
    assert warmup_cap(50, 100, 1e-3) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert warmup_cap(100, 100, 1e-3) == 1.0
    assert warmup_cap(5, 0, 1e-3) == 1.0


def test_clip_block_rate():
    t = torch.tensor([0.0, 0.1, 0.25, 0.6, 1.0, 1.5])
    assert torch.allclose(clip_block_rate(t, 4), torch.tensor([0.25, 0.25, 0.25, 0.6, 1.0, 1.0]))


def expected_mask_fraction(B: int, u_max: float, n: int = 20000) -> tuple[float, float]:
    """E[u_blk] and E[masked fraction] (with the forced mask) for t ~ U(0, u_max), by quadrature."""
    ts = (torch.arange(n, dtype=torch.float64) + 0.5) / n * u_max
    u = ts.clamp(min=1 / B, max=1)
    frac = (B * u + (1 - u) ** B) / B  # i.i.d. masks plus one forced when none was drawn
    return u.mean().item(), frac.mean().item()


@pytest.mark.parametrize("B,u_max", [(4, 1.0), (2, 1.0), (8, 1.0), (4, 0.4)])
def test_schedule_statistics(B, u_max):
    g = torch.Generator().manual_seed(0)
    n_rows, L = 512, 64
    elig = torch.ones(n_rows, L, dtype=torch.bool)
    noise = sample_block_noise(elig, B, u_max=u_max, generator=g)
    per_block = noise.masked.view(n_rows, L // B, B).sum(-1)
    assert (per_block >= 1).all()  # every block carries a supervised token
    assert (noise.rate >= 1 / B - 1e-7).all() and (noise.rate <= 1).all()
    assert (noise.t <= u_max).all() and (noise.t >= 0).all()
    # weight is 1/u_blk on masked positions and 0 elsewhere
    w_expect = (1 / noise.rate).repeat_interleave(B, -1) * noise.masked
    assert torch.allclose(noise.weight, w_expect)
    assert noise.weight.max() <= B + 1e-5
    e_rate, e_frac = expected_mask_fraction(B, u_max)
    assert noise.rate.mean().item() == pytest.approx(e_rate, abs=0.01)
    assert noise.masked.float().mean().item() == pytest.approx(e_frac, abs=0.01)


def test_warmup_caps_t_and_uses_unit_weights():
    g = torch.Generator().manual_seed(1)
    u_max = warmup_cap(10, 100, 1e-3)
    elig = torch.ones(256, 32, dtype=torch.bool)
    noise = sample_block_noise(elig, 4, u_max=u_max, weighted=False, generator=g)
    assert (noise.t <= u_max).all()
    assert torch.equal(noise.weight, noise.masked.float())


def test_antithetic_draws_are_stratified():
    g = torch.Generator().manual_seed(2)
    noise = sample_block_noise(torch.ones(8, 64, dtype=torch.bool), 4, generator=g, antithetic=True)
    t = noise.t.flatten().sort().values
    k = t.numel()
    # exactly one draw per stratum [i/k, (i+1)/k)
    assert torch.equal((t * k).floor().long(), torch.arange(k))


def test_ineligible_tokens_never_masked_and_blocks_without_eligible_get_nothing():
    g = torch.Generator().manual_seed(3)
    elig = torch.zeros(64, 16, dtype=torch.bool)
    elig[:, 6:14] = True  # an SFT-like row: prompt 0..5, response 6..13, padding after
    noise = sample_block_noise(elig, 4, generator=g)
    assert not (noise.masked & ~elig).any()
    blocks = noise.masked.view(64, 4, 4).sum(-1)
    assert (blocks[:, 1:4] >= 1).all()  # blocks holding response tokens
    assert (blocks[:, 0] == 0).all()  # a pure-prompt block


@pytest.mark.parametrize("shift", [False, True])
def test_concatenation_equals_direct_forward(shift):
    """Noisy-half logits of block b == a direct forward of x0[:start_b] ++ xt[block b] (block-causal mask)."""
    torch.manual_seed(0)
    B, L = 4, 16
    model = tiny_model(seed=0, std=0.3, dtype=torch.float64)
    x0 = torch.randint(4, 300, (2, L))
    noise = sample_block_noise(torch.ones(2, L, dtype=torch.bool), B, generator=torch.Generator().manual_seed(0))
    logits = forward_diffusion(model, x0, noise, B, mask_token_id=3)
    xt = noisy_input(x0, noise.masked, 3)
    for b in range(L // B):
        s, e = b * B, (b + 1) * B
        direct_in = torch.cat([x0[:, :s], xt[:, s:e]], dim=1)
        pos = torch.arange(e)
        mask = block_causal_mask(pos, pos, B)[None, None]
        direct = model(direct_in, attn_mask=mask)
        assert torch.allclose(logits[:, s:e], direct[:, s:e], atol=1e-10)
        if shift and b > 0:  # the first slot is scored by the clean half's last position of block b-1
            assert torch.allclose(logits[:, L + s - 1], direct[:, s - 1], atol=1e-10)


def test_b1_all_masked_shift_is_ar_loss():
    model = tiny_model(seed=1, std=0.3, dtype=torch.float64)
    L = 12
    x0 = torch.randint(4, 300, (3, L))
    elig = torch.ones(3, L, dtype=torch.bool)
    elig[:, 0] = False  # no predictor for position 0 under shift
    noise = sample_block_noise(elig, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise.masked, elig)  # B=1: u_blk = 1, everything masked
    logits = forward_diffusion(model, x0, noise, 1, mask_token_id=3)
    loss = diffusion_loss(logits, x0, noise, elig, block_size=1, shift=True)
    ar_logits = model(x0, attn_mask=block_causal_mask(torch.arange(L), torch.arange(L), 1)[None, None])
    ar = F.cross_entropy(ar_logits[:, :-1].flatten(0, 1), x0[:, 1:].flatten())
    assert loss.item() == pytest.approx(ar.item(), rel=1e-10)
    assert (ar_loss_sum(ar_logits, x0, torch.ones_like(elig)) / (3 * (L - 1))).item() == pytest.approx(ar.item())


def test_loss_is_weighted_per_token_nelbo():
    """loss = sum_masked (1/u_blk) CE / #eligible, computed by hand."""
    model = tiny_model(seed=2, std=0.3, dtype=torch.float64)
    B, L = 4, 8
    x0 = torch.randint(4, 300, (2, L))
    elig = torch.ones(2, L, dtype=torch.bool)
    noise = sample_block_noise(elig, B, generator=torch.Generator().manual_seed(5))
    logits = forward_diffusion(model, x0, noise, B, mask_token_id=3)
    total = 0.0
    for r in range(2):
        for p in range(L):
            if noise.masked[r, p]:
                ce = -torch.log_softmax(logits[r, p], -1)[x0[r, p]].item()
                total += ce / noise.rate[r, p // B].item()
    got = diffusion_loss(logits, x0, noise, elig, B).item()
    assert got == pytest.approx(total / (2 * L), rel=1e-6)  # weights are float32
    assert math.isfinite(got)


def test_flex_block_mask_forward_equals_sdpa():
    """The model's flex_attention branch (used on CUDA) gives the SDPA dense-mask logits (eager flex on CPU)."""
    import warnings

    from diffcoder.masks import two_stream_flex_mask as flex_training_mask

    model = tiny_model(seed=4, std=0.3)
    B, L = 4, 32
    x0 = torch.randint(4, 300, (2, L))
    noise = sample_block_noise(torch.ones(2, L, dtype=torch.bool), B, generator=torch.Generator().manual_seed(0))
    dense = forward_diffusion(model, x0, noise, B, mask_token_id=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            flex = forward_diffusion(model, x0, noise, B, mask_token_id=3, attn_mask=flex_training_mask(L, B, "cpu"))
    assert torch.allclose(dense, flex, atol=1e-4)


def test_noisy_only_forward_equals_noisy_half():
    model = tiny_model(seed=5, std=0.3, dtype=torch.float64)
    x0 = torch.randint(4, 300, (2, 16))
    noise = sample_block_noise(torch.ones(2, 16, dtype=torch.bool), 4, generator=torch.Generator().manual_seed(1))
    full = forward_diffusion(model, x0, noise, 4, mask_token_id=3)
    half = forward_diffusion(model, x0, noise, 4, mask_token_id=3, noisy_only=True)
    assert torch.allclose(full[:, :16], half, atol=1e-12)
    elig = torch.ones(2, 16, dtype=torch.bool)
    assert diffusion_loss(full, x0, noise, elig, 4).item() == pytest.approx(diffusion_loss(half, x0, noise, elig, 4).item())
