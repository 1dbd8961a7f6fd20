"""The chunked LM head + cross-entropy equals the plain full-logits loss (values and gradients, float64), and the
trainer built on it trains exactly like the full-logits loop it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import base_overrides

from diffcoder.head_loss import default_chunk_rows, linear_cross_entropy
from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model
from diffcoder.training.config import load_config
from diffcoder.training.objective import (
    ar_loss_sum,
    ar_scored_rows,
    diffusion_loss_sum,
    diffusion_scored_rows,
    forward_diffusion,
    forward_diffusion_hidden,
    head_loss_sum,
    sample_block_noise,
    shift_eligible,
    warmup_cap,
)


def plain_loss(h, w, t, rw):
    return (F.cross_entropy(h @ w.t(), t, reduction="none") * rw).sum()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 64])
def test_linear_cross_entropy_equals_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    M, H, V = 50, 16, 97
    h = torch.randn(M, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (M,), generator=g)
    rw = torch.rand(M, generator=g, dtype=torch.float64) * 4
    want = plain_loss(h, w, t, rw)
    got = linear_cross_entropy(h, w, t, rw, chunk_rows=chunk)
    assert got.item() == pytest.approx(want.item(), rel=1e-13)
    for a, b in zip(grads(3.0 * got, h, w), grads(3.0 * want, h, w)):  # the upstream gradient is applied
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_grad_rows_restricts_the_weight_gradient():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (20,), generator=g)
    rw = torch.ones(20, dtype=torch.float64)
    rows = torch.tensor([4, 29])
    gh, gw = grads(linear_cross_entropy(h, w, t, rw, chunk_rows=6, grad_rows=rows), h, w)
    want_h, want_w = grads(plain_loss(h, w, t, rw), h, w)
    assert torch.allclose(gh, want_h, rtol=1e-11)
    assert torch.allclose(gw[rows], want_w[rows], rtol=1e-11)
    others = torch.ones(30, dtype=torch.bool)
    others[rows] = False
    assert torch.count_nonzero(gw[others]) == 0


def test_no_grad_and_empty_selection():
    w = torch.randn(10, 4, requires_grad=True)
    with torch.no_grad():
        assert linear_cross_entropy(torch.randn(3, 4), w, torch.tensor([1, 2, 3]), torch.ones(3)).item() > 0
    h = torch.zeros(0, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(w.grad) == 0


def test_autocast_bf16_upcasts_per_chunk():
    """Under autocast the matmuls run in bf16 and the softmax in float32: close to the float32 loss."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = (torch.randn(500, 32, generator=g) * 0.2).requires_grad_(True)
    t = torch.randint(0, 500, (40,), generator=g)
    rw = torch.ones(40)
    want = plain_loss(h, w, t, rw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t, rw, chunk_rows=16)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    gh, gw = grads(got, h, w)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert torch.allclose(gh, grads(want, h, w)[0], atol=5e-2)


def test_default_chunk_rows_budget():
    assert default_chunk_rows(49152) * 49152 * 4 <= 256 << 20
    assert default_chunk_rows(49152) % 64 == 0 and default_chunk_rows(10**9) == 64


@pytest.mark.parametrize("shift", [False, True])
def test_diffusion_head_loss_equals_full_logits(shift):
    """Loss and every parameter gradient of the chunked, scored-rows-only path equal the full-logits loss."""
    torch.manual_seed(0)
    B, L = 4, 16
    model = tiny_model(seed=3, std=0.3, dtype=torch.float64).train()
    x0 = torch.randint(4, 300, (3, L))
    elig = shift_eligible(torch.ones(3, L, dtype=torch.bool), shift)
    elig[2, 9:] = False  # an SFT-like row: padding is neither noised nor scored
    noise = sample_block_noise(elig, B, generator=torch.Generator().manual_seed(4))
    want = diffusion_loss_sum(forward_diffusion(model, x0, noise, B, mask_token_id=3), x0, noise, B, shift)
    want_grads = grads(want, *model.parameters())
    scored = diffusion_scored_rows(noise.masked, B, shift)
    assert scored.target_pos.numel() == int(noise.masked.sum())
    hidden = forward_diffusion_hidden(model, x0, noise.masked, B, mask_token_id=3)
    rw = noise.weight.flatten()[scored.target_pos]
    got = head_loss_sum(hidden, model.lm_head.weight, x0, scored, rw, chunk_rows=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(grads(got, *model.parameters()), want_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_ar_head_loss_equals_full_logits():
    model = tiny_model(seed=5, std=0.3, dtype=torch.float64).train()
    n, L = 3, 12
    x0 = torch.randint(4, 300, (n, L))
    elig = torch.rand(n, L, generator=torch.Generator().manual_seed(0)) > 0.3
    pos = torch.arange(L)
    causal = block_causal_mask(pos, pos, 1)[None, None]
    want = ar_loss_sum(model(x0, attn_mask=causal), x0, elig)
    scored = ar_scored_rows(n, L)
    hidden = model.hidden_states(x0, pos[None].expand(n, -1), causal)
    got = head_loss_sum(hidden, model.lm_head.weight, x0, scored, elig.flatten()[scored.target_pos].double(),
                        chunk_rows=7)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(grads(got, *model.parameters()), grads(want, *model.parameters())):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- trainer


def reference_run(tr, steps: int) -> dict[str, torch.Tensor]:
    """The training loop as it was before the chunked head, written out: full logits, the loss from them, AdamW
    (for-loop) over every trainable parameter (LoRA: the whole embedding, its frozen rows kept by the hook)."""
    from diffcoder.training.lora import apply_lora
    from diffcoder.training.modelio import load_start_model
    from diffcoder.training.trainer import lr_at, noise_generator

    c = tr.cfg
    model, _ = load_start_model(str(tr.base_path), dtype=torch.float64)
    model.config.block_size, model.config.shift = tr.block_size, tr.shift
    if c.lora.enabled:
        apply_lora(model, c.lora, train_token_rows=[tr.mask_id])
    else:
        model.requires_grad_(True)
    model.load_state_dict(tr.model.state_dict())
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    o = c.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2),
                            eps=o.eps, foreach=False)
    mb = c.train.micro_batch_size
    for step in range(steps):
        x0 = tr.train_rows.batch(step * tr.global_batch, tr.global_batch)
        elig = torch.ones_like(x0, dtype=torch.bool)
        diffusion = c.objective.kind == "diffusion"
        if diffusion:
            elig = shift_eligible(elig, tr.shift)
            noise = sample_block_noise(elig, tr.block_size, u_max=warmup_cap(step, c.objective.warmup_steps,
                                                                              c.objective.u_init),
                                       weighted=step >= c.objective.warmup_steps,
                                       generator=noise_generator(c.train.seed, step))
            count = int(elig.sum())
        else:
            count = int(elig[:, 1:].sum())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c)
        for a in range(c.train.grad_accum):
            sl = slice(a * mb, (a + 1) * mb)
            xb = x0[sl]
            if diffusion:
                from diffcoder.training.objective import BlockNoise

                nb = BlockNoise(noise.masked[sl], noise.weight[sl], noise.t[sl], noise.rate[sl])
                loss = diffusion_loss_sum(forward_diffusion(model, xb, nb, tr.block_size, tr.mask_id), xb, nb,
                                          tr.block_size, tr.shift)
            else:
                pos = torch.arange(xb.shape[1])
                loss = ar_loss_sum(model(xb, attn_mask=block_causal_mask(pos, pos, 1)[None, None]), xb, elig[sl])
            (loss / count).backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], o.grad_clip,
                                       foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict()


@pytest.mark.parametrize("variant", ["diffusion", "diffusion-shift", "ar", "diffusion-lora"])
def test_trainer_matches_the_full_logits_loop(tiny_setup, tmp_path, variant):
    from diffcoder.training.trainer import Trainer

    extra = {"model.dtype": "float64", "train.grad_accum": 2, "train.micro_batch_size": 2,
             "objective.warmup_steps": 2, "train.loss_chunk_rows": 5, "optim.weight_decay": 0.1}
    if variant == "diffusion-shift":
        extra["model.shift"] = True
    if variant == "ar":
        extra["objective.kind"] = "ar"
    if variant == "diffusion-lora":
        extra.update({"lora.enabled": True, "lora.rank": 4, "optim.lr": 1e-2})
    tr = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "run", **extra)), quiet=True)
    want = reference_run(tr, steps=4)
    for _ in range(4):
        tr.train_step()
    got = tr.model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-7, atol=1e-10), k
    start = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "run0", **extra)), quiet=True)
    assert any(not torch.allclose(start.model.state_dict()[k], got[k]) for k in got)  # training moved weights


def test_compiled_training_equals_eager(tiny_setup, tmp_path):
    """train.compile (decoder layers and loss chunks through torch.compile/inductor) trains like eager."""
    from diffcoder.training.trainer import Trainer

    curves = {}
    for compiled in (False, True):
        tr = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / f"c{compiled}", **{
            "train.compile": compiled, "objective.warmup_steps": 0})), quiet=True)
        curves[compiled] = [tr.train_step()["loss"] for _ in range(2)]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
